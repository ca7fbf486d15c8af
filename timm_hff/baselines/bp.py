"""Backpropagation baselines on the same timm backbone as HFF: plain, gradient checkpointing, accumulation.

The BP model is ``timm.create_model(arch, num_classes=C)`` with timm's standard head, trained end to end with
cross-entropy. For 28-32 px inputs it gets the very stem adaptation HFF's ``small_input`` applies
(``adapt_small_input`` at HFF's own stage cut), so the two backbones are the same network and a BP state dict's
backbone keys load into an HFF model's ``backbone``.

Memory baselines: ``grad_checkpointing=True`` uses timm's ``set_grad_checkpointing`` (recompute activations in
the backward); ``accumulated_backward`` splits a batch into micro-batches with the same effective batch (and the
same gradient, up to batch-norm statistics).
"""
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import HFFConfig
from ..model import StageSplit, adapt_small_input, create_timm_model, stem_split

__all__ = ['accumulated_backward', 'create_bp_model']


def create_bp_model(model_name: str, num_classes: int = 1000, in_chans: int = 3, small_input: bool = False,
                    grad_checkpointing: bool = False, split: Optional[StageSplit] = None,
                    num_stages: int = 4, stage_indices=None, balance: Optional[str] = None,
                    pretrained: bool = False, pretrained_file: Optional[str] = None,
                    **timm_kwargs: Any) -> nn.Module:
    """A plain timm classifier with HFF's backbone.

    Args:
        model_name: A timm architecture (not an ``hff_*`` name: BP has no prototype heads).
        num_classes: Classes of timm's standard head.
        in_chans: Input channels.
        small_input: Apply HFF's 28-32 px stem adaptation (strides and pooling before the first stage removed).
        grad_checkpointing: Turn on timm's gradient checkpointing (the BP+checkpointing memory baseline).
        split: An HFF model's split whose first tap bounds the stem adaptation (for a balanced HFF model, its
            ``stem_split``). Default: the one ``num_stages`` / ``stage_indices`` / ``balance`` give (``stem_split``).
        pretrained / pretrained_file: timm's pretrained weights (Hub, cache, or a local safetensors file), as HFF's
            ``create_model`` loads them (``timm_hff._pretrained``), with timm's classifier reset to ``num_classes``.
        **timm_kwargs: Passed to ``timm.create_model`` (``drop_path_rate``, ``img_size``, ``channels``, ...).
    """
    if not isinstance(model_name, str) or model_name.startswith('hff_') or not timm.is_model(model_name):
        raise ValueError(f"BP baseline needs a timm architecture name, got {model_name!r}; for 'hff_<arch>' pass "
                         f"'<arch>'")
    model = create_timm_model(model_name, pretrained=pretrained, pretrained_file=pretrained_file,
                              num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    if small_input:
        if split is None:
            split = stem_split(model, HFFConfig(num_stages=num_stages, stage_indices=stage_indices,
                                                balance=balance, check_split=False))
        adapt_small_input(model, split, in_chans)
    if grad_checkpointing:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise ValueError(f'{model_name} does not support gradient checkpointing in timm')
        model.set_grad_checkpointing(True)
    return model


def accumulated_backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor, accum_steps: int,
                         loss_fn: Callable = F.cross_entropy,
                         backward_fn: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Backward of the batch mean loss in ``accum_steps`` micro-batches; returns the (detached) mean loss.

    Each micro-batch's graph is freed before the next one runs, so activation memory is that of one
    micro-batch while the summed gradient equals the full batch's (when the batch divides evenly).
    """
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f'accum_steps must be an integer >= 1, got {accum_steps!r}')
    if x.shape[0] < accum_steps:
        raise ValueError(f'batch of {x.shape[0]} cannot be split into {accum_steps} micro-batches; '
                         f'lower accum_steps or raise the batch size')
    backward_fn = backward_fn or (lambda loss: loss.backward())
    total = x.new_zeros((), dtype=torch.float32)
    n = x.shape[0]
    for xs, ys in zip(x.tensor_split(accum_steps), target.tensor_split(accum_steps)):
        loss = loss_fn(model(xs), ys) * (xs.shape[0] / n)
        backward_fn(loss)
        total += loss.detach().float()
    return total
