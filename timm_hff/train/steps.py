"""Deprecated path of the Accelerate engine's epoch loop: it lives in ``timm_hff.train.engines.accelerate.steps`` with the other engines. Importing
this path gives that very module (so attributes read or patched here are the engine's own), with a DeprecationWarning.
"""
import importlib
import sys
import warnings

warnings.warn('timm_hff.train.steps moved to timm_hff.train.engines.accelerate.steps; import it from there', DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = importlib.import_module('timm_hff.train.engines.accelerate.steps')
__all__ = sys.modules[__name__].__all__
