"""Deprecated path of the Accelerate engine: it lives in ``timm_hff.train.engines.accelerate.trainer`` with the other engines. This alias keeps
``timm_hff.train.trainer`` imports working."""
from .engines.accelerate.trainer import *  # noqa: F401,F403
from .engines.accelerate.trainer import __all__  # noqa: F401
