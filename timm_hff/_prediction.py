"""What ``HFFModel(x)`` returns: the prediction ``predict_from`` names, from the stages it needs and no more.

``predict_from`` is 'last', a stage index, a tuple of stages (their log-probabilities averaged), 'ensemble' (every
stage) or 'adaptive' (each image leaves at the first confident stage: ``_adaptive``). The forward stops after the last
stage the prediction reads, and only the heads it reads run. These functions use the model's public surface.
"""
from typing import Callable, List, Optional, Tuple

import torch

from ._adaptive import AdaptiveExit
from ._exit_rule import replay_exits
from .heads import log_probs_mean

__all__ = ['predict', 'predict_from_stages']


def _first(stage_logits: List[torch.Tensor]) -> torch.Tensor:
    return stage_logits[0]


def _plan(model, available: Optional[int] = None) -> Tuple[Optional[int], List[int], Callable]:
    """(stage to stop after, stages whose logits are combined, how they combine) for ``predict_from``, with only the
    first ``available`` stages at hand (a greedy forward that stopped early)."""
    pf, n = model.predict_from, available or model.num_stages
    if isinstance(pf, tuple):
        picked = [model.stage_index(k) for k in pf]
        within = [k for k in picked if k < n]
        return max(picked), within or [n - 1], log_probs_mean if within else _first
    if pf == 'ensemble':
        return None, list(range(n)), log_probs_mean
    if isinstance(pf, int) and model.stage_index(pf) < n:
        return model.stage_index(pf), [model.stage_index(pf)], _first
    return None, [n - 1], _first   # 'last' (or an index beyond the stages at hand)


def predict(model, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``. In training mode with gradients on (timm's train.py: a plain loss on the output), the mean
    log-probabilities of every stage that trains: the cuts detach, so a loss on the last stage alone would train only
    that stage; this one sends each stage's head a gradient, and frozen stages neither train nor weigh on the others.
    Evaluation (eval mode, or no gradient) predicts as ``predict_from`` says."""
    frozen = set(model.frozen_stages)
    if model.training and torch.is_grad_enabled() and len(frozen) < model.num_stages:
        model.check_input(x)
        stages = [k for k in range(model.num_stages) if k not in frozen]
        outs = model.run_stages(x, stop_after=stages[-1])
        return log_probs_mean([model.heads[k](outs[k]) for k in stages])
    if model.predict_from == 'adaptive':
        return model.forward_adaptive(x)[0]
    model.check_input(x)
    stop, picked, combine = _plan(model)
    outs = model.run_stages(x, stop_after=stop)
    return combine([model.heads[k](outs[k]) for k in picked])   # only the heads the prediction reads


def predict_from_stages(model, stage_logits: List[torch.Tensor]) -> torch.Tensor:
    """``HFFModel.predict_from_stages``: the prediction from the stage logits of one forward."""
    if model.predict_from == 'adaptive':   # the exits replayed on a full forward: the same as forward_adaptive
        return replay_exits(AdaptiveExit.rule(model.hff_cfg, model.num_stages), stage_logits)[0]
    _, picked, combine = _plan(model, len(stage_logits))
    return combine([stage_logits[k] for k in picked])
