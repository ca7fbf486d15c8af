"""Balanced cuts: ``num_stages`` stages whose saved activations (``balance='memory'``), backbone time
(``balance='time'``) or whole training step (``balance='step'``) are as equal as the backbone's block boundaries allow.

timm's one-stage-per-level cut leaves most of a CNN's activations in its first, full-resolution stage, and that stage
sets the peak of ``memory_efficient`` training (only one stage's graph is alive at a time) and the pace of a stage
pipeline (the slowest stage caps throughput). Cutting at block boundaries instead (every child block of a level, as
``stage_indices`` accepts them) and choosing the cuts that minimise the largest stage fixes both.

The costs are measured once, at build time, on a probe batch: bytes of the tensors autograd saves for backward in
each block (memory), or each block's forward wall time with the backward's shared in proportion (time, the median of
a few rounds), or each block's training step and the head each boundary would carry (step: ``_step_cost``, what a
stage process spends; a group costs its blocks plus the head at its end). The chosen cut is written into
``stage_indices``, so a saved model rebuilds the same cut without measuring again (a timing-based cut would otherwise
differ from run to run).
"""
import copy
import time
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._config import HFFConfig
from ._stages import SplitError, family_of, finish_order, hookable, plain_container, resolve_name

__all__ = ['Cut', 'STEP_BATCH', 'balance_cuts', 'candidate_cuts', 'stage_costs']

Cut = Union[int, str]
STEP_BATCH = 32   # balance='step' without balance_batch: small enough to probe quickly, big enough to be compute-bound


def candidate_cuts(backbone: nn.Module) -> List[Cut]:
    """Every place a stage may end, in forward order: timm's ``feature_info`` taps (indices) and, inside each level,
    the end of every child block (names: ``'layer1.0'``, ``'stages.2.blocks.3'``, ``'blocks.5'``)."""
    info = backbone.feature_info
    cuts: Dict[str, Cut] = {}
    for i, f in enumerate(info):
        level = resolve_name(backbone, f['module'])
        if level is None:
            raise SplitError(f"timm family '{family_of(backbone)}': feature_info names module '{f['module']}', which "
                             f"is not in the model, so it cannot be cut")
        module = backbone.get_submodule(level)
        blocks, prefix = None, level
        if plain_container(module):
            blocks = module
        elif isinstance(getattr(module, 'blocks', None), (nn.Sequential, nn.ModuleList)):
            blocks, prefix = module.blocks, f'{level}.blocks'
        for child, _ in (blocks.named_children() if blocks is not None else ()):
            name = f'{prefix}.{child}'
            cuts.setdefault(hookable(backbone, name), name)
        cuts[hookable(backbone, level)] = i   # the level's end is timm's own tap
    return [c for _, c in sorted(cuts.items(), key=lambda kv: finish_order(backbone, kv[0]))]


