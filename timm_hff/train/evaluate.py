"""Scoring a batch: top-1 / top-5 hits of every HFF stage, of the stage ensemble and of the model's prediction.

Shared by the trainer's per-epoch evaluation (which adds the cross-process reduction) and ``hff-validate``, so both
report the same figures under the same names.
"""
from typing import Any, Dict, List

import torch
import torch.nn as nn

__all__ = ['accuracy_row', 'prediction_heads', 'topk_hits']


def prediction_heads(module: nn.Module, x: torch.Tensor, method: str = 'hff') -> List[torch.Tensor]:
    """Logits to score, in the order ``[stage 0, ..., stage S-1, ensemble, prediction]`` (per-stage methods: HFF one
    forward, FF its C passes) or ``[prediction]`` (BP, a plain classifier): the method's own ``heads``."""
    from .registry import get_method
    return get_method(method).heads(module, x)


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
