"""Gradient checkpointing of a backbone's stem, which timm's ``set_grad_checkpointing`` leaves out.

timm checkpoints the blocks of a CNN's stages; its stem runs plainly and keeps every activation for backward. That is
cheap at ImageNet sizes (the stem downsamples at once), but ``small_input`` removes the stem's strides, so a deep
stem (three 3x3 convs with their norms and activations) holds several full-resolution maps: with ``memory_efficient``
training they sit beside the first stage's block being recomputed, and set its peak. Checkpointing the stem too keeps
only its input and output, and runs it again in backward.

Only a stem container that runs several layers (an ``nn.Sequential`` before the first feature level, such as a
ResNet-D deep stem's ``conv1``) is wrapped: checkpointing a single conv saves nothing (its input is kept either way).
The wrapper replaces the container's ``forward`` on the instance, so parameter names, ``state_dict`` and hooks are
unchanged; the recompute is timm's non-reentrant kind, which the detached stage inputs need.
"""
from typing import List, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ['set_stem_checkpointing', 'stem_containers']


class _CheckpointedForward:
    """``module.forward`` through a non-reentrant checkpoint while training with grad enabled (a callable object, so
    ``copy.deepcopy`` of the model, e.g. timm's EMA, rebinds it to the copy)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward.__get__(self.module)
        if self.module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


def stem_containers(backbone: nn.Module, taps: Sequence[str]) -> List[str]:
    """Names of the backbone's top-level children before its first feature level (timm's ``feature_info[0]``, the
    stem's output) that run several layers in sequence and hold no stage cut: the stem parts worth checkpointing."""
    info = getattr(backbone, 'feature_info', None)
    try:
        top = info[0]['module'].split('.')[0]
    except (TypeError, IndexError, KeyError, AttributeError):
        return []
    names = []
    for name, child in backbone.named_children():
        if name == top:
            break
        cut_inside = any(t == name or t.startswith(name + '.') for t in taps)
        if isinstance(child, nn.Sequential) and len(child) > 1 and not cut_inside:
            names.append(name)
    return names


def set_stem_checkpointing(backbone: nn.Module, names: List[str], enable: bool) -> None:
    for name in names:
        module = backbone.get_submodule(name)
        if enable:
            module.forward = _CheckpointedForward(module)
        elif isinstance(module.__dict__.get('forward'), _CheckpointedForward):
            del module.forward
