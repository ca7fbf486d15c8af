"""The engines that run a ``RunSequence``: each fills in its set-up, step, evaluation and checkpoints, while the
method and schedule objects (``registry``) supply what differs between methods and schedules. A schedule names its
engine (``Schedule.create_trainer``); nothing here imports a schedule.

    accelerate/      Trainer: HF Accelerate, one process or data-parallel ones (steps: its epoch loop)
    stage_parallel/  StageParallelTrainer: one process per stage, point-to-point hand-offs
    cuda_graphs      CapturedStep: a whole training step captured as a CUDA graph and replayed (any training loop)
"""
__all__ = []
