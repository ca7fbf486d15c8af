"""What a schedule is to the run sequence: when each stage trains, how many epochs that takes, which forward mode of
``HFFModel`` a step uses, what it refuses, and which trainer runs it.

A new schedule is one file in this folder: a subclass of ``Schedule`` decorated with ``@register_schedule``, plus its
import line in ``schedules/__init__.py``. Module level stays light (``hff-train --help`` lists the schedules).
"""
from typing import Optional, Tuple

__all__ = ['Schedule']


class Schedule:
    name: str = ''
    help: str = ''                         # one line for ``hff-train --help``
    forward_mode: str = 'simultaneous'     # ``HFFModel.forward(mode=...)`` of a training step
    unused_parameters: bool = False        # some parameters get no gradient in a step (DDP must be told)
    processes_reason: Optional[str] = None  # why several Accelerate processes (DDP) do not apply; None: they do
    head_warmup: bool = True               # honours head_warmup_epochs
    own_trainer: bool = False              # runs in its own trainer (``create_trainer``), not the Accelerate one
    capture_refusal: Optional[str] = None  # why cuda_graphs cannot capture its step; None: a graph can

    def check(self, cfg) -> None:
        """One-line refusals of settings this schedule cannot honour (called by ``TrainConfig.validate``)."""
        if cfg.head_warmup_epochs and not self.head_warmup:
            raise ValueError(f"head_warmup_epochs applies to schedules 'simultaneous' and 'memory_efficient', not "
                             f"{self.name!r}")

    def total_epochs(self, epochs: int, num_stages: int) -> int:
        return epochs

    def lr_cycles(self, epochs: int, num_stages: int) -> Tuple[int, int]:
        """(epochs of one lr cycle, cycles) for timm's scheduler factory."""
        return epochs, 1

    def active_stage(self, epoch: int, epochs: int, num_stages: int) -> Optional[int]:
        """The one stage trained in ``epoch`` (of ``epochs``, the setting), or None when all train."""
        return None

    def before_epoch(self, model, epoch: int, epochs: int, num_stages: int) -> None:
        """Freeze or unfreeze stages for the epoch (the unwrapped model)."""

    def create_trainer(self, cfg):
        """The trainer that runs this schedule: the Accelerate one, unless the schedule brings its own."""
        from ..engines.accelerate.trainer import Trainer
        return Trainer(cfg)
