"""timm-hff: Hyperspherical Forward-Forward local learning for any timm backbone.

Importing this package registers the ``hff_*`` models into timm's registry.
"""
from .version import __version__
from ._config import HFFConfig
from ._heads import PrototypeHead
from ._stages import SplitError, StageSplit
from ._cuts import run_stages
from ._model import HFFModel, HFFOutput
from ._builder import build_hff_model
from ._exit import ExitCalibration, calibrate_exits
from ._factory import create_model
from ._registry import list_models
from .hub import (
    CheckpointError, CheckpointFileNotFoundError, ConfigError, CorruptCheckpointError, ExportError, FormatVersionError,
    ShapeMismatchError, UnknownArchitectureError, UnsafeCheckpointError, export_timm, load_pretrained_hff, push_to_hub,
    save_pretrained)
