"""Wrap an already built timm backbone into an HFFModel: cut, adapt, probe, add heads."""
import torch.nn as nn

from ._config import HFFConfig
from ._model import HFFModel
from ._stages import adapt_small_input, build_split, probe_split


def build_hff_model(backbone: nn.Module, num_classes: int, cfg: HFFConfig, in_chans: int,
                    model_name: str = '', timm_img_size=None) -> HFFModel:
    """Cut ``backbone`` (a timm model built with ``num_classes=0``) into HFF stages with prototype heads."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be an integer >= 1 (HFF needs class prototypes), got {num_classes!r}')
    split = build_split(backbone, cfg)
    if cfg.small_input:
        adapt_small_input(backbone, split, in_chans)
    img_size = cfg.check_img_size or _as_int_size(timm_img_size) or (32 if cfg.small_input else
                                                                    _default_img_size(backbone))
    probe_split(backbone, split, in_chans, img_size, check=cfg.check_split)
    return HFFModel(backbone, split, num_classes, cfg, in_chans, model_name=model_name)


def _default_img_size(backbone: nn.Module) -> int:
    size = (getattr(backbone, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))
    return int(size[-1])


def _as_int_size(size):
    if size is None:
        return None
    return int(size[-1]) if isinstance(size, (tuple, list)) else int(size)
