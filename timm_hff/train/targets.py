"""Training targets: timm's Mixup / CutMix and label smoothing, as soft targets every method and trainer shares."""
from typing import Optional

__all__ = ['build_mixup', 'make_targets']


def build_mixup(cfg, num_classes: int):
    """timm's ``Mixup`` for ``mixup`` / ``cutmix`` > 0 (it applies ``smoothing`` itself), else None."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                     switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                     num_classes=num_classes)
    return None


def make_targets(x, y, mixup: Optional[object], smoothing: float, num_classes: int):
    """(images, targets): mixed by ``mixup``, or smoothed one-hot targets, or the labels as they are."""
    if mixup is not None:
        return mixup(x, y)
    if smoothing > 0:
        from timm.data.mixup import one_hot
        off = smoothing / num_classes
        return x, one_hot(y, num_classes, on_value=1.0 - smoothing + off, off_value=off)
    return x, y
