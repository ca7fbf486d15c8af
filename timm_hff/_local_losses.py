"""The training forward of an HFF model: every stage on a detached input, each stage's local loss.

- ``mode='simultaneous'``: the summed loss, for one ``backward()`` by the caller. Each stage's graph stays alive
  until then, so this costs as much activation memory as backprop; the heads run after the forward, and the active
  stages whose heads fuse (``Head.fuses_with``) are scored in one call (``Head.fused_losses``).
- ``mode='memory_efficient'``: each stage's loss is backpropagated (through ``backward_fn``, e.g.
  ``accelerator.backward``) as soon as the stage has run, freeing its graph before the next stage runs, as
  InfoPro does. Gradients are the same as in simultaneous mode.

``HFFModel.forward(x, target)`` checks its arguments and calls ``local_losses`` with its stage runner and heads: this
module knows heads only through the ``Head`` contract and the model only through the ``run`` it is given.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['HFFOutput', 'MODES', 'check_checkpoint_mode', 'local_losses']

MODES = ('simultaneous', 'memory_efficient')


@dataclass
class HFFOutput:
    """What one training forward returns.

    Attributes:
        logits: The model's prediction (``predict_from``) for this batch, detached.
        stage_logits: Each stage's class logits, detached.
        stage_losses: Each stage's local loss, detached (for logging).
        loss: Sum of the stage losses. In simultaneous mode it carries the graph (call backward on it); in
            memory_efficient mode the backward has already run and it is detached.
        backward_done: True when the model already ran the backward (memory_efficient mode).
        loss_vector: The trained stages' losses as one vector, ``loss`` its sum (with the graph, as ``loss``).
    """
    logits: torch.Tensor
    stage_logits: List[torch.Tensor]
    stage_losses: List[torch.Tensor]
    loss: torch.Tensor
    backward_done: bool
    loss_vector: Optional[torch.Tensor] = None


def _pass_through(t: torch.Tensor) -> torch.Tensor:
    return t


Run = Callable[..., List[torch.Tensor]]   # the model's run_stages, its batch bound: run(on_stage=, stop_after=, keep=)


def local_losses(run: Run, heads: Sequence[nn.Module], target: torch.Tensor, active: List[int], mode: str,
                 backward_fn: Optional[Callable[[torch.Tensor], None]] = None):
    """(every run stage's detached logits, the active stages' losses as one vector): see the module docstring.
    ``active`` is sorted and holds no frozen stage; the forward stops after its last."""
    stage_logits: List[torch.Tensor] = []
    losses: List[torch.Tensor] = []
    backward_fn = backward_fn or (lambda loss: loss.backward())

    def on_stage(k: int, h: torch.Tensor) -> None:   # memory_efficient: each stage as it runs
        if k not in active:
            with torch.no_grad():
                logits = heads[k](h)
        else:
            # With grad checkpointing this runs inside a checkpointed block's forward: the pass-through
            # saved-tensor hooks keep the head's tensors out of the checkpoint, and the backward recomputes
            # the stage's checkpointed blocks as any checkpoint backward would (the tap returns the same
            # detached tensor in the recompute, so the graphs match). The backward consumes the head's
            # graph at once, so the hooks' strong references to saved outputs cannot leak.
            with torch.autograd.graph.saved_tensors_hooks(_pass_through, _pass_through):
                loss, logits = heads[k].forward_loss(h, target)
                backward_fn(loss)
            losses.append(loss.detach())
        stage_logits.append(logits.detach())

    if mode == 'memory_efficient':
        run(on_stage=on_stage, stop_after=active[-1], keep=False)
        return stage_logits, torch.stack(losses)
    # simultaneous: the heads run after the forward, outside any checkpointed region of the backbone
    return _stage_losses(heads, run(stop_after=active[-1]), target, active)


def _stage_losses(heads: Sequence[nn.Module], outs: List[torch.Tensor], target: torch.Tensor, active: List[int]):
    """(every stage's detached logits, the active stages' losses as one vector) after a simultaneous forward: the
    active stages whose heads fuse with the first one are scored in one call, any other head on its own."""
    logits: List[Optional[torch.Tensor]] = [None] * len(outs)
    first = heads[active[0]]
    fused = [k for k in active if first.fuses_with(heads[k])]
    loss_of = {}
    if fused:
        vec, lg = first.fused_losses([heads[k] for k in fused], [outs[k] for k in fused], target)
        for k, l in zip(fused, lg):
            logits[k] = l
        if len(fused) == len(active):
            loss_vec = vec
        else:
            loss_of.update(zip(fused, vec.unbind(0)))
    for k in range(len(outs)):
        if k in active and k not in fused:
            loss_of[k], logits[k] = heads[k].forward_loss(outs[k], target)
        elif k not in active:
            with torch.no_grad():
                logits[k] = heads[k](outs[k])
    if loss_of:
        loss_vec = torch.stack([loss_of[k] for k in active])
    return logits, loss_vec


def check_checkpoint_mode(backbone: nn.Module, mode: str) -> None:
    """Training with grad checkpointing needs timm's non-reentrant checkpoint: a reentrant one runs its block
    without grad and gives no gradient when the block's input requires none, which a stage's detached input never
    does (and memory_efficient mode runs each head's backward inside the checkpointed block, where reentrant
    checkpointing would show the head a tensor with no graph)."""
    if getattr(backbone, 'grad_checkpointing', False) and torch.is_grad_enabled():
        from timm.layers import use_reentrant_ckpt
        if use_reentrant_ckpt():
            raise ValueError(f'{mode} training with grad checkpointing needs non-reentrant checkpoints (a stage '
                             f'starts from a detached input); unset TIMM_REENTRANT_CKPT or call '
                             f'timm.layers.set_reentrant_ckpt(False)')
