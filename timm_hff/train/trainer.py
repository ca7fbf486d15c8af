"""Deprecated path of the Accelerate engine: it lives in ``timm_hff.train.engines.accelerate.trainer`` with the other engines. Importing
this path gives that very module (so attributes read or patched here are the engine's own), with a DeprecationWarning.
"""
import importlib
import sys
import warnings

warnings.warn('timm_hff.train.trainer moved to timm_hff.train.engines.accelerate.trainer; import it from there', DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = importlib.import_module('timm_hff.train.engines.accelerate.trainer')
__all__ = sys.modules[__name__].__all__
