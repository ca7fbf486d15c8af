"""Training on HF Accelerate: ``TrainConfig`` (YAML recipes), the run sequence, its methods and schedules, and the
``hff-train`` CLI.

    registry      the method and schedule registries (``register_method`` / ``register_schedule``)
    methods/      hff, bp, ff: what learns (model, step, prediction heads, final save), one file each
    schedules/    simultaneous, memory_efficient, sequential, stage_parallel: when stages step, one file each
    config        TrainConfig, each setting declared once (help: how); checks: its validation
    data          the splits and their loaders; optim: optimizer and lr schedule; targets: mixup / smoothing
    checkpoint    epoch checkpoints, resume, the run folder's lock; metrics: metrics.json / csv / png
    evaluate      top-1 / top-5 of every head; exits: adaptive exits fitted at the end of a run
    run           RunSequence: set-up -> epochs (train, validate, checkpoint) -> test once -> final save
    engines/      what runs it: accelerate/ (Trainer), stage_parallel/ (one process per stage), cuda_graphs
                  (CapturedStep: the whole step as a replayed CUDA graph, for any training loop)
"""
from . import methods, schedules   # the registries' entries, before anything reads them (both light)
from .registry import get_method, get_schedule, method_names, register_method, register_schedule, schedule_names
from .config import PRECISIONS, TrainConfig
from .methods import Method, NoAccelerator
from .schedules import Schedule
from ..core import lazy_exports

METHODS = method_names()
SCHEDULES = schedule_names()
_EXPORTS = {'RunSequence': '.run', 'build_optimizer': '.optim', 'build_scheduler': '.optim', 'param_groups': '.optim',
            'Trainer': '.engines.accelerate.trainer', 'train': '.engines.accelerate.trainer',
            'CapturedStep': '.engines.cuda_graphs', 'StageParallelTrainer': '.engines.stage_parallel.trainer'}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ['METHODS', 'Method', 'NoAccelerator', 'PRECISIONS', 'SCHEDULES', 'Schedule', 'TrainConfig', 'build_model',
           'create_trainer', 'get_method', 'get_schedule', 'method_names', 'register_method', 'register_schedule',
           'schedule_names', *_EXPORTS]


def build_model(cfg: TrainConfig, num_classes: int, label_names=None):
    """The model a run of ``cfg`` trains (the method's ``build_model``): HFF, BP's timm classifier, or FF."""
    return get_method(cfg.method).build_model(cfg, num_classes, label_names)


def create_trainer(cfg: TrainConfig):
    """The trainer of a recipe: the schedule's own (stage_parallel: one process per stage), else the Accelerate one."""
    return get_schedule(cfg.schedule).create_trainer(cfg)
