"""Deprecated path of the Accelerate engine's epoch loop: it lives in ``timm_hff.train.engines.accelerate.steps`` with the other engines. This alias keeps
``timm_hff.train.steps`` imports working."""
from .engines.accelerate.steps import *  # noqa: F401,F403
from .engines.accelerate.steps import __all__  # noqa: F401
