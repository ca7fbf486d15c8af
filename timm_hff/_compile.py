"""``torch.compile`` for HFF models: compile the pieces between the cuts, keep the cuts eager.

Compiling the whole model would have dynamo trace the tap hooks, which hand stage outputs to Python callbacks (a
head's backward in memory_efficient mode, the adaptive exit's routing) and end the forward early with an exception.
Instead every block is compiled on its own ``forward`` (its hooks, the cuts among them, stay outside the compiled
code), and so is every prototype head: the fusions that matter (a conv's norm and activation, a head's aux block,
pooling and projection) live inside those pieces. Modules that contain a cut are not compiled; their children are.
"""
from typing import List, Optional

import torch
import torch.nn as nn

__all__ = ['compile_model', 'compile_units', 'uncompile_model']


def compile_units(model: nn.Module) -> List[str]:
    """Names (under the model) of the modules whose ``forward`` gets compiled: the tap blocks, every largest subtree
    of the backbone without a tap, and the heads."""
    backbone, split = model.backbone, model.split
    taps = set(split.tap_names)
    ancestors = {'.'.join(t.split('.')[:i]) for t in taps for i in range(len(t.split('.')))}
    units: List[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f'{prefix}.{name}' if prefix else name
            if full in ancestors:
                visit(full, child)
            elif any(True for _ in child.parameters()) or full in taps:
                units.append(full)   # a tap block or a subtree without a cut (parameter-free glue stays eager)
    visit('', backbone)
    return [f'backbone.{u}' for u in units] + [f'heads.{k}' for k in range(len(model.heads))]


def compile_model(model: nn.Module, backend: str = 'inductor', mode: Optional[str] = None) -> nn.Module:
    """Compile ``model`` in place (block by block, see the module docstring) and return it.

    Works in every single-process schedule (simultaneous, memory_efficient, sequential) and with adaptive exit;
    parameters, state_dict keys and hooks are unchanged, so saving and EMA see the eager modules.
    """
    if not hasattr(torch, 'compile'):
        raise ValueError(f'torch.compile needs torch >= 2.0, this is {torch.__version__}')
    for name in compile_units(model):
        module = model.get_submodule(name)
        if getattr(module.forward, '_hff_compiled', False):
            continue
        compiled = torch.compile(module.forward, backend=backend, mode=mode, dynamic=None)
        compiled._hff_compiled = True
        module.forward = compiled
    return model


def uncompile_model(model: nn.Module) -> nn.Module:
    """Back to eager forwards (drops the compiled wrappers set by ``compile_model``)."""
    for module in model.modules():
        if getattr(module.__dict__.get('forward'), '_hff_compiled', False):
            del module.forward
    return model
