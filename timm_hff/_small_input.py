"""Small inputs (28-32 px) for a conv stem made for 224: the strides and pooling before the first tap become 1 /
identity, so the first stage keeps the input's resolution (``small_input``)."""
from typing import List

import torch
import torch.nn as nn

from ._probe import stride_for
from ._stages import StageSplit, cut_name, resolve_name

__all__ = ['adapt_small_input', 'measure_reductions']


class _StopForward(Exception):
    """Ends the stem's probe forward at the first tap."""


def adapt_small_input(backbone: nn.Module, split: StageSplit, in_chans: int) -> List[str]:
    """Make a conv stem keep resolution for 28-32 px inputs; returns the names of what changed.

    Every conv before the first tap loses its stride and every pooling layer there becomes an identity, so
    a 28 px image reaches stage 1 at 28 px instead of 7 px. Strides inside the feature level that ends stage 1
    are that level's own downsampling and are kept (with ``stage_indices=[2, 4]`` on a ResNet, layer2 still
    halves the map). Token models are sized by timm's own ``img_size`` / ``patch_size`` kwargs instead.
    """
    if hasattr(backbone, 'patch_embed'):
        raise ValueError(f"small_input adapts conv stems; '{type(backbone).__name__}' embeds patches, so pass "
                         f"timm's img_size=32, patch_size=4 (or similar) instead")
    first = split.tap_names[0] if split.tap_names else None
    first_level = resolve_name(backbone, cut_name(backbone, split.feature_indices[0]))
    order: List[str] = []
    module_names = {m: n for n, m in backbone.named_modules()}

    def record(module, args, output):
        order.append(module_names[module])
        if module_names[module] == first:
            raise _StopForward

    handles = [m.register_forward_hook(record) for n, m in backbone.named_modules() if n]
    try:
        with torch.no_grad():
            backbone.eval()
            backbone.forward_features(torch.zeros(1, in_chans, 64, 64))
    except _StopForward:
        pass
    finally:
        backbone.train()
        for h in handles:
            h.remove()
    if first is None or first not in order:
        raise ValueError('small_input needs at least two stages (a first tap to stop at)')
    changed = []
    for name in order[:order.index(first)]:
        if first.startswith(name + '.') or name == first or name.startswith(first_level + '.'):
            continue
        m = backbone.get_submodule(name)
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            m.stride = (1, 1)
            changed.append(name)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and _stride_of(m) > 1:
            parent, _, child = name.rpartition('.')
            setattr(backbone.get_submodule(parent) if parent else backbone, child, nn.Identity())
            changed.append(name)
    if not changed:
        raise ValueError(f"small_input found no strided conv or pooling before '{first}' in "
                         f"{type(backbone).__name__}; nothing to adapt")
    return changed


def _stride_of(m: nn.Module) -> int:
    s = m.stride if m.stride is not None else m.kernel_size
    return max(s) if isinstance(s, (tuple, list)) else int(s)


def measure_reductions(backbone: nn.Module, in_chans: int, img_size: int) -> None:
    """Rewrite the backbone's ``feature_info`` reductions to what its adapted stem gives (timm's describe the 224 px
    stem: a small-input ResNet's layer4 is at stride 8, not 32), measured on one probe image; ``features_only``,
    ``forward_intermediates`` users and the model's pool size read them."""
    if not hasattr(backbone, 'forward_intermediates'):
        return
    was_training = backbone.training
    try:
        with torch.no_grad():
            feats = backbone.eval().forward_intermediates(torch.zeros(1, in_chans, img_size, img_size),
                                                          intermediates_only=True)
    finally:
        backbone.train(was_training)
    info = backbone.feature_info
    if len(feats) != len(info):
        return
    backbone.feature_info = [dict(f, reduction=stride_for(img_size, t.shape[-1], f['reduction'] or 1))
                             for f, t in zip(info, feats)]
