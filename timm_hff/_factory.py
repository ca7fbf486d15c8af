"""``create_model``: the one entry point, in the spirit of ``timm.create_model``."""
from typing import Any, Dict, Optional, Tuple

import timm

from ._builder import build_hff_model
from ._config import HFFConfig
from ._model import HFFModel

HFF_PREFIX = 'hff_'


def parse_model_name(model_name: str) -> Tuple[str, str]:
    """Split a name into (source, name): source is 'hf-hub', 'local-dir', 'hff' (a registered hff_* name) or
    'timm' (any timm architecture, wrapped with the default HFF settings)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f'model_name must be a non-empty string, got {model_name!r}')
    for source in ('hf-hub', 'local-dir'):
        if model_name.startswith(source + ':'):
            return source, model_name[len(source) + 1:]
    if model_name.startswith(HFF_PREFIX):
        return 'hff', model_name
    return 'timm', model_name


def create_model(
        model_name: str,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        hff_cfg: Optional[HFFConfig] = None,
        **kwargs: Any,
) -> HFFModel:
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
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source, name = parse_model_name(model_name)
    if source in ('hf-hub', 'local-dir'):
        from ._hub import load_pretrained_hff
        return load_pretrained_hff(model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                   hff_cfg=hff_cfg, **kwargs)
    if source == 'hff':
        from ._registry import registered_defaults
        arch, defaults = registered_defaults(name)
        kwargs = {**defaults, **kwargs}
    else:
        arch = name
    hff_kwargs, timm_kwargs = HFFConfig.split_kwargs(kwargs)
    if hff_cfg is not None:
        if hff_kwargs:
            raise ValueError(f'give HFF settings either as hff_cfg or as keyword arguments, not both '
                             f'({sorted(hff_kwargs)})')
        cfg = hff_cfg
    else:
        cfg = HFFConfig(**hff_kwargs)
    return create_from_timm(arch, cfg, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                            pretrained_cfg_overlay=pretrained_cfg_overlay, display_name=name, **timm_kwargs)


def create_from_timm(arch: str, cfg: HFFConfig, pretrained: bool = False, num_classes: Optional[int] = None,
                     in_chans: Optional[int] = None, pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
                     display_name: str = '', **timm_kwargs: Any) -> HFFModel:
    """Build the timm backbone (headless) and wrap it."""
    if not timm.is_model(arch):
        raise ValueError(f"unknown model '{display_name or arch}': not a timm architecture nor an hff_* name; "
                         f"see timm_hff.list_models('*{arch.split('_')[0]}*')")
    if 'num_classes' in timm_kwargs or 'features_only' in timm_kwargs:
        raise ValueError('features_only is not supported: HFF cuts the full model itself')
    num_classes = 1000 if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be an integer >= 1 (HFF needs class prototypes), got {num_classes!r}')
    in_chans = 3 if in_chans is None else in_chans
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f'in_chans must be an integer >= 1, got {in_chans!r}')
    backbone = timm.create_model(arch, pretrained=pretrained, num_classes=0, in_chans=in_chans,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay, **timm_kwargs)
    return build_hff_model(backbone, num_classes, cfg, in_chans, model_name=arch,
                           timm_img_size=timm_kwargs.get('img_size'))
