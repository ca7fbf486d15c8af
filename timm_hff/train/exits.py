"""Adaptive exit at the end of a run (``calibrate_exits`` in a recipe): fit the thresholds on the validation split,
then report the operating point on the test split once, next to the full-depth accuracy.

The thresholds are fitted on validation only (the split settings are chosen on), so the test figures stay an
unbiased estimate of what the saved model does with ``predict_from='adaptive'``.
"""
from typing import Any, Callable, Dict, Iterable, Optional

from ..model import ExitCalibration, exit_stats, fit_exits

__all__ = ['adaptive_point', 'calibrate', 'check_calibration_size', 'describe_point']


def check_calibration_size(cfg, num_images: Optional[int]) -> None:
    """Refuse, before training, a validation split too small for ``calibrate_exits``' guarantee."""
    if cfg.calibrate_exits is None or cfg.exit_confidence is None or num_images is None:
        return
    from ..model import min_calibration_images
    need = min_calibration_images(cfg.calibrate_exits / 100, 1 - cfg.exit_confidence)
    if num_images < need:
        raise ValueError(f'calibrate_exits {cfg.calibrate_exits:g} with exit_confidence {cfg.exit_confidence:g} needs '
                         f'at least {need} validation images for its guarantee, the validation split has {num_images}: '
                         f'hold out more (val_fraction), allow a larger drop or a lower exit_confidence, or set '
                         f'exit_confidence: null to fit without a guarantee')


def calibrate(model, batches: Iterable, max_accuracy_drop: float, gather: Optional[Callable] = None,
              confidence: Optional[float] = None) -> ExitCalibration:
    """Choose (and store in ``model``) the exit setting on the validation batches of every process: with a
    Learn-then-Test guarantee at ``confidence``, or (None) the best fit to them."""
    return fit_exits(model, exit_stats(model, batches, gather=gather), max_accuracy_drop=max_accuracy_drop,
                     confidence=confidence)


def adaptive_point(model, batches: Iterable, gather: Optional[Callable] = None, prefix: str = '') -> Dict[str, Any]:
    """The stored exit setting scored on other batches (the test split): top-1 and mean FLOPs per image, with the
    full-depth figures they save against."""
    stats = exit_stats(model, batches, gather=gather)
    cfg = model.hff_cfg
    point = stats.point(cfg.exit_rule, cfg.exit_thresholds, cfg.exit_patience)
    return {f'{prefix}adaptive_top1': point['top1'], f'{prefix}adaptive_full_top1': stats.full_top1(),
            f'{prefix}adaptive_mean_mflops': point['mean_flops'] / 1e6,
            f'{prefix}adaptive_full_mflops': stats.full_flops / 1e6,
            f'{prefix}adaptive_flops_ratio': point['flops_ratio'],
            f'{prefix}adaptive_exit_shares': point['exit_shares']}


def describe_point(row: Dict[str, Any], prefix: str = '') -> str:
    """One line for the printed summary."""
    p = prefix + 'adaptive_'
    shares = ' / '.join(f'{s:.0%}' for s in row[p + 'exit_shares'])
    return (f"adaptive exit top-1 {row[p + 'top1']:.2f}% vs {row[p + 'full_top1']:.2f}% at full depth, "
            f"{row[p + 'mean_mflops']:.2f} vs {row[p + 'full_mflops']:.2f} MFLOPs per image "
            f"({row[p + 'flops_ratio']:.2f}x); exits per stage {shares}")
