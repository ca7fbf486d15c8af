"""Deprecated path of the Accelerate engine: it lives in ``timm_hff.train.engines.accelerate.trainer`` with the other
engines. Importing this path gives that very module (so attributes read or patched here are the engine's own), with a
DeprecationWarning."""
from ..core import moved_module

__all__ = moved_module(__name__, 'timm_hff.train.engines.accelerate.trainer')
