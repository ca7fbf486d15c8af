"""Baselines on the same timm backbone and stage cut as HFF: Forward-Forward (C passes) and backprop."""
from .bp import accumulated_backward, create_bp_model
from .ff import FFConfig, FFModel, LabelPlane, create_ff_model, goodness

__all__ = ['FFConfig', 'FFModel', 'LabelPlane', 'accumulated_backward', 'create_bp_model', 'create_ff_model',
           'goodness']
