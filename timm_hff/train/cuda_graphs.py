"""Deprecated path of the CUDA-graph capture: it lives in ``timm_hff.train.engines.cuda_graphs`` with the other engines. Importing
this path gives that very module (so attributes read or patched here are the engine's own), with a DeprecationWarning.
"""
import importlib
import sys
import warnings

warnings.warn('timm_hff.train.cuda_graphs moved to timm_hff.train.engines.cuda_graphs; import it from there', DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = importlib.import_module('timm_hff.train.engines.cuda_graphs')
__all__ = sys.modules[__name__].__all__
