"""Fitting the early-exit thresholds of ``predict_from='adaptive'`` on held-out data.

Every stage's logits are collected once over the validation loader (one full forward per batch), so any setting of
the thresholds can be scored exactly, without running the model again: an image's exit is the first stage whose
confidence passes that stage's threshold (``_exit_rule``), its prediction that stage's, its cost the FLOPs of the
stages it went through (``_profile.exit_flops``). The search descends greedily from "never exit early" (every
threshold 1), each step lowering the one threshold whose move saves the most FLOPs per point of accuracy lost, as
long as accuracy stays within ``max_accuracy_drop`` points of the full model; with ``flops_budget`` it goes on until
the mean cost fits the budget, at the least accuracy lost per FLOP saved (MSDNet fits its exits the same way, on a
validation split under a budget).

A stage left at threshold 1 runs no head in the adaptive forward (nobody may leave there), so opening an exit costs
its head for every image that reaches it: on a model whose early heads cost as much as the stages between them, the
cheapest setting uses only some exits. The descent therefore runs once per set of open exits (every set for up to
``EXHAUSTIVE`` exits, else all of them open), each charged its heads from the start, and the best end point wins.
"""
import math
from dataclasses import asdict, dataclass, field
import itertools
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ._config import EXIT_RULES
from ._exit_rule import ExitRule, confidence, replay_exits, scored_stages
from ._model import HFFModel
from ._profile import exit_costs, exit_flops, full_cost, stage_profile

GRID = 200   # candidate thresholds per stage: quantiles of that stage's confidence on the calibration data
EXHAUSTIVE = 6   # up to this many early exits, every subset of them is tried as the set of open exits


