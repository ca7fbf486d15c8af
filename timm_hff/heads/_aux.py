"""The aux block: non-linear per-position layers between a stage and its head's pooling."""
from typing import Optional

import torch
import torch.nn as nn

from ._pooling import pool_to

__all__ = ['AuxBlock']


class AuxBlock(nn.Module):
    """Non-linear per-position layers between a stage and its pooling (the paper's AuxConv).

    ``depth`` layers of conv (1x1 or 3x3) + norm + activation; for NHWC and token layouts a 1x1 conv is a Linear over
    the last dim, so it runs there without permutes. With ``size``, a feature map is first average-pooled to at most
    ``size`` x ``size``, so the head of a full-resolution stage costs a fraction of the stage.
    """

    def __init__(self, kind: str, layout: str, in_chs: int, out_chs: int, depth: int = 1,
                 size: Optional[int] = None):
        super().__init__()
        self.layout = layout
        self.size = size if layout in ('NCHW', 'NHWC') else None
        if layout != 'NCHW' and kind == 'conv3x3':
            raise ValueError(f"aux='conv3x3' needs an NCHW stage output, this stage is {layout}; "
                             f"use aux='conv1x1' or 'none'")
        layers = []
        for i in range(depth):
            chs = in_chs if i == 0 else out_chs
            if layout == 'NCHW':
                k = 3 if kind == 'conv3x3' else 1
                layers += [nn.Conv2d(chs, out_chs, k, padding=k // 2, bias=False), nn.BatchNorm2d(out_chs),
                           nn.ReLU(inplace=True)]
            else:
                layers += [nn.Linear(chs, out_chs, bias=False), nn.LayerNorm(out_chs), nn.GELU()]
        if depth == 1:   # the names of a one-layer block (proj, norm, act) are those of saved models
            self.proj, self.norm, self.act = layers
        else:
            self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            x = pool_to(x, self.size, self.layout)
        if hasattr(self, 'layers'):
            return self.layers(x)
        return self.act(self.norm(self.proj(x)))
