"""Early exit with a distribution-free guarantee: Learn-then-Test over an ordered path of exit settings.

Why: a fit that searches thresholds until the calibration images show a drop just inside the bound lands on the most
optimistic point of a noisy curve; measured out of sample, a 0.2-point fit lost up to 1.26 points. Here the promise is
a statistical one, as CALM (Schuster et al., 2022) makes for early-exit language models with Learn-then-Test
(Angelopoulos et al., 2021): over the draw of the calibration images, the chosen setting's expected accuracy drop on
new images from the same distribution exceeds ``delta`` with probability at most ``epsilon``.

How (Pareto Testing's split, Laufer-Goldshtein et al., 2022): the calibration images are shuffled with a fixed seed
and split. The first ``FIT_SHARE`` orders the candidates: the greedy descent of ``_exit`` from "never exit early" to
the most aggressive setting, one step at a time. The rest tests them in that order (fixed-sequence testing, which
needs no multiplicity correction): for each setting, the null hypothesis "its expected drop exceeds delta" gets a
p-value from a betting martingale (WSR: Waudby-Smith and Ramdas, 2020), which adapts to the small variance of
the per-image drop (mostly 0: early and full prediction agree); the walk stops at the first setting not rejected at
level ``epsilon`` and returns the last one rejected. "Never exit early" has a drop of exactly 0, so it is rejected
whenever the test images could reject anything; with fewer than ``min_calibration_images`` the request is refused.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ['FIT_SHARE', 'guarantee_record', 'min_calibration_images', 'ordered_split', 'select_by_testing',
           'wsr_pvalue']

FIT_SHARE = 1 / 3   # of the calibration images: they order the candidates; the rest test them
_SEED = 0


def wsr_pvalue(drops: torch.Tensor, delta: float, epsilon: float) -> float:
    """p-value of "the expected per-image drop exceeds ``delta``" from per-image drops in {-1, 0, 1} (full-depth
    right and adaptive wrong: 1; the reverse: -1), in an order drawn independently of them.

    The drops map to [0, 1] (x = (d + 1) / 2, the bound to alpha = (delta + 1) / 2); the capital of a bettor against
    the null, K_t = prod (1 - nu_t (x_t - alpha)), is a non-negative supermartingale under it, so by Ville's
    inequality P(max_t K_t >= 1 / epsilon) <= epsilon and 1 / max_t K_t is a valid p-value. The bets nu_t are WSR's
    predictable plug-in, from the mean and variance of the drops seen before t."""
    x = (drops.double().flatten() + 1) / 2
    n = x.numel()
    if n == 0:
        return 1.0
    alpha = (delta + 1) / 2
    t = torch.arange(1, n + 1, dtype=torch.float64)
    mu = (torch.cumsum(x, 0) + 0.5) / (t + 1)
    var = (torch.cumsum((x - mu) ** 2, 0) + 0.25) / (t + 1)
    var = torch.cat([torch.tensor([0.25], dtype=torch.float64), var[:-1]])   # predictable: drops before t only
    nu = torch.clamp(torch.sqrt(2 * math.log(1 / epsilon) / (n * var)), max=1.0)
    log_capital = torch.cumsum(torch.log1p(-nu * (x - alpha)), 0)
    return float(min(1.0, math.exp(-max(0.0, float(log_capital.max())))))


def min_calibration_images(delta: float, epsilon: float) -> int:
    """The fewest calibration images with which any setting could be certified: the test part (all but
    ``FIT_SHARE``) must reject even a setting that never changes a prediction's correctness."""
    def rejects(n: int) -> bool:
        return wsr_pvalue(torch.zeros(n), delta, epsilon) <= epsilon
    hi = 1
    while not rejects(hi):
        hi *= 2
        if hi > 2 ** 26:
            return 2 ** 31   # delta so small that no data set could certify it
    lo = hi // 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if rejects(mid) else (mid, hi)
    n = math.floor(hi / (1 - FIT_SHARE)) - 2
    while n - int(round(n * FIT_SHARE)) < hi:   # the test part ordered_split leaves
        n += 1
    return n


def ordered_split(n: int, seed: int = _SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices that order the candidates, indices that test them, in their drawn order)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = int(round(n * FIT_SHARE))
    return perm[:k], perm[k:]


def select_by_testing(drops: Sequence[torch.Tensor], delta: float, epsilon: float) -> Tuple[int, List[float]]:
    """Fixed-sequence testing along the path: ``drops[j]`` are the test images' per-image drops of candidate j
    (candidates ordered from safest to most aggressive). Returns (index of the last candidate rejected, or -1 when
    none is; the p-values computed, in order)."""
    chosen, pvalues = -1, []
    for j, d in enumerate(drops):
        p = wsr_pvalue(d, delta, epsilon)
        pvalues.append(p)
        if p > epsilon:
            break
        chosen = j
    return chosen, pvalues


def guarantee_record(delta_points: float, epsilon: float, n: int, fit: int, tested: int, candidates: int,
                     pvalues: List[float], chosen: int) -> Dict[str, float]:
    """What ``ExitCalibration.guarantee`` reports."""
    return dict(max_accuracy_drop=delta_points, confidence=1 - epsilon, calibration_images=n, ordering_images=fit,
                testing_images=tested, candidates=candidates, candidates_tested=len(pvalues),
                p_value=pvalues[chosen] if chosen >= 0 else None)
