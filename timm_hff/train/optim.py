"""The optimizer and the lr schedule of a run: timm's factories, with the fine-tuning lr factors as timm's
``lr_scale``, so every timm scheduler honours them."""
import contextlib
from typing import Dict, Set, Tuple

__all__ = ['EPOCH_COUNTED', 'OPTIMIZER_SHAPE', 'build_optimizer', 'build_scheduler', 'param_groups',
           'run_settings_kept', 'say_changes', 'stretch_to_min_steps']

# settings that decide the optimizer's kind and its parameter groups (what trains, at which lr factor): a checkpoint's
# optimizer state fits only the same ones, so resume refuses a change of them (``checkpoint.run_identity``); every
# other optimizer setting (weight_decay, momentum, opt_eps, opt_betas, cuda_graphs' fused step) is re-applied
# (head_warmup_epochs is not one: the optimizer is built over every parameter, and the warm-up only holds some back)
OPTIMIZER_SHAPE = ('opt', 'freeze_stages', 'head_only', 'layer_decay', 'backbone_lr_scale', 'stage_lr')


def param_groups(model, cfg, heads: Set[str]) -> list:
    """Optimizer groups by (lr factor, decay), each parameter's factor the product of timm's layer decay (over the
    backbone's ``group_matcher``), ``backbone_lr_scale`` (every parameter not in ``heads``) and ``stage_lr`` (HFF
    stages). No weight decay where timm leaves it out (biases, norms, ``no_weight_decay()``)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scale = {n: 1.0 for n in params}
    if cfg.layer_decay is not None:
        from timm.optim import param_groups_layer_decay
        ids = {id(p): n for n, p in params.items()}
        for g in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=cfg.layer_decay):
            for p in g['params']:
                scale[ids[id(p)]] *= g['lr_scale']
    if cfg.backbone_lr_scale != 1.0:
        for n in params:
            if n not in heads:
                scale[n] *= cfg.backbone_lr_scale
    if cfg.stage_lr:
        if len(cfg.stage_lr) != model.num_stages:
            raise ValueError(f'stage_lr lists {len(cfg.stage_lr)} factors but the model has {model.num_stages} stages')
        owner = {f'backbone.{n}': k for k, names in enumerate(model.split.stage_param_names) for n in names}
        for n in params:
            k = int(n.split('.')[1]) if n.startswith('heads.') else owner.get(n)
            if k is not None:
                scale[n] *= float(cfg.stage_lr[k])
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    groups: Dict[Tuple[float, bool], list] = {}
    for n, p in params.items():
        decay = not (p.ndim <= 1 or n.endswith('.bias') or n in skip)
        groups.setdefault((scale[n], decay), []).append(p)
    return [dict(params=ps, weight_decay=cfg.weight_decay if decay else 0.0, lr_scale=s)
            for (s, decay), ps in groups.items()]


def build_optimizer(cfg, model, heads: Set[str] = frozenset(), device_type: str = 'cpu'):
    """timm's ``create_optimizer_v2`` over the parameters that require grad, lr factors applied (``param_groups``;
    ``heads``: the method's head parameter names). With ``cuda_graphs``, the optimizer's fused step, which a graph
    can hold (``graph_settings.optimizer_kwargs``; ``device_type``: where it will step)."""
    from timm.optim import create_optimizer_v2
    opt_kwargs = {}
    if cfg.cuda_graphs:
        from .graph_settings import optimizer_kwargs
        opt_kwargs.update(optimizer_kwargs(cfg.opt, device_type))
    if cfg.opt_eps is not None:
        opt_kwargs['eps'] = cfg.opt_eps
    if cfg.opt_betas is not None:
        opt_kwargs['betas'] = tuple(cfg.opt_betas)
    factors = cfg.stage_lr or cfg.layer_decay is not None or cfg.backbone_lr_scale != 1.0
    params = param_groups(model, cfg, heads) if factors else model
    return create_optimizer_v2(params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               **opt_kwargs)


def build_scheduler(cfg, optimizer, updates_per_epoch: int, epochs: int, cycles: int = 1):
    """timm's ``create_scheduler_v2``: ``cycles`` cycles of ``epochs`` epochs (the schedule's ``lr_cycles``)."""
    from timm.scheduler import create_scheduler_v2
    # decay_epochs only when set: timm 1.0.29 multiplies it by the updates per epoch whatever the schedule, so None (a
    # cosine recipe's default) fails there
    decay = {} if cfg.decay_epochs is None else dict(decay_epochs=cfg.decay_epochs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs, cooldown_epochs=cfg.cooldown_epochs, decay_rate=cfg.decay_rate,
        **decay, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, cycle_limit=cycles,
        cycle_decay=1.0, step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=updates_per_epoch)
    return scheduler


# param-group keys the run's schedule owns (timm's scheduler writes lr from initial_lr): kept as the checkpoint has them
_SCHEDULE_KEYS = ('params', 'lr', 'initial_lr')


@contextlib.contextmanager
def run_settings_kept(optimizer, changes: list):
    """Around a checkpoint's ``optimizer.load_state_dict``: torch restores every group hyper-parameter of the
    checkpoint (weight decay, betas, eps, momentum, the fused / capturable flags a CUDA graph needs), so this run's are
    written back from the freshly built optimizer afterwards, and step counters move where a fused or capturable step
    reads them. ``changes`` gets one ``(setting, checkpoint's value, this run's)`` per change, for the run to say."""
    import torch
    fresh = [{k: v for k, v in g.items() if k not in _SCHEDULE_KEYS} for g in optimizer.param_groups]
    yield
    seen = set()
    for group, mine in zip(optimizer.param_groups, fresh):
        for key, value in mine.items():
            if group.get(key) != value and key not in seen:
                seen.add(key)
                changes.append((key, group.get(key), value))
            group[key] = value
        if group.get('fused') or group.get('capturable'):
            for p in group['params']:
                step = optimizer.state.get(p, {}).get('step')
                if isinstance(step, torch.Tensor):
                    optimizer.state[p]['step'] = step.to(device=p.device, dtype=torch.float32)


def say_changes(changes: list) -> str:
    """'; weight_decay 0.05 -> 0.1' for the resume line ('' when nothing changed)."""
    return ''.join(f'; {k} {old!r} -> {new!r} (this run\'s)' for k, old, new in changes)


# settings counted in epochs, stretched with ``epochs`` by ``min_steps`` so the schedule keeps its shape
EPOCH_COUNTED = ('epochs', 'warmup_epochs', 'cooldown_epochs', 'head_warmup_epochs', 'val_every', 'decay_epochs')


def stretch_to_min_steps(cfg, updates_per_epoch: int, stages: int = 1) -> str:
    """``min_steps``: a recipe's epochs were chosen on some data size; on a small folder they are a handful of optimizer
    steps. Every epoch-counted setting is multiplied by the smallest whole factor that gives at least ``min_steps``
    updates (``stages``: the epochs' multiple a schedule trains, 'sequential'), in place. Returns what the run header
    says ('' when nothing changed)."""
    have = cfg.epochs * updates_per_epoch * stages
    if not cfg.min_steps or have >= cfg.min_steps:
        return ''
    factor = -(-cfg.min_steps // max(have, 1))
    before = cfg.epochs
    for name in EPOCH_COUNTED:
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, value * factor)
    return (f'min_steps {cfg.min_steps}: {before} epochs of {updates_per_epoch} optimizer steps are {have}, so every '
            f'epoch-counted setting is stretched x{factor} (epochs {cfg.epochs}, warmup_epochs {cfg.warmup_epochs}, '
            f'val_every {cfg.val_every})')
