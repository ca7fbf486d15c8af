"""When an image may leave the network early: the confidence rules of ``predict_from='adaptive'``.

Every HFF stage ends in a calibrated cosine-softmax classifier, so its probabilities say how sure the stage is. An
image leaves after stage k when that stage is sure enough; the later stages then never run for it. The same
``ExitRule`` decides in the shrinking forward (``HFFModel.forward_adaptive``, where the batch loses the rows that
left) and when the exits are replayed on logits that a full forward produced (evaluation, calibration), so both
give every image the same exit stage.

Rules (confidence in [0, 1], higher is surer, so every threshold lives in (0, 1]):

- ``max_prob``: the largest softmax probability (Shallow-Deep Networks).
- ``entropy``: ``1 - H(p) / log C`` (BranchyNet's entropy criterion, rescaled so that 1 is a one-hot prediction).
- ``patience``: no threshold; the image leaves once the last ``patience`` stages predict the same class (PABEE).

A threshold of 1 means "never leave here" rather than "leave at probability 1.0": float32 softmax rounds very
confident predictions to exactly 1, and an all-ones setting must reproduce the last stage exactly.
"""
import math
from typing import List, Optional, Sequence

import torch

__all__ = ['ExitRule', 'confidence', 'replay_exits', 'scored_stages']


def confidence(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """How sure a stage is of each image, in [0, 1] (float32, shape (B,))."""
    logp = logits.float().log_softmax(-1)
    if rule == 'max_prob':
        return logp.max(-1).values.exp()
    if rule == 'entropy':
        num_classes = logits.shape[-1]
        if num_classes < 2:
            return torch.ones(logits.shape[0], device=logits.device)
        entropy = -(logp.exp() * logp).sum(-1)
        return (1 - entropy / math.log(num_classes)).clamp_(0, 1)
    raise ValueError(f"no confidence for exit rule {rule!r}; use 'max_prob' or 'entropy'")


class ExitRule:
    """Decides, stage by stage, which of the images still in the batch leave.

    Call ``leave(k, logits)`` for stages 0, 1, ... in order with the logits of the images still running; then
    ``keep(rows)`` with the rows that go on, so the rule's per-image state (patience) follows the shrinking batch.
    """

    def __init__(self, rule: str, num_stages: int, thresholds: Optional[Sequence[float]] = None, patience: int = 2):
        self.rule, self.num_stages, self.patience = rule, num_stages, patience
        self.thresholds = tuple(thresholds) if thresholds is not None else None
        self._last: Optional[torch.Tensor] = None   # patience: previous stage's class per image
        self._streak: Optional[torch.Tensor] = None  # patience: stages in a row that predicted it

    def leave(self, k: int, logits: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
        """Which images leave after stage k (bool, (B,)); all of them at the last stage (or at ``last``)."""
        last = self.num_stages - 1 if last is None else last
        if self.rule == 'patience':
            pred = logits.argmax(-1)
            if self._last is None or k == 0:
                self._streak = torch.ones_like(pred)
            else:
                self._streak = torch.where(pred == self._last, self._streak + 1, torch.ones_like(pred))
            self._last = pred
            out = self._streak >= self.patience
        else:
            t = self.thresholds[k] if k < len(self.thresholds) else 1.0
            out = confidence(logits, self.rule) >= t if t < 1 else torch.zeros(
                logits.shape[0], dtype=torch.bool, device=logits.device)
        return out | (k >= last)

    def keep(self, rows: torch.Tensor) -> None:
        if self._last is not None:
            self._last, self._streak = self._last[rows], self._streak[rows]


def scored_stages(rule: str, num_stages: int, thresholds: Optional[Sequence[float]]) -> List[bool]:
    """Which stages' heads the adaptive forward must run: all for 'patience' (every stage votes), else those whose
    threshold lets an image leave (< 1) and the last. A head that cannot let anyone leave is skipped, so a stage
    worth no exit costs no head: the fit (``_exit``) may switch a stage off to save its head."""
    if rule == 'patience' or thresholds is None:
        return [True] * num_stages
    return [k == num_stages - 1 or (k < len(thresholds) and thresholds[k] < 1) for k in range(num_stages)]


def replay_exits(rule: ExitRule, stage_logits: Sequence[torch.Tensor]):
    """(logits, exit stage) of every image, from every stage's logits of a full forward (nothing is dropped, so
    each image's exit is the first stage that ``rule`` lets it leave; the last given stage takes the rest)."""
    first = stage_logits[0]
    n = len(stage_logits)
    out = first   # torch.where below makes new tensors: nothing is written in place
    exit_stage = torch.full((first.shape[0],), n - 1, dtype=torch.long, device=first.device)
    done = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
    for k, logits in enumerate(stage_logits):   # torch.where, not boolean indexing: no host sync (CUDA graphs)
        now = rule.leave(k, logits, last=n - 1) & ~done
        out = torch.where(now.unsqueeze(-1), logits.to(out.dtype), out)
        exit_stage = torch.where(now, k, exit_stage)
        done |= now
    return out, exit_stage
