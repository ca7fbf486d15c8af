"""``load_pretrained_hff``: validate ``config.json``, build the model it describes, load and check its weights.

The config is validated before any module is built, then held against the weights header on the meta device
(``_dry_build``), so nothing is allocated that the weights do not back; the rebuilt stages must be the saved ones,
and every failure is one line. ``load_from_timm_source`` serves ``timm.create_model('hf-hub:...')`` the same way.
"""
import dataclasses
import warnings
from typing import Any, Dict, Optional, Tuple

import timm
import torch

from ..core import HFFConfig, short_repr
from ..model import HFFModel, create_from_timm
from ._dry_build import check_head_shapes, check_shapes, dry_build, translate_errors
from ._errors import ShapeMismatchError
from ._format import RUNTIME_SETTINGS, SavedConfig, read_config
from ._resolve import HUB_KWARGS, resolve
from ._weights import check_weights, load_weights

__all__ = ['load_from_timm_source', 'load_pretrained_hff', 'load_state_checked']


def load_pretrained_hff(model_name: str, pretrained: bool = True, num_classes: Optional[int] = None,
                        in_chans: Optional[int] = None, hff_cfg: Optional[HFFConfig] = None, **kwargs) -> HFFModel:
    """Build (and with ``pretrained`` load) a saved HFF model from ``'hf-hub:org/repo[@rev]'`` or ``'local-dir:/path'``.

    ``timm_hff.create_model`` dispatches those prefixes here. Downloads go through ``huggingface_hub``, so
    ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE`` and saved tokens apply.

    Args:
        model_name: ``'hf-hub:org/repo'``, ``'hf-hub:org/repo@revision'`` or ``'local-dir:/path/to/folder'``.
        pretrained: Load the saved weights; False builds the saved architecture with fresh weights.
        num_classes: A different class count re-initialises every stage's prototypes (with a warning) and keeps
            the backbone and aux blocks: the start of transfer to a new label set.
        in_chans: A different channel count adapts the stem's weights as timm does.
        hff_cfg: Settings to use instead of the saved ones. With ``pretrained`` only the settings that do not
            change any weight's shape may differ (``RUNTIME_SETTINGS``).
        **kwargs: ``revision``, ``cache_dir``, ``token``, ``force_download``, ``local_files_only`` (Hub), then HFF
            settings and timm kwargs (e.g. ``drop_path_rate``) overriding the saved ones.
    """
    files = resolve(model_name, **{k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs})

    saved = read_config(files.config(), where=files.where)
    cfg, timm_kwargs = _merge_settings(saved, hff_cfg, kwargs, pretrained, files.where)
    new_chans = saved.in_chans if in_chans is None else in_chans
    state = None
    if pretrained:   # nothing is allocated before the config is held against the weights header
        header = check_weights(files.weights(), saved.weights_sha256, where=files.where)
        check_head_shapes(saved, header, files.where)
        meta = dry_build(lambda: create_from_timm(saved.arch, dataclasses.replace(cfg), pretrained=False,
                                                  num_classes=saved.num_classes, in_chans=saved.in_chans,
                                                  **timm_kwargs), header, files.where)
        _check_stages(meta, saved, files.where)
        del meta
        state = load_weights(files.weights(), where=files.where)
    build_classes = saved.num_classes if pretrained or num_classes is None else num_classes
    with translate_errors(files.where):
        model = create_from_timm(saved.arch, cfg, pretrained=False, num_classes=build_classes, in_chans=new_chans,
                                 **timm_kwargs)
    _check_stages(model, saved, files.where)
    if state is not None:
        if new_chans != saved.in_chans:
            _adapt_first_conv(model, state, new_chans, saved.in_chans)
        load_state_checked(model, state, files.where)

    pcfg = dict(saved.pretrained_cfg)
    pcfg.update(files.source_fields())
    if new_chans != saved.in_chans and isinstance(pcfg.get('input_size'), list):
        pcfg['input_size'] = [new_chans, *pcfg['input_size'][1:]]
    if saved.label_names:
        pcfg['label_names'] = list(saved.label_names)
    model.pretrained_cfg.update(pcfg)
    model.settle_pretrained_cfg()   # folders saved before the fields were kept true load with the same truth
    if num_classes is not None and num_classes != saved.num_classes:
        if pretrained:
            warnings.warn(f'{files.where} was trained for {saved.num_classes} classes; num_classes={num_classes} '
                          f're-initialises the prototypes of every stage (backbone and aux blocks are kept)',
                          stacklevel=2)
            model.reset_classifier(num_classes)
        model.pretrained_cfg.pop('label_names', None)
        model.pretrained_cfg['num_classes'] = num_classes
    return model


