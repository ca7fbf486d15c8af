"""An HFF model's input boundary: image layout, channels and dtype; targets' shape, kind and range.

Checks read metadata only, except the label range on CPU (where ``F.one_hot`` would read the labels anyway); labels on
an accelerator were checked by the data loaders before the transfer.
"""
import torch
from torch.fx import _symbolic_trace as _fx

__all__ = ['check_images', 'check_target', 'is_fx_symbolic_tracing']

# fx symbolic tracing only (torch.compile and export trace too, and must see the training forward and its checks);
# older torch has only is_fx_tracing
is_fx_symbolic_tracing = getattr(_fx, 'is_fx_symbolic_tracing', _fx.is_fx_tracing)


def check_images(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'expected images of shape (B, {in_chans}, H, W), got {shape}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); '
                         f'create the model with in_chans={x.shape[1]} or convert the images')
    if not x.is_floating_point():
        raise ValueError(f'expected floating-point images, got {x.dtype}; convert and normalise them first '
                         f'(e.g. timm_hff.data.BatchTransform, or x.float() / 255 then mean / std)')


def check_target(target: torch.Tensor, batch: int, n: int) -> None:
    """Class indices (B,) in [0, n) or soft targets (B, n), for ``n`` classes."""
    if not isinstance(target, torch.Tensor) or target.ndim not in (1, 2):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f'target must be class indices of shape ({batch},) or soft targets of shape '
                         f'({batch}, {n}), got {shape}')
    want = (batch,) if target.ndim == 1 else (batch, n)
    if tuple(target.shape) != want:
        raise ValueError(f'target has shape {tuple(target.shape)} but the batch needs {want} '
                         f'({batch} images, {n} classes)')
    if target.ndim == 2:
        if not target.is_floating_point():
            raise ValueError(f'soft targets must be floating point, got {target.dtype}')
        return
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f'class-index targets must be integers, got {target.dtype}; use target.long()')
    if target.device.type == 'cpu' and target.numel():
        try:   # one check op; the labels are read (for the message) only when it fails
            torch._assert_async(((target >= 0) & (target < n)).all(), 'label out of range')
        except RuntimeError:
            lo, hi = int(target.min()), int(target.max())
            raise ValueError(f'target holds class {lo if lo < 0 else hi}, outside [0, {n}) for this model\'s {n} '
                             f'classes; fix the labels or build the model with num_classes >= {max(hi + 1, n)}'
                             ) from None
