"""The training forward of an HFF model: every stage on a detached input, each stage's local loss.

- ``mode='simultaneous'``: the summed loss, for one ``backward()`` by the caller. Each stage's graph stays alive
  until then, so this costs as much activation memory as backprop; the heads run after the forward, and the active
  stages' scoring and losses are one fused call (``_fused_head``).
- ``mode='memory_efficient'``: each stage's loss is backpropagated (through ``backward_fn``, e.g.
  ``accelerator.backward``) as soon as the stage has run, freeing its graph before the next stage runs, as
  InfoPro does. Gradients are the same as in simultaneous mode.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from ._fused_head import fused_stage_losses

__all__ = ['HFFOutput', 'LocalLosses', 'MODES', 'head_loss']

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


def head_loss(head: nn.Module, h: torch.Tensor, target: torch.Tensor):
    """(local loss, detached logits) of a stage: the head's fused ``forward_loss`` where it has one."""
    fused = getattr(head, 'forward_loss', None)
    if fused is not None:
        return fused(h, target)
    logits = head(h)
    return head.loss(logits, target), logits.detach()


class LocalLosses:
    """Mixin of ``HFFModel``: its training forward. Uses the model's ``heads``, ``_run``, ``_check_input``,
    ``_stage_index``, ``_frozen``, ``_check_checkpoint_mode`` and ``predict_from_stages``."""

    def local_losses(self, x: torch.Tensor, target: torch.Tensor, mode: str = 'simultaneous',
                     backward_fn: Optional[Callable[[torch.Tensor], None]] = None,
                     stages: Optional[Sequence[int]] = None) -> HFFOutput:
        """``HFFModel.forward(x, target, ...)``: see the module docstring."""
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self._check_input(x, target)
        active = sorted({self._stage_index(k) for k in stages}) if stages is not None else list(range(self.num_stages))
        active = [k for k in active if k not in self._frozen]
        if not active:
            raise ValueError('no stage left to train: all requested stages are frozen')
        stage_logits: List[torch.Tensor] = []
        losses: List[torch.Tensor] = []
        memory_efficient = mode == 'memory_efficient'
        backward_fn = backward_fn or (lambda loss: loss.backward())

        def on_stage(k: int, h: torch.Tensor) -> None:   # memory_efficient: each stage as it runs
            if k not in active:
                with torch.no_grad():
                    logits = self.heads[k](h)
            else:
                # With grad checkpointing this runs inside a checkpointed block's forward: the pass-through
                # saved-tensor hooks keep the head's tensors out of the checkpoint, and the backward recomputes
                # the stage's checkpointed blocks as any checkpoint backward would (the tap returns the same
                # detached tensor in the recompute, so the graphs match). The backward consumes the head's
                # graph at once, so the hooks' strong references to saved outputs cannot leak.
                with torch.autograd.graph.saved_tensors_hooks(_pass_through, _pass_through):
                    loss, logits = head_loss(self.heads[k], h, target)
                    backward_fn(loss)
                losses.append(loss.detach())
            stage_logits.append(logits.detach())

        self._check_checkpoint_mode(mode)
        if memory_efficient:
            self._run(x, on_stage=on_stage, stop_after=active[-1], keep=False)
            loss_vec = torch.stack(losses)
        else:   # heads run after the forward, outside any checkpointed region of the backbone
            stage_logits, loss_vec = self._stage_losses(self._run(x, stop_after=active[-1]), target, active)
        return HFFOutput(
            logits=self.predict_from_stages(stage_logits),
            stage_logits=stage_logits,
            stage_losses=list(loss_vec.detach().unbind(0)),
            loss=loss_vec.sum(),
            backward_done=memory_efficient,
            loss_vector=loss_vec,
        )


    def _stage_losses(self, outs: List[torch.Tensor], target: torch.Tensor, active: List[int]):
        """(every stage's detached logits, the active stages' losses as one vector) after a simultaneous forward: the
        active stages whose heads fuse are scored in one call (``_fused_head``), any other head on its own."""
        heads, logits = self.heads, [None] * len(outs)
        first = heads[active[0]]
        fused = [k for k in active if hasattr(first, 'fuses_with') and first.fuses_with(heads[k])]
        loss_of = {}
        if fused:
            vec, lg = fused_stage_losses([heads[k].project(outs[k]) for k in fused],
                                         [heads[k].prototypes for k in fused], target, first.scale, first.margin,
                                         first.num_prototypes)
            for k, l in zip(fused, lg.unbind(0)):
                logits[k] = l
            if len(fused) == len(active):
                loss_vec = vec
            else:
                loss_of.update(zip(fused, vec.unbind(0)))
        for k in range(len(outs)):
            if k in active and k not in fused:
                loss_of[k], logits[k] = head_loss(heads[k], outs[k], target)
            elif k not in active:
                with torch.no_grad():
                    logits[k] = heads[k](outs[k])
        if loss_of:
            loss_vec = torch.stack([loss_of[k] for k in active])
        return logits, loss_vec