def load_from_timm_source(pretrained: bool, kwargs: Dict[str, Any]) -> Optional[HFFModel]:
    """Serve ``timm.create_model('hf-hub:...' | 'local-dir:...')`` for an HFF config; None if not such a call.

    timm reads ``config.json``, finds the ``hff_timm`` entrypoint and calls it with a ``pretrained_cfg`` naming
    the source and with ``model_args`` merged into the kwargs. The saved model is then loaded whole through
    ``load_pretrained_hff``; kwargs equal to the saved ``model_args`` are timm's defaults, not overrides.
    """
    pcfg = kwargs.get('pretrained_cfg')
    if hasattr(pcfg, 'to_dict'):
        pcfg = pcfg.to_dict()
    if not isinstance(pcfg, dict):
        return None
    if pcfg.get('source') == 'hf-hub' and pcfg.get('hf_hub_id'):
        name = f"hf-hub:{pcfg['hf_hub_id']}"
    elif pcfg.get('source') == 'local-dir' and pcfg.get('file'):
        name = f"local-dir:{pcfg['file']}"
    else:
        return None
    kwargs = dict(kwargs)
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay'):
        kwargs.pop(key, None)
    saved_args = kwargs.pop('pretrained_model_args', None) or {}
    overrides = {k: v for k, v in kwargs.items() if v is not None and not (k in saved_args and saved_args[k] == v)}
    return load_pretrained_hff(name, pretrained=pretrained, **overrides)


def _merge_settings(saved: SavedConfig, hff_cfg: Optional[HFFConfig], kwargs: Dict[str, Any], pretrained: bool,
                    where: str) -> Tuple[HFFConfig, Dict[str, Any]]:
    """Saved settings, overridden by the caller's; with ``pretrained``, only shape-neutral HFF settings may change."""
    hff_kwargs, timm_overrides = HFFConfig.split_kwargs({k: v for k, v in kwargs.items() if v is not None})
    if hff_cfg is not None and hff_kwargs:
        raise ValueError(f'give HFF settings either as hff_cfg or as keyword arguments, not both '
                         f'({sorted(hff_kwargs)})')
    saved_dict = saved.cfg.to_dict()
    wanted = {**saved_dict, **(hff_cfg.to_dict() if hff_cfg is not None else hff_kwargs)}
    if pretrained:
        changed = sorted(k for k in wanted if k not in RUNTIME_SETTINGS and wanted[k] != saved_dict[k])
        if changed:
            raise ValueError(f'{where}: {changed} would change the saved architecture, so the weights could not load; '
                             f'only {list(RUNTIME_SETTINGS)} may differ with pretrained=True (use pretrained=False '
                             f'for a fresh model with other settings)')
    cfg = HFFConfig.from_dict(wanted)
    return cfg, {**saved.timm_kwargs, **timm_overrides}


def _check_stages(model: HFFModel, saved: SavedConfig, where: str) -> None:
    """The rebuilt cut must be the saved one (a timm upgrade could move feature_info taps)."""
    if not saved.stages:
        return
    want = [(s.get('feature_index'), s.get('channels')) for s in saved.stages]
    got = [(i if isinstance(i, str) else int(i), int(c))
           for i, c in zip(model.split.feature_indices, model.split.channels, strict=True)]
    if want != got:
        raise ShapeMismatchError(f'{where}: the stages rebuilt with timm {timm.__version__} are (feature index, '
                                 f'channels) {short_repr(got, 200)}, the saved ones {short_repr(want, 200)}; load it '
                                 f'with the timm version that saved it')


def _adapt_first_conv(model: HFFModel, state: Dict[str, torch.Tensor], in_chans: int, saved_chans: int) -> None:
    from timm.models import adapt_input_conv
    from ..model import first_convs
    first = first_convs(model.backbone, in_chans)   # a deep stem's conv1.0, not timm's cfg's conv1
    for name in ((first,) if isinstance(first, str) else tuple(first or ())):
        key = f'{name}.weight'
        if key in state:
            state[key] = adapt_input_conv(in_chans, state[key], base_chans=saved_chans)


def load_state_checked(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first tensor that does not fit."""
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, where)
    model.load_state_dict(state, strict=True)
