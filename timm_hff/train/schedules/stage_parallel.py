"""``schedule: stage_parallel``: one process per stage, all training at once, nothing sent backward. The schedule is
this declaration; its engine is ``engines/stage_parallel/``, loaded only when a run starts."""
from ..engines.stage_parallel.checks import check_settings
from ..registry import register_schedule
from .base import Schedule

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
        from ..engines.stage_parallel.trainer import StageParallelTrainer
        return StageParallelTrainer(cfg)


_ENGINE_PARTS = ('checks', 'handoff', 'launch', 'part', 'state', 'steps', 'trainer')


def __getattr__(name: str):
    """The engine's modules and trainer were this package's before 0.2.0 (``from ...stage_parallel import trainer``
    still works, with a DeprecationWarning); they live in ``train/engines/stage_parallel/``."""
    if name in _ENGINE_PARTS or name == 'StageParallelTrainer':
        import importlib
        import warnings
        where = 'timm_hff.train.engines.stage_parallel'
        warnings.warn(f'{__name__}.{name} moved to {where}; import it from there', DeprecationWarning, stacklevel=2)
        if name == 'StageParallelTrainer':
            return importlib.import_module(f'{where}.trainer').StageParallelTrainer
        return importlib.import_module(f'{where}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
