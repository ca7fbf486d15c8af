"""Transforms in two halves, the way timm's prefetching loader splits them.

- Per sample (CPU, in loader workers): decode, convert to the model's channel count ('L' for ``in_chans=1``,
  'RGB' for 3), then timm's ``create_transform(..., use_prefetcher=True)``: resize / crop / flip / RandAugment
  as timm does it, ending in a **uint8** tensor. Nothing is normalised here.
- Per batch (on the training device): the CIFAR/MNIST-style augmentation ``pad_crop`` (pad, random crop, flip)
  on the uint8 batch, then scale to [0, 1], normalise with the model's mean/std and, optionally, timm's
  ``RandomErasing``.

Data already held in memory as a uint8 tensor (IDX files, or any split decoded once) skips the per-sample half
entirely; the batch half is the same whichever way the batch was made, so both paths feed identical inputs.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._aug import AUG_KINDS, AugConfig

__all__ = ['BatchTransform', 'SampleTransform', 'image_mode', 'images_to_uint8', 'random_flip', 'random_pad_crop',
           'resolve_data_config', 'to_pil']

def resolve_data_config(model, in_chans: int, img_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                        std: Optional[Sequence[float]] = None, crop_pct: Optional[float] = None,
                        interpolation: Optional[str] = None) -> Dict[str, Any]:
    """timm's ``resolve_model_data_config`` with overrides, and mean/std fitted to ``in_chans``.

    A grayscale model (``in_chans=1``) of an RGB family gets the mean of the RGB statistics rather than an
    assertion error, unless ``mean`` / ``std`` are given.
    """
    from timm.data import resolve_model_data_config

    args: Dict[str, Any] = dict(in_chans=in_chans)
    if img_size is not None:
        args['input_size'] = (in_chans, img_size, img_size)
    for k, v in dict(mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation).items():
        if v is not None:
            args[k] = tuple(v) if k in ('mean', 'std') else v
    for k in ('mean', 'std'):
        if k in args and len(args[k]) not in (1, in_chans):
            raise ValueError(f'{k} has {len(args[k])} values but the model takes {in_chans} channels')
    cfg = resolve_model_data_config(model, args=args)
    cfg['input_size'] = (in_chans,) + tuple(cfg['input_size'][1:])
    for k in ('mean', 'std'):
        v = tuple(float(x) for x in cfg[k])
        if len(v) != in_chans:
            v = (float(np.mean(v)),) * in_chans if in_chans == 1 or len(v) != 1 else v * in_chans
        cfg[k] = v
    return cfg


def image_mode(in_chans: int) -> str:
    if in_chans == 1:
        return 'L'
    if in_chans == 3:
        return 'RGB'
    raise ValueError(f'images can be read as 1 (grayscale) or 3 (RGB) channels, not in_chans={in_chans}')


class SampleTransform:
    """Per-sample half: any image (PIL, numpy / tensor array) -> converted mode -> timm transform -> uint8 CHW.

    Picklable, so it runs in DataLoader workers.
    """

    def __init__(self, data_cfg: Dict[str, Any], train: bool, aug: Optional[AugConfig] = None):
        from timm.data import create_transform

        aug = aug or AugConfig()
        self.mode = image_mode(data_cfg['input_size'][0])
        common = dict(input_size=data_cfg['input_size'], interpolation=data_cfg['interpolation'],
                      mean=data_cfg['mean'], std=data_cfg['std'], crop_pct=data_cfg['crop_pct'],
                      use_prefetcher=True)
        if train and aug.aug == 'timm':
            self.tf = create_transform(is_training=True, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                                       vflip=aug.vflip, color_jitter=aug.color_jitter, auto_augment=aug.aa,
                                       **common)
        else:   # eval, or an augmentation that runs on the batch: resize + centre crop only
            self.tf = create_transform(is_training=False, **common)

    def __call__(self, img) -> torch.Tensor:
        out = self.tf(to_pil(img, self.mode))
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out)
        if out.ndim == 2:
            out = out.unsqueeze(0)
        return out


def to_pil(img, mode: str):
    """A PIL image in ``mode`` from a PIL image, a (H, W[, C]) uint8 array or tensor."""
    from PIL import Image

    if isinstance(img, torch.Tensor):
        img = img.numpy()
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise ValueError(f'array images must be uint8, got {img.dtype}')
        if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
            img = img.transpose(1, 2, 0)
        img = Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img)
    elif not isinstance(img, Image.Image):
        raise ValueError(f'cannot read an image from {type(img).__name__}')
    return img if img.mode == mode else img.convert(mode)


def images_to_uint8(images: torch.Tensor, data_cfg: Dict[str, Any]) -> Optional[torch.Tensor]:
    """A whole in-memory split (N, H, W[, C]) or (N, C, H, W) uint8 -> (N, in_chans, S, S) without any per-image
    work, when the images are already at the model's size (then timm's eval transform only converts channels,
    which is done here exactly as PIL's ``convert`` does it). Returns None when a resize is needed.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f'in-memory images must be uint8, got {images.dtype}')
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    in_chans, size = data_cfg['input_size'][0], tuple(data_cfg['input_size'][1:])
    if tuple(images.shape[-2:]) != size:
        return None
    if images.shape[1] == 3 and in_chans == 1:   # ITU-R 601-2 luma, rounded as PIL's convert('L')
        w = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
        images = ((images.to(torch.int32) * w).sum(1, keepdim=True) + 0x8000) >> 16
        images = images.to(torch.uint8)
    elif images.shape[1] == 1 and in_chans == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != in_chans:
        raise ValueError(f'cannot turn {images.shape[1]}-channel images into in_chans={in_chans}')
    return images.contiguous()


class BatchTransform:
    """Per-batch half, on the device: [pad_crop + flips] -> float in [0, 1] -> normalise -> [random erasing].

    Args:
        data_cfg: Resolved data config (mean, std, input_size).
        train: Apply the training augmentation.
        aug: The augmentation settings ('pad_crop' runs here; 'timm' already ran per sample).
        channels_last: Return channels-last memory format (faster convs on CPU and GPU).
    """

    def __init__(self, data_cfg: Dict[str, Any], train: bool, aug: Optional[AugConfig] = None,
                 channels_last: bool = False):
        self.aug = aug or AugConfig(aug='none')
        self.train = train
        self.mean = torch.tensor(data_cfg['mean'], dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(data_cfg['std'], dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last
        self.erase = None
        if train and self.aug.reprob > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(self.aug.reprob, mode=self.aug.remode, max_count=self.aug.recount,
                                       device='cpu')

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise ValueError(f'BatchTransform expects uint8 images, got {x.dtype}')
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if self.train and self.aug.aug == 'pad_crop':
            x = random_pad_crop(x, self.aug.crop_padding)
        if self.train and self.aug.aug != 'timm':   # 'timm' flipped per sample already
            x = random_flip(x, self.aug.hflip, -1)
            x = random_flip(x, self.aug.vflip, -2)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        x = (x.float() - mean) / std
        if self.erase is not None:
            self.erase.device = x.device
            x = self.erase(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def random_pad_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random crop of the original size, per image, in one gather."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]          # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]          # (B, 1, W)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]     # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, p: float, dim: int) -> torch.Tensor:
    if p <= 0:
        return x
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(dim), x)
