"""How local each stage is: its share of the backbone's parameters and forward FLOPs, and the layers it trains.

A cut that leaves most of the network inside one stage is close to backprop by construction, so every accuracy
this library reports sits beside these shares (run header, ``metrics.json``, model card).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._cuts import run_stages

__all__ = ['exit_costs', 'exit_flops', 'format_profile', 'full_cost', 'full_flops', 'stage_profile']

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def stage_profile(model: nn.Module, img_size: Union[int, Tuple[int, int], None] = None) -> List[Dict[str, Any]]:
    """One row per stage: backbone parameters and their share, forward FLOPs (one image) and their share,
    conv/linear layers trained, and the prototype head's own parameters and FLOPs.

    FLOPs are ``torch.utils.flop_counter`` counts (2 per multiply-add of convolutions and matmuls) at
    ``img_size`` (an int or (H, W); default: the size the build-time probe checked). Shares are of the backbone
    alone (the part BP would train too); parameters the cut leaves unused count in neither.
    """
    from torch.utils.flop_counter import FlopCounterMode

    split = model.split
    size = img_size or split.probe_img_size
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.zeros(1, model.in_chans, h, w, device=next(model.parameters()).device)
    marks: List[int] = []
    outs: List[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                def on_stage(k: int, h: torch.Tensor) -> None:
                    marks.append(counter.get_total_flops())
                    outs.append(h)
                run_stages(model.backbone, split, x, on_stage=on_stage)
            head_flops = []
            for k, h in enumerate(outs):
                with FlopCounterMode(display=False) as counter:
                    model.heads[k](h)
                head_flops.append(counter.get_total_flops())
    finally:
        model.train(was_training)

    params = dict(model.backbone.named_parameters())
    modules = dict(model.backbone.named_modules())
    stage_params = [sum(params[n].numel() for n in names) for names in split.stage_param_names]
    total_params = max(sum(stage_params), 1)
    flops = [b - a for a, b in zip([0] + marks[:-1], marks)]
    total_flops = max(sum(flops), 1)
    rows = []
    for k, names in enumerate(split.stage_param_names):
        layers = {n.rpartition('.')[0] for n in names if n.endswith('weight')
                  and isinstance(modules.get(n.rpartition('.')[0]), _LAYER_TYPES)}
        rows.append(dict(
            stage=k, module=model.stage_info[k]['module'], params=stage_params[k],
            param_share=stage_params[k] / total_params, flops=int(flops[k]), flops_share=flops[k] / total_flops,
            layers=len(layers), head_params=sum(p.numel() for p in model.heads[k].parameters()),
            head_flops=int(head_flops[k])))
    return rows


def format_profile(rows: List[Dict[str, Any]]) -> str:
    """The profile as a fixed-width table (the run header)."""
    lines = ['stage  params    share   MFLOPs   share  conv/linear  head params  head MFLOPs  tap']
    for r in rows:
        lines.append(f"{r['stage'] + 1:>5}  {r['params'] / 1e6:6.3f}M  {r['param_share']:6.1%}  "
                     f"{r['flops'] / 1e6:7.1f}  {r['flops_share']:6.1%}  {r['layers']:>11}  "
                     f"{r['head_params'] / 1e3:9.1f}K  {r['head_flops'] / 1e6:11.1f}  {r['module']}")
    return '\n'.join(lines)


def exit_flops(model: nn.Module, img_size: Union[int, Tuple[int, int], None] = None,
               scored: Optional[Sequence[bool]] = None) -> List[int]:
    """FLOPs per image of leaving after stage k (adaptive exit): the backbone stages up to k and the heads the
    early-exit forward scores them with on the way: all of them, or those ``scored`` marks (a stage whose
    threshold is 1 lets no image leave, so its head is not run; ``_exit_rule.scored_stages``)."""
    rows = stage_profile(model, img_size)
    return exit_costs([r['flops'] for r in rows], [r['head_flops'] for r in rows], scored)


def exit_costs(stage_flops: Sequence[int], head_flops: Sequence[int], scored: Optional[Sequence[bool]] = None
               ) -> List[int]:
    """``exit_flops`` from per-stage backbone and head FLOPs: cumulative, a head counted where ``scored`` (and the
    last stage's always: every image left by then is scored by it)."""
    total, out, last = 0, [], len(stage_flops) - 1
    for k, (f, h) in enumerate(zip(stage_flops, head_flops)):
        total += f + (h if scored is None or k == last or scored[k] else 0)
        out.append(total)
    return out


def full_flops(model: nn.Module, img_size: Union[int, Tuple[int, int], None] = None) -> int:
    """FLOPs per image of the full-depth prediction (``predict_from='last'``): the whole cut backbone and the last
    head only (the reference that adaptive exit saves against)."""
    return full_cost(stage_profile(model, img_size))


def full_cost(rows: List[Dict[str, Any]]) -> int:
    """``full_flops`` from ``stage_profile`` rows already taken."""
    return sum(r['flops'] for r in rows) + rows[-1]['head_flops']
