"""Deprecated path of the CUDA-graph capture: it lives in ``timm_hff.train.engines.cuda_graphs`` with the other engines. This alias keeps
``timm_hff.train.cuda_graphs`` imports working."""
from .engines.cuda_graphs import *  # noqa: F401,F403
from .engines.cuda_graphs import __all__  # noqa: F401