def _segment_costs(backbone: nn.Module, cuts: Sequence[Cut], x: torch.Tensor, kind: str, rounds: int = 2
                   ) -> List[float]:
    """Cost of each piece of the backbone between consecutive cuts (the last piece ends at the last cut)."""
    names = [hookable(backbone, backbone.feature_info[c]['module'] if isinstance(c, int) else c) for c in cuts]
    index = {name: k for k, name in enumerate(names)}
    state = dict(segment=0)
    costs = [0.0] * len(cuts)
    seen = set()
    marks: List[float] = []

    def after(module, args, output):
        k = index[module_names[module]]
        if kind == 'time':
            marks.append(time.perf_counter())
        state['segment'] = k + 1

    def pack(t: torch.Tensor):
        if t.is_leaf and t.requires_grad:   # a weight: in memory anyway, not an activation
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen and state['segment'] < len(costs):
            seen.add(key)
            costs[state['segment']] += t.numel() * t.element_size()
        return t

    module_names = {backbone.get_submodule(n): n for n in names}
    handles = [backbone.get_submodule(n).register_forward_hook(after) for n in names]
    was_training = backbone.training
    backbone.train()
    try:
        if kind == 'memory':
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                backbone.forward_features(x)
            return costs
        rounds_out = []
        for _ in range(rounds + 1):   # the first round warms up
            marks.clear()
            state['segment'] = 0
            start = time.perf_counter()
            with torch.enable_grad():
                out = backbone.forward_features(x)
            ends = marks[:len(cuts)]
            forward = [b - a for a, b in zip([start] + ends[:-1], ends)]
            out.float().mean().backward()   # backward costs ~ its forward; measured in total, shared by forward share
            total_bwd = time.perf_counter() - (ends[-1] if ends else start)
            fwd_sum = sum(forward) or 1.0
            rounds_out.append([f + total_bwd * f / fwd_sum for f in forward])
            backbone.zero_grad(set_to_none=True)
        return [sorted(r[k] for r in rounds_out[1:])[len(rounds_out[1:]) // 2] for k in range(len(cuts))]
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)


def _partition(costs: Sequence[float], k: int, end_costs: Optional[Sequence[float]] = None) -> List[int]:
    """Indices of the last piece of each of ``k`` contiguous groups minimising the largest group's cost (exact DP): the
    sum of its pieces, plus ``end_costs[i]`` when the group ends at piece ``i`` (the head a stage ending there
    carries)."""
    n = len(costs)
    ends_at = list(end_costs) if end_costs is not None else [0.0] * n
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float('inf')
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for i in range(g, n + 1):
            for j in range(g - 1, i):
                v = max(best[g - 1][j], prefix[i] - prefix[j] + ends_at[i - 1])
                if v < best[g][i]:
                    best[g][i], back[g][i] = v, j
    ends, i = [], n
    for g in range(k, 0, -1):
        ends.append(i - 1)
        i = back[g][i]
    return sorted(ends)


def balance_cuts(backbone: nn.Module, cfg: HFFConfig, in_chans: int, img_size: int, num_classes: int = 10
                 ) -> List[Cut]:
    """The ``cfg.num_stages`` cuts (``stage_indices`` entries) that balance ``cfg.balance`` over the backbone's blocks.

    The last cut is always the backbone's last tap (the full network is kept)."""
    cuts = candidate_cuts(backbone)
    if cfg.num_stages > len(cuts):
        raise ValueError(f'num_stages={cfg.num_stages} with balance={cfg.balance!r}, but '
                         f'{type(backbone).__name__} has only {len(cuts)} block boundaries to cut at')
    if cfg.balance == 'step':
        from ._step_cost import step_costs
        blocks, heads = step_costs(backbone, cfg, cuts, in_chans, img_size, cfg.balance_batch or STEP_BATCH,
                                   num_classes, channels_last=cfg.balance_channels_last)
        return [cuts[i] for i in _partition(blocks, cfg.num_stages, heads)]
    x = torch.randn(cfg.balance_batch or (4 if cfg.balance == 'time' else 2), in_chans, img_size, img_size,
                    device=next(backbone.parameters()).device)
    if cfg.balance == 'time' and cfg.balance_channels_last:   # on a copy: the model keeps its own layout
        backbone, x = copy.deepcopy(backbone).to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    costs = _segment_costs(backbone, cuts, x, cfg.balance)
    return [cuts[i] for i in _partition(costs, cfg.num_stages)]


def stage_costs(backbone: nn.Module, cuts: Sequence[Cut], in_chans: int, img_size: int, kind: str = 'memory'
                ) -> List[float]:
    """Saved-activation bytes (or step seconds) per stage of an explicit cut, for reports and tests."""
    x = torch.randn(2 if kind == 'memory' else 8, in_chans, img_size, img_size,
                    device=next(backbone.parameters()).device)
    return _segment_costs(backbone, list(cuts), x, kind)
