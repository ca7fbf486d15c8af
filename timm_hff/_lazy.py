"""Package faces that load on use: ``from timm_hff import create_model`` imports the module that defines it then, not
before, so ``import timm_hff`` (and every CLI's ``--help`` and argument errors) starts without torch, timm or
``datasets``. timm's own ``timm/__init__`` is eager; ours are not, because our CLIs parse their arguments first.
"""
import importlib
import sys
import warnings
from typing import Callable, Dict, List, Tuple

__all__ = ['lazy_exports', 'moved_module']


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """(``__getattr__``, ``__dir__``) for ``package``: ``exports`` maps each public name to the submodule (relative,
    e.g. ``'._factory'``) that defines it. A name resolved once is cached on the package."""
    def __getattr__(name: str):
        where = exports.get(name)
        if where is None:
            raise AttributeError(f'module {package!r} has no attribute {name!r}')
        value = getattr(importlib.import_module(where, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))
    return __getattr__, __dir__


def moved_module(old: str, new: str) -> List[str]:
    """Make the module ``old`` (a deprecated path, the caller's ``__name__``) the very module ``new``, so attributes
    read or patched through the old path are the new module's own; warns once on import. Returns ``new``'s
    ``__all__`` for the alias to declare."""
    warnings.warn(f'{old} moved to {new}; import it from there', DeprecationWarning, stacklevel=3)
    sys.modules[old] = module = importlib.import_module(new)
    return module.__all__
