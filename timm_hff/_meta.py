"""Building an HFF model on the meta device: shapes without values.

timm builds and inspects models there (``create_model(..., device='meta')``), and the Hub loader builds a saved model
there first to hold it against the weights' header. The cut is learnt from a probe forward, which runs on meta
tensors too; only its value comparisons need an answer, given here by shape.
"""
import torch
from torch.overrides import TorchFunctionMode

__all__ = ['MetaValues', 'on_meta']


def on_meta(device=None) -> bool:
    """Whether a build with timm's ``device`` argument (or, without one, the default device) lands on meta."""
    return (torch.device(device) if device is not None else torch.get_default_device()).type == 'meta'


class MetaValues(TorchFunctionMode):
    """Answers value comparisons between meta tensors by their shapes.

    The probe picks the tensor of a tuple-returning stage (pit, tnt, crossvit, ...) that equals timm's intermediate;
    on the meta device there are no values, and the one of the right shape gives the same head shapes.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal) and len(args) >= 2 and all(
                isinstance(a, torch.Tensor) and a.is_meta for a in args[:2]):
            return tuple(args[0].shape) == tuple(args[1].shape)
        return func(*args, **(kwargs or {}))

