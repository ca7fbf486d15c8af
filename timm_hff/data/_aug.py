"""The training augmentation settings (light: read by ``TrainConfig`` before any heavy import)."""
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ['AUG_KINDS', 'AugConfig']

AUG_KINDS = ('pad_crop', 'timm', 'none')


@dataclass
class AugConfig:
    """Training augmentation (timm ``train.py`` names where timm has one).

    Attributes:
        aug: 'pad_crop' (pad ``crop_padding`` px, random crop back, flip; run on uint8 batches), 'timm' (timm's
            per-sample ImageNet pipeline: RandomResizedCrop, flips, colour jitter, ``aa``) or 'none'.
        crop_padding: Padding of 'pad_crop', in pixels.
        hflip: Horizontal flip probability.
        vflip: Vertical flip probability.
        scale: RandomResizedCrop area range ('timm').
        ratio: RandomResizedCrop aspect range ('timm').
        color_jitter: Colour jitter strength ('timm').
        aa: timm auto-augment spec, e.g. 'rand-m9-mstd0.5' ('timm').
        reprob: Random erasing probability (any aug, on the normalised batch).
        remode: Random erasing fill ('const', 'rand', 'pixel').
        recount: Random erasing regions per image.
    """
    aug: str = 'pad_crop'
    crop_padding: int = 4
    hflip: float = 0.5
    vflip: float = 0.0
    scale: Optional[Tuple[float, float]] = None
    ratio: Optional[Tuple[float, float]] = None
    color_jitter: float = 0.4
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = 'pixel'
    recount: int = 1
