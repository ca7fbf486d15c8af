"""``hff_*`` names: a timm architecture plus HFF defaults, registered into timm's own registry.

After ``import timm_hff``, ``timm.create_model('hff_resnet18')`` and ``timm.list_models('hff_*')`` work, and so
does ``timm.create_model('hf-hub:...')`` / ``('local-dir:...')`` on a saved HFF model, whose ``architecture`` is
the generic ``hff_timm`` entrypoint (or any ``hff_*`` name). Any other timm architecture also resolves as
``hff_<arch>`` through ``timm_hff.create_model``. The names and their defaults are ``_names``'s; this module registers
them, as soon as timm is imported (``_timm_hook``), and an entrypoint loads the factory only when it is called, so
registering costs no more than timm's own import.
"""
import fnmatch
from typing import Any, List, Union

from ._names import GENERIC_ARCH, HFF_DEFAULTS, registered_defaults

__all__ = ['list_models', 'register_all']


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        from ._factory import create_model
        from .hub import load_from_timm_source
        saved = load_from_timm_source(pretrained, kwargs)  # timm.create_model('hf-hub:...'/'local-dir:...')
        if saved is not None:
            return saved
        kwargs.pop('pretrained_cfg', None)
        if name == GENERIC_ARCH:
            arch = kwargs.pop('arch', None)
            if not isinstance(arch, str) or not arch:
                raise ValueError(f"{GENERIC_ARCH} wraps any timm architecture: pass arch='<timm model name>'")
            return create_model(arch, pretrained=pretrained, **kwargs)
        return create_model(name, pretrained=pretrained, **kwargs)
    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'HFF-wrapped {registered_defaults(name)[0]} (timm_hff).'
    return entrypoint


def register_all() -> None:
    """Register every ``hff_*`` name into timm's registry (idempotent)."""
    import timm
    from timm.models import register_model
    for name in (*HFF_DEFAULTS, GENERIC_ARCH):
        if name not in timm.list_models('hff_*'):
            fn = _make_entrypoint(name)
            globals()[name] = fn
            register_model(fn)


def list_models(pattern: Union[str, List[str]] = '', **timm_kwargs: Any) -> List[str]:
    """Names ``create_model`` accepts: registered ``hff_*`` names, then timm architectures matching ``pattern``."""
    import timm
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    hff = [n for n in HFF_DEFAULTS if not patterns or not patterns[0] or any(fnmatch.fnmatch(n, p) for p in patterns)]
    arch = [n for n in timm.list_models(pattern, **timm_kwargs) if not n.startswith('hff_')]
    return sorted(hff) + arch
