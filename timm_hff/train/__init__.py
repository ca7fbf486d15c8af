"""Training on HF Accelerate: ``TrainConfig`` (YAML recipes), ``Trainer`` / ``train``, and the ``hff-train`` CLI."""
from ._config import METHODS, PRECISIONS, SCHEDULES, TrainConfig
from ._trainer import Trainer, build_bp_model, build_model, train
from ._stage_parallel import StageParallelTrainer, create_trainer
