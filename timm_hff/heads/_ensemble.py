"""The stage ensemble: how several stages' class logits combine into one prediction."""
import torch
import torch.nn.functional as F

__all__ = ['log_probs_mean']


def log_probs_mean(stage_logits) -> torch.Tensor:
    """Ensemble of stages: the mean of their log-probabilities (in fp32, returned in the logits' dtype)."""
    return torch.stack([F.log_softmax(s.float(), dim=-1) for s in stage_logits]).mean(0).to(stage_logits[0].dtype)

