"""``create_model``: the one entry point, in the spirit of ``timm.create_model``."""
import os
from typing import Any, Dict, Optional

import torch.nn as nn

from ._builder import create_from_timm
from ._config import HFFConfig
from ._features import as_feature_extractor, pop_feature_kwargs
from ._model import HFFModel
from ._names import parse_model_name, registered_defaults
from .hub import load_pretrained_hff

__all__ = ['create_model']



def _check_not_a_folder(name: str) -> None:
    """A saved model or a run folder given as a bare path (not a timm name): say how to load it."""
    import timm
    if timm.is_model(name) or not os.path.isdir(name):
        return
    if os.path.isfile(os.path.join(name, 'config.json')):
        hint = f"'local-dir:{name}'"
    elif os.path.isfile(os.path.join(name, 'model', 'config.json')):
        hint = f"'local-dir:{os.path.join(name, 'model')}' (the run's saved model)"
    else:
        hint = "'local-dir:<folder with config.json and model.safetensors>'"
    raise ValueError(f"model '{name}' is a folder, not a model name; load a saved model with {hint}")


def create_model(
        model_name: str,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        hff_cfg: Optional[HFFConfig] = None,
        **kwargs: Any,
) -> nn.Module:
    """Create an HFF model from a timm architecture, an ``hff_*`` name, or saved HFF weights.

    Args:
        model_name: ``'resnet18'`` (any timm architecture), ``'hff_resnet18'`` (registered defaults),
            ``'hf-hub:org/repo'`` or ``'local-dir:/path'`` (a saved HFF model).
        pretrained: For a timm architecture, load timm's pretrained backbone (the transfer path); for a saved
            HFF model, load its weights.
        num_classes: Classes to build prototypes for (default 1000, or the saved model's).
        in_chans: Input channels (timm adapts a pretrained stem's weights).
        pretrained_cfg_overlay: Passed to timm (e.g. ``dict(file='weights.safetensors')``).
        hff_cfg: All HFF settings at once; otherwise give them as keyword arguments (see ``HFFConfig``).
        **kwargs: HFF settings (``prototypes_per_class``, ``stage_indices``, ...) and timm kwargs
            (``drop_path_rate``, ``img_size``, ...). ``None`` values are dropped, as timm does.
            ``features_only=True`` (with ``out_indices``, ``output_fmt``) returns timm's feature extractor over the
            model's backbone (``_features``); ``num_classes=0`` a model without heads that returns pooled features.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    features = pop_feature_kwargs(kwargs)
    model = _create(model_name, pretrained, num_classes, in_chans, pretrained_cfg_overlay, hff_cfg, kwargs)
    return as_feature_extractor(model, **features) if features else model


def _create(model_name: str, pretrained: bool, num_classes: Optional[int], in_chans: Optional[int],
            pretrained_cfg_overlay: Optional[Dict[str, Any]], hff_cfg: Optional[HFFConfig],
            kwargs: Dict[str, Any]) -> HFFModel:
    source, name = parse_model_name(model_name)
    if source in ('hf-hub', 'local-dir'):
        return load_pretrained_hff(model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                   hff_cfg=hff_cfg, **kwargs)
    if source == 'hff':
        arch, defaults = registered_defaults(name)
        kwargs = {**defaults, **kwargs}
    else:
        _check_not_a_folder(name)
        arch = name
    hff_kwargs, timm_kwargs = HFFConfig.split_kwargs(kwargs)
    if hff_cfg is not None:
        if hff_kwargs:
            raise ValueError(f'give HFF settings either as hff_cfg or as keyword arguments, not both '
                             f'({sorted(hff_kwargs)})')
        cfg = hff_cfg
    else:
        cfg = HFFConfig(**hff_kwargs)
    if cfg.balance is not None and cfg.stage_indices is not None:
        raise ValueError(f'balance={cfg.balance!r} chooses the cut itself, but stage_indices '
                         f'{list(cfg.stage_indices)} names one; give balance or stage_indices, not both')
    return create_from_timm(arch, cfg, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                            pretrained_cfg_overlay=pretrained_cfg_overlay, display_name=name, **timm_kwargs)