@dataclass
class ExitStats:
    """Every stage's logits and the labels of a data set, and what each exit stage costs: enough to score any
    thresholds exactly."""
    stage_logits: List[torch.Tensor]      # per stage, (N, C) float32 on the CPU
    labels: torch.Tensor                  # (N,)
    exit_flops: List[int]                 # FLOPs per image of leaving after stage k
    full_flops: int                       # FLOPs per image of the full-depth prediction (predict_from='last')
    img_size: Tuple[int, int]
    stage_flops: Optional[List[int]] = None   # per stage: backbone FLOPs per image (None: every head is paid)
    head_flops: Optional[List[int]] = None    # per stage: its head's FLOPs per image

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_stages(self) -> int:
        return len(self.stage_logits)

    def correct(self) -> torch.Tensor:
        """(N, S) bool: stage k's prediction of image i is right."""
        return torch.stack([lg.argmax(-1) == self.labels for lg in self.stage_logits], 1)

    def confidences(self, rule: str) -> torch.Tensor:
        return torch.stack([confidence(lg, rule) for lg in self.stage_logits[:-1]], 1)

    def exits(self, rule: str = 'max_prob', thresholds: Optional[Sequence[float]] = None,
              patience: int = 2) -> torch.Tensor:
        """Each image's exit stage under a setting (the rule of the adaptive forward, replayed)."""
        return replay_exits(ExitRule(rule, self.num_stages, thresholds, patience), self.stage_logits)[1]

    def costs(self, rule: str = 'max_prob', thresholds: Optional[Sequence[float]] = None) -> List[int]:
        """FLOPs per image of leaving after each stage under a setting: the heads of stages at threshold 1 are not
        run (``_exit_rule.scored_stages``)."""
        if self.stage_flops is None or self.head_flops is None:
            return list(self.exit_flops)
        return exit_costs(self.stage_flops, self.head_flops, scored_stages(rule, self.num_stages, thresholds))

    def point(self, rule: str = 'max_prob', thresholds: Optional[Sequence[float]] = None,
              patience: int = 2) -> Dict[str, Any]:
        """``score`` of a setting: its exits, at its own cost."""
        return self.score(self.exits(rule, thresholds, patience), self.costs(rule, thresholds))

    def score(self, exit_stage: torch.Tensor, costs: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """Top-1 (%), mean FLOPs per image and the share leaving at each stage, for given exit stages (``costs``:
        FLOPs of leaving after each stage; default every head paid, ``exit_flops``)."""
        n = max(self.num_images, 1)
        correct = self.correct().gather(1, exit_stage.view(-1, 1)).sum().item()
        costs = torch.tensor(self.exit_flops if costs is None else costs, dtype=torch.float64)
        mean_flops = costs[exit_stage].mean().item() if self.num_images else 0.0
        counts = torch.bincount(exit_stage, minlength=self.num_stages).tolist()
        return dict(top1=100.0 * correct / n, mean_flops=mean_flops, flops_ratio=mean_flops / self.full_flops,
                    exit_shares=[c / n for c in counts])

    def full_top1(self) -> float:
        """Top-1 (%) of the last stage, from the count (a float32 mean is off in the 6th digit, enough to put an
        exact 0.2-point drop on the wrong side of a 0.2 bound)."""
        return 100.0 * int(self.correct()[:, -1].sum()) / max(self.num_images, 1)


@dataclass
class ExitCalibration:
    """The fitted setting and its operating point on the calibration data."""
    rule: str
    thresholds: Optional[Tuple[float, ...]]
    patience: Optional[int]
    top1: float                  # adaptive top-1 (%) on the calibration data
    full_top1: float             # top-1 (%) of the full-depth prediction (the last stage)
    mean_flops: float            # FLOPs per image, adaptive
    full_flops: int              # FLOPs per image, full depth
    flops_ratio: float           # mean_flops / full_flops
    exit_shares: List[float]     # share of images leaving at each stage
    images: int
    target: Dict[str, float] = field(default_factory=dict)   # max_accuracy_drop or flops_budget

    def metrics(self, prefix: str = 'adaptive_') -> Dict[str, Any]:
        """Flat figures for metrics.json and the model card."""
        return {f'{prefix}top1': self.top1, f'{prefix}mean_mflops': self.mean_flops / 1e6,
                f'{prefix}full_mflops': self.full_flops / 1e6, f'{prefix}flops_ratio': self.flops_ratio}

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['thresholds'] = list(self.thresholds) if self.thresholds is not None else None
        return d

    def describe(self) -> str:
        setting = (f'patience {self.patience}' if self.rule == 'patience'
                   else 'thresholds ' + ', '.join(f'{t:.4g}' for t in self.thresholds))
        shares = ' / '.join(f'{s:.0%}' for s in self.exit_shares)
        return (f'adaptive exit ({self.rule}, {setting}): top-1 {self.top1:.2f}% vs {self.full_top1:.2f}% at full '
                f'depth, {self.mean_flops / 1e6:.2f} vs {self.full_flops / 1e6:.2f} MFLOPs per image '
                f'({self.flops_ratio:.2f}x); exits per stage {shares}')


@torch.no_grad()
def exit_stats(model: HFFModel, loader: Iterable, gather: Optional[Callable] = None) -> ExitStats:
    """Every stage's logits over ``loader`` (batches of ``(images, labels)`` ready for the model), one forward each.
    ``gather`` maps each batch's ``(logits (B, S, C), labels)`` to all processes' (``accelerator.gather_for_metrics``),
    so every process fits the same thresholds on the whole split."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits: List[List[torch.Tensor]] = [[] for _ in range(model.num_stages)]
    labels: List[torch.Tensor] = []
    size = None
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f'calibrate_exits needs a loader of (images, labels) batches, got a batch of type '
                                 f'{type(batch).__name__}')
            x, y = batch[0], batch[1]
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise ValueError(f'calibrate_exits needs (images, labels) tensors, got ({type(x).__name__}, '
                                 f'{type(y).__name__})')
            if x.shape[0] == 0:
                continue
            size = size or tuple(x.shape[-2:])
            stacked, y = torch.stack(model.forward_stages(x.to(device)), 1).float(), y.view(-1).to(device).long()
            if gather is not None:
                stacked, y = gather((stacked, y))
            for k in range(model.num_stages):
                logits[k].append(stacked[:, k].cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError('the calibration loader yielded no images; pass the validation split (batches of (images, '
                         'labels) ready for the model)')
    rows = stage_profile(model, size)   # once: every cost below derives from it
    stage, heads = [r['flops'] for r in rows], [r['head_flops'] for r in rows]
    return ExitStats([torch.cat(lg) for lg in logits], torch.cat(labels), exit_costs(stage, heads), full_cost(rows),
                     size, stage_flops=stage, head_flops=heads)


def calibrate_exits(model: HFFModel, loader: Iterable, max_accuracy_drop: Optional[float] = None,
                    flops_budget: Optional[float] = None, rule: Optional[str] = None) -> ExitCalibration:
    """Fit the early-exit setting on validation data and store it in the model (``exit_thresholds``, saved in
    config.json); ``model.set_predict_from('adaptive')`` then predicts with it.

    Args:
        model: An HFFModel.
        loader: Validation batches ``(images, labels)``, ready for the model (normalised, on any device).
        max_accuracy_drop: Top-1 points the adaptive prediction may lose against the full-depth one on this data
            (default 0.2); the setting with the fewest FLOPs within it is chosen.
        flops_budget: Instead: mean FLOPs per image to stay within (see ``timm_hff._profile.exit_flops``); the
            setting with the least accuracy loss that fits is chosen.
        rule: 'max_prob' (default: the model's ``exit_rule``), 'entropy' or 'patience' (fits ``exit_patience``).

    Returns:
        The fitted setting and its operating point on ``loader`` (``.describe()`` for one line).
    """
    _check_target(model, max_accuracy_drop, flops_budget, rule)   # before the (long) pass over the data
    return fit_exits(model, exit_stats(model, loader), max_accuracy_drop, flops_budget, rule)


def fit_exits(model: HFFModel, stats: ExitStats, max_accuracy_drop: Optional[float] = None,
              flops_budget: Optional[float] = None, rule: Optional[str] = None) -> ExitCalibration:
    """``calibrate_exits`` on logits already collected (``exit_stats``; the trainer gathers them over processes)."""
    max_accuracy_drop, rule = _check_target(model, max_accuracy_drop, flops_budget, rule)
    if flops_budget is not None and flops_budget < stats.exit_flops[0]:   # the data's size may differ
        raise ValueError(f'flops_budget={flops_budget:.4g} is below the cost of stage 1 alone '
                         f'({stats.exit_flops[0]:.4g} FLOPs per image at {stats.img_size[0]}x{stats.img_size[1]}), '
                         f'which every image pays; raise the budget')
    if rule == 'patience':
        patience, thresholds = _fit_patience(stats, max_accuracy_drop, flops_budget), None
        point = stats.point('patience', patience=patience)
        model.set_exits(rule='patience', patience=patience)
    else:
        thresholds, patience = _fit_thresholds(stats, rule, max_accuracy_drop, flops_budget), None
        point = stats.point(rule, thresholds)
        model.set_exits(thresholds=thresholds, rule=rule)
    target = dict(max_accuracy_drop=max_accuracy_drop) if flops_budget is None else dict(flops_budget=flops_budget)
    return ExitCalibration(rule=rule, thresholds=thresholds, patience=patience, top1=point['top1'],
                           full_top1=stats.full_top1(), mean_flops=point['mean_flops'], full_flops=stats.full_flops,
                           flops_ratio=point['flops_ratio'], exit_shares=point['exit_shares'],
                           images=stats.num_images, target=target)


def _check_target(model: HFFModel, max_accuracy_drop: Optional[float], flops_budget: Optional[float],
                  rule: Optional[str]) -> Tuple[Optional[float], str]:
    """(max_accuracy_drop with its default, rule), or a one-line error for a setting that cannot be met."""
    if max_accuracy_drop is not None and flops_budget is not None:
        raise ValueError('give max_accuracy_drop or flops_budget, not both: the search keeps accuracy within the '
                         'drop at the fewest FLOPs, or fits the budget at the least accuracy lost')
    if max_accuracy_drop is None and flops_budget is None:
        max_accuracy_drop = 0.2
    if max_accuracy_drop is not None and (not _is_number(max_accuracy_drop) or not max_accuracy_drop >= 0):
        raise ValueError(f'max_accuracy_drop is in top-1 points and must be >= 0 (e.g. 0.2), got '
                         f'{max_accuracy_drop!r}')
    if flops_budget is not None and (not _is_number(flops_budget) or not flops_budget > 0):
        raise ValueError(f'flops_budget is mean FLOPs per image and must be > 0, got {flops_budget!r}')
    rule = rule or model.hff_cfg.exit_rule
    if rule not in EXIT_RULES:
        raise ValueError(f'rule must be one of {list(EXIT_RULES)}, got {rule!r}')
    if flops_budget is not None:
        cost1 = exit_flops(model)[0]
        if flops_budget < cost1:
            raise ValueError(f'flops_budget={flops_budget:.4g} is below the cost of stage 1 alone ({cost1:.4g} FLOPs '
                             f'per image at {model.split.probe_img_size} px), which every image pays; raise the '
                             f'budget')
    return max_accuracy_drop, rule


def _fit_thresholds(stats: ExitStats, rule: str, max_drop: Optional[float],
                    budget: Optional[float]) -> Tuple[float, ...]:
    """The best end point of a greedy descent per set of open exits (see the module docstring)."""
    n = stats.num_stages
    if n == 1:
        return ()
    conf = stats.confidences(rule)                                # (N, n-1)
    correct = stats.correct()                                     # (N, n)
    levels = torch.linspace(1, 0, GRID + 1, dtype=torch.float64)
    grids = [[1.0] + [t for t in torch.quantile(conf[:, k].double(), levels).unique().flip(0).tolist()
                      if 0 < t < 1] for k in range(n - 1)]
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
        got = _descend(stats, rule, conf, correct, grids, opened, floor, limit)
        if got is not None and _better(got, best, floor, limit):
            best = got
    return tuple(float(grids[k][best[0][k]]) for k in range(n - 1))


def _better(a, b, floor: float, limit: Optional[float]) -> bool:
    """Is end point ``a`` (positions, correct, total cost) better than ``b``: without a budget the cheaper one within
    the accuracy floor; with one, the more accurate one within the budget (else the cheaper)."""
    if limit is None:
        return a[1] >= floor and (a[2], -a[1]) < (b[2], -b[1])
    fits_a, fits_b = a[2] <= limit, b[2] <= limit
    if fits_a != fits_b:
        return fits_a
    return (-a[1], a[2]) < (-b[1], b[2]) if fits_a else a[2] < b[2]


def _descend(stats: ExitStats, rule: str, conf: torch.Tensor, correct: torch.Tensor, grids: List[List[float]],
             opened: Sequence[int], floor: float, limit: Optional[float]):
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
    return pos, cur_correct, cur_cost


def _fit_patience(stats: ExitStats, max_drop: Optional[float], budget: Optional[float]) -> int:
    """The smallest patience within the accuracy drop; with a budget, the largest (most accurate) that fits it."""
    points = [(p, stats.point('patience', patience=p)) for p in range(1, stats.num_stages + 1)]
    if budget is None:
        floor = stats.full_top1() - max_drop - 1e-9
        return min([p for p, s in points if s['top1'] >= floor], default=stats.num_stages)
    return max([p for p, s in points if s['mean_flops'] <= budget], default=1)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
