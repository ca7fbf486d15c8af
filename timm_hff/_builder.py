"""Build a timm backbone and wrap it into an HFFModel: cut, adapt, probe, add heads.

Everything that makes a model (``create_model``, the Hub loader) ends here, so this sits below both of them.
"""
from typing import Any, Dict, Optional

import dataclasses
import logging

import timm
import torch
import torch.nn as nn

from ._config import HFFConfig, short_repr
from ._model import HFFModel
from ._meta import MetaValues, on_meta
from ._pretrained import create_timm_model
from ._balance import balance_cuts
from ._probe import probe_split
from ._small_input import adapt_small_input, measure_reductions
from ._stages import build_split, stem_split

__all__ = ['build_hff_model', 'create_from_timm']

_logger = logging.getLogger(__name__)


def build_hff_model(backbone: nn.Module, num_classes: int, cfg: HFFConfig, in_chans: int,
                    model_name: str = '', timm_img_size=None) -> HFFModel:
    """Cut ``backbone`` (a timm model built with ``num_classes=0``) into HFF stages with prototype heads (none for
    ``num_classes=0``: timm's feature-extractor convention; ``reset_classifier`` adds them later)."""
    _check_num_classes(num_classes)
    img_size = cfg.check_img_size or _as_int_size(timm_img_size) or (32 if cfg.small_input else
                                                                    _default_img_size(backbone))
    if cfg.small_input:
        adapt_small_input(backbone, stem_split(backbone, cfg), in_chans)
        measure_reductions(backbone, in_chans, img_size)   # timm's feature_info still has the 224 px stem's
    if cfg.balance is not None and cfg.stage_indices is None:   # measured once; the cut is kept in the model's config
        cuts = balance_cuts(backbone, cfg, in_chans, img_size, num_classes or 10)
        cfg = dataclasses.replace(cfg, stage_indices=tuple(cuts))
    split = build_split(backbone, cfg)
    probe_split(backbone, split, in_chans, img_size, check=cfg.check_split)
    return HFFModel(backbone, split, num_classes, cfg, in_chans, model_name=model_name)


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f'num_classes must be an integer >= 1 (the class prototypes), or 0 for a model without '
                         f'heads (a feature extractor), got {num_classes!r}')


def _default_img_size(backbone: nn.Module) -> int:
    size = (getattr(backbone, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))
    return int(size[-1])


def _as_int_size(size):
    if size is None:
        return None
    return int(size[-1]) if isinstance(size, (tuple, list)) else int(size)


def create_from_timm(arch: str, cfg: HFFConfig, pretrained: bool = False, num_classes: Optional[int] = None,
                     in_chans: Optional[int] = None, pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
                     display_name: str = '', **timm_kwargs: Any) -> HFFModel:
    """Build the timm backbone (headless) and wrap it.

    On the meta device (timm's ``create_model(..., device='meta')`` or a ``torch.device('meta')`` context, how timm
    inspects a model's structure without allocating it) the probe forward runs on meta tensors too, its value
    comparisons answered by shape (``_meta``)."""
    if on_meta(timm_kwargs.get('device')):
        with torch.device('meta'), MetaValues():
            return _create_from_timm(arch, cfg, pretrained, num_classes, in_chans, pretrained_cfg_overlay,
                                     display_name, **timm_kwargs)
    return _create_from_timm(arch, cfg, pretrained, num_classes, in_chans, pretrained_cfg_overlay, display_name,
                             **timm_kwargs)


def _create_from_timm(arch: str, cfg: HFFConfig, pretrained: bool, num_classes: Optional[int],
                      in_chans: Optional[int], pretrained_cfg_overlay: Optional[Dict[str, Any]], display_name: str,
                      **timm_kwargs: Any) -> HFFModel:
    if not timm.is_model(arch):
        import difflib
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; close timm names: {', '.join(close)}" if close else "; list them with timm.list_models('*name*')"
        raise ValueError(f"unknown model {short_repr(display_name or arch, 120)}: not a timm architecture nor an hff_* "
                         f"name{hint}")
    num_classes = 1000 if num_classes is None else num_classes
    _check_num_classes(num_classes)
    global_pool = timm_kwargs.pop('global_pool', None)   # applied once the cut is probed with timm's own pooling
    in_chans = 3 if in_chans is None else in_chans
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f'in_chans must be an integer >= 1, got {in_chans!r}')
    backbone = create_timm_model(arch, pretrained=pretrained, num_classes=0, in_chans=in_chans,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay, **timm_kwargs)
    model = build_hff_model(backbone, num_classes, cfg, in_chans, model_name=arch,
                            timm_img_size=timm_kwargs.get('img_size'))
    if global_pool is not None and global_pool != model._heads_pool:   # refused with heads, as reset_classifier does
        model.reset_classifier(num_classes, global_pool)
    if pretrained:   # timm's backbone, but every prototype head is new: say so once, rather than predict at chance
        origin = {k: v for k, v in (backbone.pretrained_cfg or {}).items() if k in ('hf_hub_id', 'tag', 'architecture')}
        model.pretrained_cfg['backbone_pretrained'] = origin
        src = origin.get('hf_hub_id') or origin.get('tag') or arch
        _logger.warning(f"{display_name or arch}: timm's pretrained backbone ({src}) is loaded, but the "
                        f"{model.num_stages} HFF prototype heads ({num_classes} classes) are new and untrained: train "
                        f"them (hff-train, or model(x, target) with an optimizer) before predicting")
    return model
