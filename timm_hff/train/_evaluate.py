"""Scoring a batch: top-1 / top-5 hits of every HFF stage, of the stage ensemble and of the model's prediction.

Shared by the trainer's per-epoch evaluation (which adds the cross-process reduction) and ``hff-validate``, so both
report the same figures under the same names.
"""
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .._heads import log_probs_mean


def prediction_heads(module: nn.Module, x: torch.Tensor, method: str = 'hff') -> List[torch.Tensor]:
    """Logits to score, in the order ``[stage 0, ..., stage S-1, ensemble, prediction]`` (HFF, one forward), or
    ``[prediction]`` (``method='bp'``, a plain classifier). Forward-Forward (``method='ff'``) gives HFF's rows from
    its C passes: each stage's goodness alone, the goodness of all stages summed, and its own prediction (Hinton's
    rule)."""
    if method == 'ff':
        g = module.class_goodness(x).float()           # (S, B, C)
        return list(g.unbind(0)) + [g.sum(0), module.scores(g)]
    if method == 'bp':
        return [module(x)]
    stage_logits = module.forward_stages(x)
    return stage_logits + [log_probs_mean(stage_logits), module._combine(stage_logits)]


def topk_hits(heads: List[torch.Tensor], y: torch.Tensor, k: int):
    """(top-1 hits, top-k hits), each (B, len(heads)) booleans."""
    top = torch.stack([h.float().topk(k, dim=-1).indices for h in heads], 1)   # (B, heads, k)
    hit = top == y.view(-1, 1, 1)
    return hit[..., 0], hit.any(-1)


def accuracy_row(correct1: torch.Tensor, correct5: torch.Tensor, total: int, num_stages: int, num_classes: int,
                 hff: bool = True, prefix: str = '', images_key: str = 'val_images') -> Dict[str, Any]:
    """Counts -> the metrics row: ``top1``, ``top5``, ``top1_stage{k}``, ``top1_ensemble`` (percent)."""
    n = max(int(total), 1)
    top1 = (correct1.double() * 100 / n).tolist()
    top5 = (correct5.double() * 100 / n).tolist()
    row = {f'{prefix}top1': top1[-1], f'{prefix}{images_key}': int(total)}
    if num_classes > 5:
        row[f'{prefix}top5'] = top5[-1]
    if hff:
        for s in range(num_stages):
            row[f'{prefix}top1_stage{s}'] = top1[s]
            if num_classes > 5:
                row[f'{prefix}top5_stage{s}'] = top5[s]
        row[f'{prefix}top1_ensemble'] = top1[num_stages]
    return row
