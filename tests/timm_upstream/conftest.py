"""timm's own ``tests/test_models.py`` (vendored unedited, see README.md here) run over the ``hff_*`` models.

Run through ``python -m benchmarks.timm_contract`` (or the slow test in tests/test_timm_contract.py), never by the
project's default test command (tests/conftest.py ignores this folder). Two things differ from running it inside timm:

- ``import timm_hff`` registers the ``hff_*`` names before the file is collected;
- timm's file picks models for some tests by the module that registered them (``list_models(module=...)``, the timm
  modules known to support ``forward_intermediates``); ``timm_hff`` is not one of them, so those lists get the
  ``hff_*`` names added, as the issue that asked for this harness did by hand. No test body is changed.
"""
import timm
import timm.models._registry as registry

import timm_hff  # noqa: F401  (registers the hff_* models)

_list_models = registry.list_models


def _with_hff(*args, **kwargs):
    names = _list_models(*args, **kwargs)
    if kwargs.get('module') and not kwargs.get('pretrained'):
        extra = [n for n in _list_models('hff_*', exclude_filters=kwargs.get('exclude_filters', ''))
                 if n not in names]
        names = sorted(names + extra)
    return names


timm.list_models = registry.list_models = _with_hff


def wrapped_arch(name: str) -> str:
    from timm_hff._names import registered_defaults
    return registered_defaults(name)[0]


def non_std(name: str) -> bool:
    """Whether timm's file would route the wrapped architecture to its non-standard tests (ViT-like: token
    outputs, no pool size). It routes by name pattern, which an ``hff_`` prefix defeats."""
    import fnmatch
    import test_models
    return any(fnmatch.fnmatch(wrapped_arch(name), f) for f in test_models.NON_STD_FILTERS)


def pytest_collection_modifyitems(config, items):
    """An ``hff_*`` ViT goes where timm sends the ViT it wraps: out of ``test_model_default_cfgs`` (timm's own ViTs
    are excluded from it by ``NON_STD_FILTERS``) and into ``test_model_default_cfgs_non_std``
    (test_hff_non_std.py calls timm's test body for it)."""
    keep, dropped = [], []
    for item in items:
        spec = getattr(item, 'callspec', None)
        name = spec.params.get('model_name', '') if spec else ''
        if item.originalname == 'test_model_default_cfgs' and name.startswith('hff_') and non_std(name):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
