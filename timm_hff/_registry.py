"""``hff_*`` names: a timm architecture plus HFF defaults, registered into timm's own registry.

After ``import timm_hff``, ``timm.create_model('hff_resnet18')`` and ``timm.list_models('hff_*')`` work, and so
does ``timm.create_model('hf-hub:...')`` / ``('local-dir:...')`` on a saved HFF model, whose ``architecture`` is
the generic ``hff_timm`` entrypoint (or any ``hff_*`` name).
Any other timm architecture also resolves as ``hff_<arch>`` through ``timm_hff.create_model``.
"""
import fnmatch
from typing import Any, Dict, List, Tuple, Union

import timm
from timm.models import register_model

# Registered names and the HFF defaults they carry on top of HFFConfig's.
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'hff_resnet18': dict(),
    'hff_resnet34': dict(),
    'hff_resnet50': dict(),
    'hff_resnet18_small': dict(arch='resnet18', small_input=True),
    'hff_convnext_atto': dict(),
    'hff_convnext_tiny': dict(),
    'hff_efficientnet_b0': dict(),
    'hff_mobilenetv3_small_050': dict(),
    'hff_regnetx_002': dict(),
    'hff_vit_tiny_patch16_224': dict(),
    'hff_vit_small_patch16_224': dict(),
    'hff_deit_tiny_patch16_224': dict(),
    'hff_swin_tiny_patch4_window7_224': dict(),
}


# The ``architecture`` that saved HFF configs name: one entrypoint for every wrapped timm architecture (the timm
# arch is in ``model_args['arch']``), so ``timm.create_model('hf-hub:...')`` resolves any HFF checkpoint.
GENERIC_ARCH = 'hff_timm'


def registered_defaults(name: str) -> Tuple[str, Dict[str, Any]]:
    """(timm architecture, HFF defaults) for an ``hff_*`` name; unregistered ``hff_<arch>`` gets no defaults."""
    defaults = dict(_DEFAULTS.get(name, {}))
    arch = defaults.pop('arch', name[len('hff_'):])
    return arch, defaults


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        from ._factory import create_model
        from ._hub import load_from_timm_source
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


def _register_all() -> None:
    for name in (*_DEFAULTS, GENERIC_ARCH):
        if name not in timm.list_models('hff_*'):
            fn = _make_entrypoint(name)
            globals()[name] = fn
            register_model(fn)


def list_models(pattern: Union[str, List[str]] = '', **timm_kwargs: Any) -> List[str]:
    """Names ``create_model`` accepts: registered ``hff_*`` names, then timm architectures matching ``pattern``."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    hff = [n for n in _DEFAULTS if not patterns or not patterns[0] or any(fnmatch.fnmatch(n, p) for p in patterns)]
    arch = [n for n in timm.list_models(pattern, **timm_kwargs) if not n.startswith('hff_')]
    return sorted(hff) + arch


_register_all()
