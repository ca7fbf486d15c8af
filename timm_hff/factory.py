"""``create_model`` and ``list_models`` for the packages above the Hub loader (``baselines``, ``train``, ``cli``):
the factory sits above ``hub`` (it loads ``hf-hub:`` / ``local-dir:`` names through it), so it has a face of its own
rather than one shared with ``model`` below the loader."""
from ._factory import create_model
from ._registry import list_models

__all__ = ['create_model', 'list_models']
