"""Stage outputs in their layouts, pooled: what a head reads, and timm's pre-logits of a cut that ends before the
backbone's own pooling."""
import torch
import torch.nn.functional as F

__all__ = ['LAYOUTS', 'pool_stage', 'pool_to']

LAYOUTS = ('NCHW', 'NHWC', 'NLC', 'NC')


def pool_stage(x: torch.Tensor, layout: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """A stage output average-pooled to (B, C) in its layout (prefix tokens left out): timm's pre-logits of a model
    whose cut ends before the backbone's own pooling."""
    if layout == 'NCHW':
        return x.mean((2, 3))
    if layout == 'NHWC':
        return x.mean((1, 2))
    if layout == 'NLC':
        return x[:, num_prefix_tokens:].mean(1)
    return x


def pool_to(x: torch.Tensor, size: int, layout: str) -> torch.Tensor:
    """Average-pool a feature map to at most ``size`` x ``size`` (a smaller map is returned as is)."""
    h, w = (x.shape[2], x.shape[3]) if layout == 'NCHW' else (x.shape[1], x.shape[2])
    if h <= size and w <= size:
        return x
    if layout == 'NHWC':
        return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (min(h, size), min(w, size))).permute(0, 2, 3, 1)
    return F.adaptive_avg_pool2d(x, (min(h, size), min(w, size)))
