"""``schedule: sequential``: greedy, stage by stage; stage k trains alone for ``epochs`` epochs (one lr cycle each),
the stages before it frozen (norms in eval), the ones after it not run."""
from typing import Optional, Tuple

from ..registry import register_schedule
from .base import Schedule

__all__ = ['Sequential']


@register_schedule
class Sequential(Schedule):
    name = 'sequential'
    help = 'greedy, stage by stage'
    unused_parameters = True   # inactive stages get no gradient
    head_warmup = False

    def check(self, cfg) -> None:
        if cfg.freeze_stages or cfg.head_only:
            raise ValueError("schedule 'sequential' freezes stages itself; drop freeze_stages / head_only")
        super().check(cfg)

    def total_epochs(self, epochs: int, num_stages: int) -> int:
        return epochs * num_stages

    def lr_cycles(self, epochs: int, num_stages: int) -> Tuple[int, int]:
        return epochs, num_stages

    def active_stage(self, epoch: int, epochs: int, num_stages: int) -> Optional[int]:
        return epoch // epochs

    def before_epoch(self, model, epoch: int, epochs: int, num_stages: int) -> None:
        model.unfreeze_stages(range(num_stages))
        model.freeze_stages(range(self.active_stage(epoch, epochs, num_stages)))
