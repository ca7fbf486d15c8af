"""Choosing the early-exit setting of ``predict_from='adaptive'`` on held-out data.

Every stage's logits are collected once over the validation loader (one full forward per batch), so any setting of
the thresholds can be scored exactly, without running the model again: an image's exit is the first stage whose
confidence passes that stage's threshold (``_exit_rule``), its prediction that stage's, its cost the FLOPs of the
stages it went through (``_profile.exit_flops``). ``_exit_search`` walks the settings greedily; ``calibrate_exits``
picks among them with a Learn-then-Test guarantee on new data (``_exit_guarantee``), ``best_fit_exits`` picks the
one that fits these images best (no guarantee: issue 36 measured its drop out of sample from below zero to 1.26
points for a 0.2-point bound).
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ._config import EXIT_RULES
from ._exit_guarantee import guarantee_record, min_calibration_images, ordered_split, select_by_testing
from ._exit_search import descend, fit_patience, fit_thresholds, search_space
from ._exit_rule import ExitRule, confidence, replay_exits, scored_stages
from ._model import HFFModel
from ._profile import exit_costs, exit_flops, full_cost, stage_profile

__all__ = ['DEFAULT_CONFIDENCE', 'ExitCalibration', 'ExitStats', 'best_fit_exits', 'calibrate_exits', 'exit_stats',
           'fit_exits']

DEFAULT_CONFIDENCE = 0.9   # of calibrate_exits' guarantee: the drop bound holds with this probability


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

    def subset(self, index: torch.Tensor) -> 'ExitStats':
        """The same statistics over some of the images (``index``), in that order."""
        return ExitStats([lg[index] for lg in self.stage_logits], self.labels[index], self.exit_flops, self.full_flops,
                         self.img_size, self.stage_flops, self.head_flops)

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
    guarantee: Optional[Dict[str, Any]] = None   # the Learn-then-Test record (``_exit_guarantee``); None: a fit

    def metrics(self, prefix: str = 'adaptive_') -> Dict[str, Any]:
        """Flat figures for metrics.json and the model card."""
        out = {f'{prefix}top1': self.top1, f'{prefix}mean_mflops': self.mean_flops / 1e6,
               f'{prefix}full_mflops': self.full_flops / 1e6, f'{prefix}flops_ratio': self.flops_ratio}
        if self.guarantee:   # the promise travels with the thresholds (config.json, the model card)
            out.update({f'{prefix}guaranteed_max_drop': self.guarantee['max_accuracy_drop'],
                        f'{prefix}guarantee_confidence': self.guarantee['confidence']})
        return out

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['thresholds'] = list(self.thresholds) if self.thresholds is not None else None
        return d

    def describe(self) -> str:
        setting = (f'patience {self.patience}' if self.rule == 'patience'
                   else 'thresholds ' + ', '.join(f'{t:.4g}' for t in self.thresholds))
        shares = ' / '.join(f'{s:.0%}' for s in self.exit_shares)
        g = self.guarantee
        promise = (f"; guaranteed: drop <= {g['max_accuracy_drop']:g} points on new data with probability >= "
                   f"{g['confidence']:g} over the draw of these {g['calibration_images']} calibration images" if g
                   else '; fitted to these images (no out-of-sample guarantee)')
        return (f'adaptive exit ({self.rule}, {setting}): top-1 {self.top1:.2f}% vs {self.full_top1:.2f}% at full '
                f'depth, {self.mean_flops / 1e6:.2f} vs {self.full_flops / 1e6:.2f} MFLOPs per image '
                f'({self.flops_ratio:.2f}x) on the calibration images; exits per stage {shares}{promise}')


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
                    flops_budget: Optional[float] = None, rule: Optional[str] = None,
                    confidence: Optional[float] = DEFAULT_CONFIDENCE) -> ExitCalibration:
    """Choose the early-exit setting on validation data, with a guarantee, and store it in the model
    (``exit_thresholds``, saved in config.json); ``model.set_predict_from('adaptive')`` then predicts with it.

    With ``max_accuracy_drop`` (the default), the choice is a Learn-then-Test one (``_exit_guarantee``): on new images
    from the same distribution, the adaptive prediction's expected top-1 loss against full depth exceeds
    ``max_accuracy_drop`` with probability at most ``1 - confidence`` over the draw of the calibration images. Too few
    images for that is refused, saying how many are needed. ``best_fit_exits`` is the plain fit to the images.

    Args:
        model: An HFFModel.
        loader: Validation batches ``(images, labels)``, ready for the model (normalised, on any device).
        max_accuracy_drop: Top-1 points the adaptive prediction may lose against the full-depth one (default 0.2);
            the cheapest setting certified within it is chosen.
        flops_budget: Instead: mean FLOPs per image to stay within (see ``timm_hff._profile.exit_flops``); the
            setting with the least accuracy loss that fits is chosen: a fit, with no accuracy guarantee.
        rule: 'max_prob' (default: the model's ``exit_rule``), 'entropy' or 'patience' (fits ``exit_patience``).
        confidence: 1 - epsilon of the guarantee (default 0.9); None fits without one (``best_fit_exits``).

    Returns:
        The chosen setting, its operating point on ``loader`` and the guarantee (``.describe()`` for one line).
    """
    _check_target(model, max_accuracy_drop, flops_budget, rule, confidence)   # before the (long) pass over the data
    return fit_exits(model, exit_stats(model, loader), max_accuracy_drop, flops_budget, rule, confidence)


def best_fit_exits(model: HFFModel, loader: Iterable, max_accuracy_drop: Optional[float] = None,
                   flops_budget: Optional[float] = None, rule: Optional[str] = None) -> ExitCalibration:
    """The setting that fits ``loader`` best: the fewest FLOPs whose drop on these very images is within
    ``max_accuracy_drop`` (or the least drop within ``flops_budget``). A fit, not a guarantee: on new images the drop
    varies with the draw, from below zero to several times the bound (``calibrate_exits`` bounds it)."""
    return calibrate_exits(model, loader, max_accuracy_drop, flops_budget, rule, confidence=None)


def fit_exits(model: HFFModel, stats: ExitStats, max_accuracy_drop: Optional[float] = None,
              flops_budget: Optional[float] = None, rule: Optional[str] = None,
              confidence: Optional[float] = None) -> ExitCalibration:
    """``calibrate_exits`` (``confidence`` given) or ``best_fit_exits`` (None) on logits already collected
    (``exit_stats``; the trainer gathers them over processes)."""
    max_accuracy_drop, rule = _check_target(model, max_accuracy_drop, flops_budget, rule, confidence)
    if flops_budget is not None and flops_budget < stats.exit_flops[0]:   # the data's size may differ
        raise ValueError(f'flops_budget={flops_budget:.4g} is below the cost of stage 1 alone '
                         f'({stats.exit_flops[0]:.4g} FLOPs per image at {stats.img_size[0]}x{stats.img_size[1]}), '
                         f'which every image pays; raise the budget')
    guaranteed = confidence is not None and flops_budget is None
    if guaranteed:
        setting, guarantee = _certified(stats, rule, max_accuracy_drop, confidence)
    else:
        guarantee = None
        setting = (fit_patience(stats, max_accuracy_drop, flops_budget) if rule == 'patience'
                   else fit_thresholds(stats, rule, max_accuracy_drop, flops_budget))
    if rule == 'patience':
        thresholds, patience = None, setting
        point = stats.point('patience', patience=patience)
        model.set_exits(rule='patience', patience=patience)
    else:
        thresholds, patience = setting, None
        point = stats.point(rule, thresholds)
        model.set_exits(thresholds=thresholds, rule=rule)
    target = dict(max_accuracy_drop=max_accuracy_drop) if flops_budget is None else dict(flops_budget=flops_budget)
    return ExitCalibration(rule=rule, thresholds=thresholds, patience=patience, top1=point['top1'],
                           full_top1=stats.full_top1(), mean_flops=point['mean_flops'], full_flops=stats.full_flops,
                           flops_ratio=point['flops_ratio'], exit_shares=point['exit_shares'],
                           images=stats.num_images, target=target, guarantee=guarantee)


def _certified(stats: ExitStats, rule: str, max_drop: float, confidence: float):
    """(setting, guarantee record): Learn-then-Test over the greedy descent's path (``_exit_guarantee``)."""
    epsilon, delta = 1 - confidence, max_drop / 100
    need = min_calibration_images(delta, epsilon)
    if stats.num_images < need:
        raise ValueError(f'a guarantee that adaptive exit loses at most {max_drop:g} top-1 points with confidence '
                         f'{confidence:g} needs at least {need} calibration images, got {stats.num_images}: give more '
                         f'validation images, a larger max_accuracy_drop or a lower confidence (or best_fit_exits '
                         f'for a fit without a guarantee)')
    order, test = ordered_split(stats.num_images)
    fit, held = stats.subset(order), stats.subset(test)
    path = _patience_path(stats.num_stages) if rule == 'patience' else _threshold_path(fit, rule, max_drop)
    correct = held.correct()
    full = correct[:, -1].to(torch.int8)

    def drops():
        for setting in path:
            exits = held.exits(rule, None, setting) if rule == 'patience' else held.exits(rule, setting)
            yield full - correct.gather(1, exits.view(-1, 1)).squeeze(1).to(torch.int8)

    chosen, pvalues = select_by_testing(drops(), delta, epsilon)
    setting = path[max(chosen, 0)]
    return setting, guarantee_record(max_drop, epsilon, stats.num_images, len(order), len(test), len(path), pvalues,
                                     chosen)


def _patience_path(num_stages: int) -> List[int]:
    """Patience from the safest (every stage must agree) down to 1."""
    return list(range(num_stages, 0, -1))


def _threshold_path(stats: ExitStats, rule: str, max_drop: float) -> List[Tuple[float, ...]]:
    """"Never exit early", then every step of the greedy descent with the exits open that the best fit at
    ``max_drop`` opens on these images (all exits if it opens none), down to the lowest thresholds."""
    n = stats.num_stages
    closed = (1.0,) * (n - 1)
    if n == 1:
        return [()]
    fitted = fit_thresholds(stats, rule, max_drop, None)
    conf, correct, grids = search_space(stats, rule)
    opened = tuple(k for k in range(n - 1) if fitted[k] < 1) or tuple(k for k in range(n - 1) if len(grids[k]) > 1)
    steps: List[List[int]] = []
    descend(stats, rule, conf, correct, grids, opened, -math.inf, None, steps)
    return [closed] + [tuple(float(grids[k][p[k]]) for k in range(n - 1)) for p in steps]


def _check_target(model: HFFModel, max_accuracy_drop: Optional[float], flops_budget: Optional[float],
                  rule: Optional[str], confidence: Optional[float] = None) -> Tuple[Optional[float], str]:
    """(max_accuracy_drop with its default, rule), or a one-line error for a setting that cannot be met."""
    if confidence is not None and (not _is_number(confidence) or not 0 < confidence < 1):
        raise ValueError(f'confidence is the probability the accuracy guarantee holds over the calibration draw, '
                         f'between 0 and 1 exclusive (e.g. 0.9), got {confidence!r}; None fits without a guarantee')
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
