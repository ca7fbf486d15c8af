"""``schedule: stage_parallel``: one process per stage, all training at once, nothing sent backward (see
``trainer.py``). This file is the schedule's registration and its checks; the engine loads only when a run starts.

    checks.py    the settings it does not (yet) combine with
    trainer.py   StageParallelTrainer: the run sequence on one stage process (set-up, plan, reporting)
    steps.py     a training epoch and an evaluation, as one stage sees them
    state.py     what a stage owns: its tensors, EMA, part of a checkpoint, share of the final model
    part.py      one stage run on its own, from the previous stage's output
    handoff.py   point-to-point traffic between stage processes
    launch.py    starting the processes (or joining a launcher's), the process group
"""
from ...registry import register_schedule
from ..base import Schedule
from .checks import check_settings

__all__ = ['StageParallel', 'check_settings']


@register_schedule
class StageParallel(Schedule):
    name = 'stage_parallel'
    help = 'one process per stage'
    own_trainer = True
    head_warmup = False
    capture_refusal = 'stage_parallel runs one process per stage with host-side hand-offs; use schedule: simultaneous'

    def check(self, cfg) -> None:
        super().check(cfg)
        check_settings(cfg)

    def create_trainer(self, cfg):
        from .trainer import StageParallelTrainer
        return StageParallelTrainer(cfg)
