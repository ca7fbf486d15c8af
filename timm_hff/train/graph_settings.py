"""What ``cuda_graphs: true`` asks of a run's settings, known before anything is built: the one-line refusals
(``check_settings``, called by ``TrainConfig.validate``) and the optimizer keywords whose step a graph can hold. The
capture itself is an engine's (``engines/cuda_graphs.py``)."""
from typing import Any, Dict

from .registry import get_schedule

__all__ = ['CAPTURABLE_OPTIMIZERS', 'check_settings', 'optimizer_kwargs']

# timm ``opt`` names whose torch optimizer has a fused step that takes the lr as a device tensor
CAPTURABLE_OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')


def check_settings(cfg) -> None:
    """One-line refusals of settings a captured step cannot honour (called by ``TrainConfig.validate``)."""
    if not cfg.cuda_graphs:
        return
    why = None
    if cfg.mixed_precision == 'fp16':
        why = "fp16's loss scaler reads an overflow flag on the host every step; use mixed_precision: bf16 (or no)"
    elif cfg.grad_accum_steps > 1:
        why = (f'a graph is one optimizer step per batch, and grad_accum_steps={cfg.grad_accum_steps} is not '
               f'captured; raise batch_size instead')
    elif cfg.torchcompile:
        why = ("give cuda_graphs or torchcompile, not both (torchcompile_mode: reduce-overhead is torch.compile's "
               "own CUDA graphs)")
    elif cfg.grad_checkpointing:
        why = ("gradient checkpointing's recomputation saves and restores the RNG state on the host, which a graph "
               "cannot; drop grad_checkpointing")
    elif get_schedule(cfg.schedule).capture_refusal:
        why = get_schedule(cfg.schedule).capture_refusal
    elif cfg.opt.lower() not in CAPTURABLE_OPTIMIZERS:
        why = (f'opt {cfg.opt!r} has no device-side (fused) step; use one of {list(CAPTURABLE_OPTIMIZERS)}')
    if why:
        raise ValueError(f'cuda_graphs: {why} (or drop cuda_graphs)')


def optimizer_kwargs(opt: str, device_type: str) -> Dict[str, Any]:
    """``create_optimizer_v2`` keywords of an optimizer whose step a graph can hold: the fused kernel (one launch for
    all parameters, lr accepted as a device tensor), and for Adam / AdamW ``capturable`` on a GPU (its step counter on
    the device; torch refuses the flag on a CPU)."""
    kwargs: Dict[str, Any] = dict(fused=True)
    if opt.lower() in ('adam', 'adamw') and device_type == 'cuda':
        kwargs['capturable'] = True
    return kwargs
