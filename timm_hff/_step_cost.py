"""What one training step of every candidate stage costs: its blocks, its head, their backward and optimizer step.

``balance='time'`` timed the backbone alone (forward, with the backward shared out by forward share), which misses
what a stage process actually spends: an intermediate stage's head (its aux block, projection and loss, forward and
backward, on the stage output's resolution), and an AdamW step over every parameter it owns. Those are per-stage
costs that do not scale with the blocks' FLOPs, so the time balancer chose cuts whose step times were 2x apart.

This measures them on a throw-away copy of the backbone cut at *every* candidate boundary, with a real prototype head
at each (the one that boundary would get as a stage end), in ``memory_efficient`` order: each stage's forward, its
head's loss and backward run before the next stage starts, so the wall time between consecutive stage ends is that
stage's whole step. Inside it the head's share is timed on its own (its backward stops at a detached copy of the
stage output), so a block run and the head at a boundary are separate costs: a group of blocks costs the sum of its
blocks plus the head at its end. The optimizer step is timed per block and per head, each with its own AdamW.
"""
import copy
import dataclasses
import statistics
import time
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from ._config import HFFConfig
from ._cuts import run_stages
from ._model import HFFModel
from ._probe import probe_split
from ._stages import build_split

__all__ = ['step_costs']


def step_costs(backbone: nn.Module, cfg: HFFConfig, cuts: Sequence, in_chans: int, img_size: int, batch: int,
               num_classes: int, rounds: int = 3, channels_last: bool = False) -> Tuple[List[float], List[float]]:
    """(block costs, head costs), seconds per training step at ``batch``: block ``i`` is the backbone between cut
    ``i - 1`` and cut ``i`` (forward, backward, AdamW), head ``i`` the prototype head a stage ending at cut ``i``
    would carry (the same three). The median over ``rounds`` after one warm-up round; ``channels_last``: model and
    batch in that memory format, as a run that trains in it."""
    probe = copy.deepcopy(backbone).train()
    pcfg = dataclasses.replace(cfg, stage_indices=tuple(cuts), balance=None, check_split=False)
    split = build_split(probe, pcfg)
    probe_split(probe, split, in_chans, img_size, check=False)
    model = HFFModel(probe, split, max(num_classes, 2), pcfg, in_chans).train()
    device = next(probe.parameters()).device
    x = torch.randn(batch, in_chans, img_size, img_size, device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    params = dict(probe.named_parameters())
    block_opts = [_adamw([params[n] for n in names]) for names in split.stage_param_names]
    head_opts = [_adamw(list(h.parameters())) for h in model.heads]
    blocks: List[List[float]] = [[] for _ in cuts]
    heads: List[List[float]] = [[] for _ in cuts]
    for r in range(rounds + 1):   # the first round warms up (allocator, kernels' first calls)
        marks: List[float] = []
        spent = [0.0] * len(cuts)

        def on_stage(k: int, h: torch.Tensor) -> None:
            t = time.perf_counter()
            held = h.detach().requires_grad_(h.requires_grad)
            loss, _ = model.heads[k].forward_loss(held, y)
            loss.backward()
            spent[k] = time.perf_counter() - t
            if h.requires_grad and held.grad is not None:   # the blocks' backward, from the head's gradient
                h.backward(held.grad)
            marks.append(time.perf_counter())

        start = time.perf_counter()
        run_stages(probe, split, x, on_stage=on_stage, keep=False)
        block_steps = [b - a - s for a, b, s in zip([start] + marks[:-1], marks, spent)]
        for k in range(len(cuts)):
            block_steps[k] += _timed(block_opts[k])
            spent[k] += _timed(head_opts[k])
        model.zero_grad(set_to_none=True)
        if r:
            for k in range(len(cuts)):
                blocks[k].append(block_steps[k])
                heads[k].append(spent[k])
    return [statistics.median(b) for b in blocks], [statistics.median(h) for h in heads]


def _adamw(params: List[nn.Parameter]):
    """AdamW as timm's ``create_optimizer_v2('adamw')`` builds it by default (torch's, foreach where it can)."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0) if params else None


def _timed(opt) -> float:
    """Seconds of one optimizer step (none for a piece without trainable parameters)."""
    if opt is None:
        return 0.0
    t = time.perf_counter()
    opt.step()
    return time.perf_counter() - t
