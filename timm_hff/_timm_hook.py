"""Registering the ``hff_*`` names into timm the moment timm is imported, without importing timm ourselves.

``import timm_hff`` must not cost torch's and timm's import (every CLI parses its arguments first), yet after it
``timm.create_model('hff_resnet18')`` must work. So: when timm is already imported, register now; otherwise a finder
on ``sys.meta_path`` waits for ``import timm`` (by anyone, in any order), lets timm's own loader run it to the end,
then registers, and removes itself.
"""
import importlib.abc
import importlib.util
import sys

__all__ = ['register_with_timm']


def _register() -> None:
    from ._registry import register_all
    register_all()


class _AfterTimm(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)   # find timm's own spec with the rest of the path
        spec = importlib.util.find_spec('timm')
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()
        spec.loader.exec_module = exec_module
        return spec


def register_with_timm() -> None:
    timm = sys.modules.get('timm')
    if timm is not None and hasattr(timm, 'create_model'):
        _register()
    elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())
