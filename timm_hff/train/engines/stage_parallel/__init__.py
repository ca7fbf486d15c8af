"""The stage-parallel engine: one process per stage, all training at once, nothing sent backward.

    checks.py    the settings it does not (yet) combine with
    trainer.py   StageParallelTrainer: the run sequence on one stage process (set-up, plan, reporting)
    steps.py     a training epoch and an evaluation, as one stage sees them
    state.py     what a stage owns: its tensors, EMA, part of a checkpoint, share of the final model
    part.py      one stage run on its own, from the previous stage's output
    handoff.py   point-to-point traffic between stage processes
    launch.py    starting the processes (or joining a launcher's), the process group
"""
__all__ = []
