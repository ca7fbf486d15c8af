"""The greedy search for early-exit settings on collected logits (``_exit.ExitStats``): the best fit to the images at
hand, and the path of settings Learn-then-Test orders its tests by.

The search descends greedily from "never exit early" (every threshold 1), each step lowering the one threshold whose
move saves the most FLOPs per point of accuracy lost, as long as accuracy stays within ``max_accuracy_drop`` points of
the full model; with ``flops_budget`` it goes on until the mean cost fits the budget, at the least accuracy lost per
FLOP saved (MSDNet fits its exits the same way, on a validation split under a budget). A stage left at threshold 1
runs no head, so the descent runs once per set of open exits (every set for up to ``EXHAUSTIVE`` exits, else all of
them open), each charged its heads from the start, and the best end point wins.
"""
import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ['EXHAUSTIVE', 'GRID', 'descend', 'fit_patience', 'fit_thresholds', 'search_space']

GRID = 200   # candidate thresholds per stage: quantiles of that stage's confidence on the calibration data
EXHAUSTIVE = 6   # up to this many early exits, every subset of them is tried as the set of open exits


def fit_thresholds(stats, rule: str, max_drop: Optional[float],
                    budget: Optional[float]) -> Tuple[float, ...]:
    """The best end point of a greedy descent per set of open exits (see the module docstring)."""
    n = stats.num_stages
    if n == 1:
        return ()
    conf, correct, grids = search_space(stats, rule)
    full_correct = int(correct[:, -1].sum())
    floor = full_correct - (max_drop or 0) / 100 * stats.num_images - 1e-9
    limit = None if budget is None else budget * stats.num_images
    exits = [k for k in range(n - 1) if len(grids[k]) > 1]
    if stats.stage_flops is None or len(exits) > EXHAUSTIVE:
        open_sets = [tuple(exits)] if exits else []
    else:
        open_sets = [c for r in range(1, len(exits) + 1) for c in itertools.combinations(exits, r)]
    all_closed = [0] * (n - 1)
    best = (all_closed, full_correct, float(stats.costs(rule, [1.0] * (n - 1))[-1]) * stats.num_images)
    for opened in open_sets:
        got = descend(stats, rule, conf, correct, grids, opened, floor, limit)
        if got is not None and _better(got, best, floor, limit):
            best = got
    return tuple(float(grids[k][best[0][k]]) for k in range(n - 1))


def search_space(stats, rule: str):
    """(confidences (N, n-1), correctness (N, n), per early stage its candidate thresholds: 1, then quantiles of its
    confidence from high to low)."""
    conf = stats.confidences(rule)
    levels = torch.linspace(1, 0, GRID + 1, dtype=torch.float64)
    grids = [[1.0] + [t for t in torch.quantile(conf[:, k].double(), levels).unique().flip(0).tolist()
                      if 0 < t < 1] for k in range(stats.num_stages - 1)]
    return conf, stats.correct(), grids


def _better(a, b, floor: float, limit: Optional[float]) -> bool:
    """Is end point ``a`` (positions, correct, total cost) better than ``b``: without a budget the cheaper one within
    the accuracy floor; with one, the more accurate one within the budget (else the cheaper)."""
    if limit is None:
        return a[1] >= floor and (a[2], -a[1]) < (b[2], -b[1])
    fits_a, fits_b = a[2] <= limit, b[2] <= limit
    if fits_a != fits_b:
        return fits_a
    return (-a[1], a[2]) < (-b[1], b[2]) if fits_a else a[2] < b[2]


def descend(stats, rule: str, conf: torch.Tensor, correct: torch.Tensor, grids: List[List[float]],
             opened: Sequence[int], floor: float, limit: Optional[float], steps: Optional[List[List[int]]] = None):
    """Greedy descent with the exits ``opened`` open (their heads charged from the start, the rest at 1): each step
    lowers the open threshold that saves the most FLOPs per image right lost. (positions, correct, total cost), or
    None when even the first step below 1 breaks the accuracy floor."""
    n = stats.num_stages
    thresholds = [1.0 if k not in opened else grids[k][1] for k in range(n - 1)]
    costs = torch.tensor(stats.costs(rule, thresholds), dtype=torch.float64)

    def score(p: List[int]) -> Tuple[int, float]:
        t = torch.tensor([grids[k][p[k]] for k in range(n - 1)], dtype=torch.float32)
        leave = (conf >= t) & (t < 1)
        leave = torch.cat([leave, torch.ones(leave.shape[0], 1, dtype=torch.bool)], 1)
        exit_stage = leave.to(torch.uint8).argmax(1)
        return int(correct.gather(1, exit_stage.view(-1, 1)).sum()), costs[exit_stage].sum().item()

    pos = [1 if k in opened else 0 for k in range(n - 1)]
    cur_correct, cur_cost = score(pos)
    if limit is None and cur_correct < floor:
        return None
    while limit is None or cur_cost > limit:
        best = None
        for k in opened:
            if pos[k] + 1 >= len(grids[k]):
                continue
            trial = pos[:k] + [pos[k] + 1] + pos[k + 1:]
            c, cost = score(trial)
            saved, lost = cur_cost - cost, cur_correct - c
            if limit is None and c < floor:
                continue
            key = (saved / lost if lost > 0 else math.inf, saved)
            if best is None or key > best[0]:
                best = (key, trial, c, cost)
        if best is None:
            break
        _, pos, cur_correct, cur_cost = best
        if steps is not None:   # the path, for Learn-then-Test's ordering (``_threshold_path``)
            steps.append(list(pos))
    return pos, cur_correct, cur_cost


def fit_patience(stats, max_drop: Optional[float], budget: Optional[float]) -> int:
    """The smallest patience within the accuracy drop; with a budget, the largest (most accurate) that fits it."""
    points = [(p, stats.point('patience', patience=p)) for p in range(1, stats.num_stages + 1)]
    if budget is None:
        floor = stats.full_top1() - max_drop - 1e-9
        return min([p for p, s in points if s['top1'] >= floor], default=stats.num_stages)
    return max([p for p, s in points if s['mean_flops'] <= budget], default=1)
