"""The HFF model's public face for the packages above it (``hub``, ``baselines``, ``train``): the model, its cut, its
profile, its exits and how a backbone is built and wrapped. The root's ``__init__`` is the user's face; it sits above
``hub`` and cannot serve the packages below it, so they import this one (it imports torch and timm)."""
from ._builder import create_from_timm
from ._compile import compile_model
from ._cuts import run_stages
from ._exit import ExitCalibration, exit_stats, fit_exits
from ._exit_guarantee import min_calibration_images
from ._meta import MetaValues
from ._model import HFFModel
from ._pretrained import create_timm_model
from ._profile import format_profile, stage_profile
from ._small_input import adapt_small_input
from ._stages import StageSplit, stage_modules, stem_split
from ._timm_cfg import first_convs, settle_cfg

__all__ = ['ExitCalibration', 'HFFModel', 'MetaValues', 'StageSplit', 'adapt_small_input', 'compile_model',
           'create_from_timm', 'create_timm_model', 'exit_stats', 'first_convs', 'fit_exits', 'format_profile',
           'min_calibration_images', 'run_stages', 'settle_cfg', 'stage_modules', 'stage_profile', 'stem_split']
