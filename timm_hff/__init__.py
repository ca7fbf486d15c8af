"""timm-hff: Hyperspherical Forward-Forward local learning for any timm backbone.

Importing this package registers the ``hff_*`` models into timm's registry (as soon as timm is imported: see
``_timm_hook``). Its public names load on first use (``_lazy``), so ``import timm_hff`` and the CLIs' ``--help``
start in a fraction of a second.
"""
from .version import __version__
from ._lazy import lazy_exports
from ._timm_hook import register_with_timm

_EXPORTS = {
    'HFFConfig': '._config', 'Head': '.heads', 'PrototypeHead': '.heads', 'register_head': '.heads',
    'SplitError': '._stages',
    'StageSplit': '._stages', 'run_stages': '._cuts', 'HFFModel': '._model', 'HFFOutput': '._model',
    'build_hff_model': '._builder', 'ExitCalibration': '._exit', 'ExitStats': '._exit', 'calibrate_exits': '._exit',
    'best_fit_exits': '._exit', 'create_model': '._factory', 'list_models': '._registry',
    'PretrainedWeightsError': '._pretrained', 'compile_model': '._compile', 'exit_stats': '._exit',
    'fit_exits': '._exit', 'stage_profile': '._profile', 'format_profile': '._profile',
    **{name: '.hub' for name in (
        'CheckpointError', 'CheckpointFileNotFoundError', 'ConfigError', 'CorruptCheckpointError', 'ExportError',
        'FormatVersionError', 'ShapeMismatchError', 'UnknownArchitectureError', 'UnsafeCheckpointError',
        'export_timm', 'load_pretrained_hff', 'push_to_hub', 'save_pretrained', 'seed_timm_cache')},
}
__all__ = ['__version__', *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
register_with_timm()
