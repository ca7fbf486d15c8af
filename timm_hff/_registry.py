"""``hff_*`` names: a timm architecture plus HFF defaults, registered into timm's own registry.

After ``import timm_hff``, ``timm.create_model('hff_resnet18')`` and ``timm.list_models('hff_*')`` work, and so
does ``timm.create_model('hf-hub:...')`` / ``('local-dir:...')`` on a saved HFF model, whose ``architecture`` is
the generic ``hff_timm`` entrypoint (or any ``hff_*`` name). Any other timm architecture also resolves as
``hff_<arch>`` through ``timm_hff.create_model``. The names and their defaults are ``_names``'s; this module registers
them, as soon as timm is imported (``_timm_hook``), and an entrypoint loads the factory only when it is called, so
registering costs no more than timm's own import.
"""
import fnmatch
from typing import Any, Dict, List, Union

from ._names import CFG_OVERRIDES, GENERIC_ARCH, HFF_DEFAULTS, REGISTERED_PREDICT_FROM, registered_defaults

__all__ = ['default_cfgs', 'list_models', 'register_all']

# timm's ``register_model`` reads the entrypoint module's ``default_cfgs``: each name's cfg (the architecture's
# preprocessing, 1000 classes, no weights), so ``timm.models.get_pretrained_cfg('hff_resnet18')`` and the registry
# filters (``name_matches_cfg``) know these names as they know timm's own
default_cfgs: Dict[str, Dict[str, Any]] = {}


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        from ._factory import create_model
        from ._features import as_feature_extractor, pop_feature_kwargs
        from .hub import load_from_timm_source
        features = pop_feature_kwargs(kwargs)   # applied once, to whichever model comes back
        model = load_from_timm_source(pretrained, kwargs)  # timm.create_model('hf-hub:...'/'local-dir:...')
        if model is None:
            kwargs.pop('pretrained_cfg', None)
            arch = name
            if name == GENERIC_ARCH:   # any timm architecture, with the registered names' defaults
                arch = kwargs.pop('arch', None)
                if arch is None:
                    arch = registered_defaults(name)[0]
                if not isinstance(arch, str) or not arch:
                    raise ValueError(f"{GENERIC_ARCH} wraps any timm architecture: pass arch='<timm model name>', "
                                     f"got {arch!r}")
                kwargs.setdefault('predict_from', REGISTERED_PREDICT_FROM)
            model = create_model(arch, pretrained=pretrained, **kwargs)
        return as_feature_extractor(model, **features) if features else model
    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'HFF-wrapped {registered_defaults(name)[0]} (timm_hff).'
    return entrypoint


def registered_cfg(name: str) -> Dict[str, Any]:
    """The default pretrained cfg of a registered name: its timm architecture's, as an HFF model of it reports it
    (``_timm_cfg.hff_pretrained_cfg``), with the name's own overrides."""
    from timm.models import get_pretrained_cfg
    from ._timm_cfg import hff_pretrained_cfg, settle_cfg
    arch = registered_defaults(name)[0]
    base = get_pretrained_cfg(arch, allow_unregistered=True)
    cfg = hff_pretrained_cfg(base.to_dict() if base is not None else None, 1000)
    cfg.update(CFG_OVERRIDES.get(name, {}))
    return settle_cfg(cfg)


def register_all() -> None:
    """Register every ``hff_*`` name into timm's registry (idempotent)."""
    import timm
    from timm.models import register_model
    for name in (*HFF_DEFAULTS, GENERIC_ARCH):
        if name not in timm.list_models('hff_*'):
            fn = _make_entrypoint(name)
            globals()[name] = fn
            default_cfgs[name] = registered_cfg(name)
            register_model(fn)


def list_models(pattern: Union[str, List[str]] = '', **timm_kwargs: Any) -> List[str]:
    """Names ``create_model`` accepts: registered ``hff_*`` names, then timm architectures matching ``pattern``."""
    import timm
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    hff = [n for n in HFF_DEFAULTS if not patterns or not patterns[0] or any(fnmatch.fnmatch(n, p) for p in patterns)]
    arch = [n for n in timm.list_models(pattern, **timm_kwargs) if not n.startswith('hff_')]
    return sorted(hff) + arch
