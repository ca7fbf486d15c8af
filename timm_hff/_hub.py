"""Save, load and push HFF models in timm's Hub layout: ``config.json`` + ``model.safetensors`` + ``README.md``.

``config.json`` keeps timm's layout (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``,
``model_args``), so ``timm.create_model('hf-hub:org/repo', pretrained=True)`` works after ``import timm_hff``, and
adds an ``hff`` section with everything needed to rebuild the stages and heads exactly:

    "architecture": "hff_timm",              # one generic entrypoint for every wrapped timm architecture
    "model_args": {"arch": "resnet18", ...}, # the entrypoint's kwargs (timm's convention)
    "hff": {"format_version": 1, "arch": "resnet18", "in_chans": 3, "config": {<HFFConfig>},
            "timm_kwargs": {...}, "label_names": [...], "weights_sha256": "...", "stages": [...],
            "metrics": {...}, "train_args": {...}, "base_model": "timm/resnet18.a1_in1k"}

Loading reads only the ``hff`` section. It is validated (known keys, types, ranges, format version) before any
module is built, weights are read only from ``.safetensors`` (pickles are refused, never opened), and every
failure is one line naming the file, what is wrong and what to do.
"""
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import safetensors
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from ._config import HFFConfig
from ._factory import create_from_timm
from ._model import HFFModel
from ._profile import stage_profile
from ._registry import GENERIC_ARCH
from .version import __version__

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1                      # bump when a reader of the previous version would misread a file
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CARD_NAME = 'README.md'
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.ckpt', '.tar')
MAX_CONFIG_BYTES = 10 * 2 ** 20        # an HFF config is a few KB; refuse to parse something huge

_TOP_KEYS = {'architecture', 'num_classes', 'num_features', 'global_pool', 'label_names', 'label_descriptions',
             'model_args', 'pretrained_cfg', 'hff'}
_HFF_REQUIRED = {'format_version', 'arch', 'in_chans', 'config', 'timm_kwargs'}
_HFF_KEYS = _HFF_REQUIRED | {'library_version', 'label_names', 'weights_sha256', 'stages', 'num_params', 'metrics',
                             'train_args', 'base_model'}
# timm kwargs a config.json may never set: they load files, change the task, or are set by the loader itself.
_FORBIDDEN_TIMM_KWARGS = {'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args',
                          'checkpoint_path', 'cache_dir', 'num_classes', 'in_chans', 'features_only', 'out_indices',
                          'feature_cls', 'scriptable', 'exportable', 'no_jit', 'device', 'dtype', 'arch'}
# HFF settings that do not change any parameter's shape, so they may differ from the saved ones on load.
RUNTIME_SETTINGS = ('predict_from', 'check_split', 'check_img_size', 'scale', 'margin')
_HUB_KWARGS = ('revision', 'cache_dir', 'token', 'force_download', 'local_files_only')
# short data set names used by recipes -> Hub ids (the card's ``datasets`` must be Hub ids)
DATASET_HUB_IDS = {
    'fashion_mnist': 'zalando-datasets/fashion_mnist', 'fashion-mnist': 'zalando-datasets/fashion_mnist',
    'fashionmnist': 'zalando-datasets/fashion_mnist', 'mnist': 'ylecun/mnist', 'cifar10': 'uoft-cs/cifar10',
    'cifar-10': 'uoft-cs/cifar10', 'cifar100': 'uoft-cs/cifar100', 'cifar-100': 'uoft-cs/cifar100',
    'imagenet1k': 'ILSVRC/imagenet-1k', 'imagenet-1k': 'ILSVRC/imagenet-1k', 'imagenet': 'ILSVRC/imagenet-1k',
}


# ----- errors -----
class CheckpointError(ValueError):
    """A saved HFF model cannot be read or written; the message says which file, what is wrong, what to do."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """``config.json`` or ``model.safetensors`` is missing (locally, in the Hub repo, or in the offline cache)."""


class UnsafeCheckpointError(CheckpointError):
    """Weights are a pickle (``.bin``/``.pth``/...): refused, because unpickling can run arbitrary code."""


class CorruptCheckpointError(CheckpointError):
    """``model.safetensors`` is truncated, not a safetensors file, or differs from the checksum in config.json."""


class ShapeMismatchError(CheckpointError):
    """The weights do not fit the model that ``config.json`` describes (shapes, missing or extra tensors)."""


class ConfigError(CheckpointError):
    """``config.json`` is not a valid HFF config (type, range, unknown key); checked before any module is built."""


class FormatVersionError(ConfigError):
    """``config.json`` was written by a newer timm_hff whose format this version cannot read safely."""


class UnknownArchitectureError(ConfigError):
    """``config.json`` names an architecture this timm / timm_hff does not have."""


# ----- the parsed, validated config -----
@dataclass
class SavedConfig:
    """What ``config.json`` says, after validation. ``raw`` is the parsed JSON, for the model card."""
    arch: str
    num_classes: int
    in_chans: int
    cfg: HFFConfig
    timm_kwargs: Dict[str, Any]
    label_names: Optional[List[str]] = None
    pretrained_cfg: Dict[str, Any] = field(default_factory=dict)
    weights_sha256: Optional[str] = None
    stages: Optional[List[Dict[str, Any]]] = None
    metrics: Optional[Dict[str, Any]] = None
    train_args: Optional[Dict[str, Any]] = None
    base_model: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict)


def parse_config(raw: Any, where: str = CONFIG_NAME) -> SavedConfig:
    """Validate a parsed ``config.json`` (untrusted input) and return what is needed to rebuild the model.

    Raises:
        FormatVersionError: Written by a newer format than ``FORMAT_VERSION``.
        UnknownArchitectureError: ``architecture`` or ``hff.arch`` is not known to this timm / timm_hff.
        ConfigError: Anything else: not an HFF config, unknown keys, wrong types or ranges.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f'{where}: expected a JSON object, got {type(raw).__name__}')
    hff = raw.get('hff')
    if not isinstance(hff, dict):
        raise ConfigError(f"{where} has no 'hff' section, so it is not a timm_hff model; load a plain timm "
                          f"checkpoint with timm.create_model(...) or wrap its architecture with "
                          f"timm_hff.create_model('<arch>', pretrained=True)")
    version = hff.get('format_version')
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f'{where}: hff.format_version must be an integer >= 1, got {version!r}')
    if version > FORMAT_VERSION:
        raise FormatVersionError(f'{where} uses HFF format version {version}, but timm_hff {__version__} reads up to '
                                 f'version {FORMAT_VERSION}; upgrade with `pip install -U timm-hff`')
    _check_keys(where, '', raw, _TOP_KEYS)
    _check_keys(where, 'hff.', hff, _HFF_KEYS)
    missing = sorted(_HFF_REQUIRED - set(hff))
    if missing:
        raise ConfigError(f'{where}: the hff section lacks {missing}; the file is incomplete, save the model again')

    architecture = raw.get('architecture', GENERIC_ARCH)
    if not isinstance(architecture, str) or not (
            architecture == GENERIC_ARCH or (architecture.startswith('hff_') and timm.is_model(architecture))):
        raise UnknownArchitectureError(f"{where}: architecture {architecture!r} is not an HFF entrypoint (expected "
                                       f"'{GENERIC_ARCH}'); the file was edited or is from another library")
    arch = hff['arch']
    if not isinstance(arch, str) or arch.startswith('hff_') or not timm.is_model(arch):
        raise UnknownArchitectureError(f'{where}: hff.arch {arch!r} is not an architecture of this timm '
                                       f'({timm.__version__}); upgrade timm or check the file')
    num_classes = _get_int(where, 'num_classes', raw.get('num_classes'), 1)
    in_chans = _get_int(where, 'hff.in_chans', hff['in_chans'], 1, 4096)
    if raw.get('num_features') is not None:
        _get_int(where, 'num_features', raw['num_features'], 1)
    try:
        cfg = HFFConfig.from_dict(hff['config'])
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{where}: hff.config: {_one_line(e)}') from None

    timm_kwargs = hff['timm_kwargs']
    if not isinstance(timm_kwargs, dict):
        raise ConfigError(f'{where}: hff.timm_kwargs must be an object, got {type(timm_kwargs).__name__}')
    bad = sorted(set(timm_kwargs) & (_FORBIDDEN_TIMM_KWARGS | set(HFFConfig.__dataclass_fields__)))
    if bad:
        raise ConfigError(f'{where}: hff.timm_kwargs may not set {bad} (they load files or are set by the loader)')

    label_names = hff.get('label_names', raw.get('label_names'))
    if label_names is not None:
        if not isinstance(label_names, list) or not all(isinstance(n, str) for n in label_names):
            raise ConfigError(f'{where}: label_names must be a list of strings')
        if len(label_names) != num_classes:
            raise ConfigError(f'{where}: {len(label_names)} label_names for num_classes={num_classes}')
        if raw.get('label_names') is not None and raw['label_names'] != label_names:
            raise ConfigError(f'{where}: label_names and hff.label_names disagree; the file was edited by hand')
    for key in ('pretrained_cfg', 'model_args'):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f'{where}: {key} must be an object, got {type(raw[key]).__name__}')
    for key in ('metrics', 'train_args'):
        if hff.get(key) is not None and not isinstance(hff[key], dict):
            raise ConfigError(f'{where}: hff.{key} must be an object, got {type(hff[key]).__name__}')
    sha = hff.get('weights_sha256')
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r'[0-9a-f]{64}', sha)):
        raise ConfigError(f'{where}: hff.weights_sha256 must be 64 lowercase hex digits, got {sha!r}')
    base_model = hff.get('base_model')
    if base_model is not None and not isinstance(base_model, str):
        raise ConfigError(f'{where}: hff.base_model must be a string, got {type(base_model).__name__}')
    stages = hff.get('stages')
    if stages is not None and (not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages)):
        raise ConfigError(f'{where}: hff.stages must be a list of objects')
    return SavedConfig(arch=arch, num_classes=num_classes, in_chans=in_chans, cfg=cfg, timm_kwargs=dict(timm_kwargs),
                       label_names=label_names, pretrained_cfg=dict(raw.get('pretrained_cfg') or {}),
                       weights_sha256=sha, stages=stages, metrics=hff.get('metrics'),
                       train_args=hff.get('train_args'), base_model=base_model, raw=raw)


def read_config(path: Union[str, Path], where: Optional[str] = None) -> SavedConfig:
    """Read and validate a ``config.json`` file."""
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise CheckpointFileNotFoundError(f'{where}: {CONFIG_NAME} not found; a saved HFF model folder holds '
                                          f'{CONFIG_NAME} and {WEIGHTS_NAME} (write them with save_pretrained)')
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f'{where}: {CONFIG_NAME} is {size / 2 ** 20:.1f} MiB, far too large for an HFF config')
    try:
        raw = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'{where}: {CONFIG_NAME} is not valid JSON ({_one_line(e)}); re-download or save again'
                          ) from None
    return parse_config(raw, where)


# ----- save -----
def save_pretrained(model, save_dir: Union[str, Path], label_names: Optional[Sequence[str]] = None,
                    metrics: Optional[Dict[str, Any]] = None, train_args: Optional[Dict[str, Any]] = None,
                    card: bool = True) -> str:
    """Write ``config.json``, ``model.safetensors`` and (with ``card``) a ``README.md`` model card.

    Writing is atomic: everything goes to a temporary folder next to ``save_dir``, is flushed to disk, and only
    then takes ``save_dir``'s place, so a crash never leaves a half-written model. Other regular files already
    in ``save_dir`` (logs, a recipe) are kept; a ``save_dir`` holding sub-folders is refused, because replacing
    it would move data save_pretrained does not own (save into a sub-folder such as ``run_dir/'model'``).

    Args:
        model: An ``HFFModel`` (Accelerate/DDP wrappers and ``torch.compile`` are unwrapped).
        save_dir: The model folder; created, or replaced once the new content is complete.
        label_names: Class names, index-aligned with the logits; default ``model.pretrained_cfg['label_names']``.
        metrics: Evaluation results for the card: ``top1`` (percent), ``stage_top1`` (one per stage),
            ``dataset`` (Hub id or a short name such as ``'fashion_mnist'``), and any measured cost
            (``train_time_s``, ``images_per_s``, ``peak_mem_mb``, ...). Stored in ``config.json``.
        train_args: The training recipe (hyper-parameters), stored in ``config.json`` and shown on the card.
            Preprocessing keys in timm's names (``img_size``/``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``) become the saved ``pretrained_cfg``, so timm's
            ``resolve_model_data_config`` reproduces the training preprocessing.
        card: Also write the model card (``README.md``).

    Returns:
        The folder written, as a string.
    """
    model = unwrap_model(model)
    config = build_config(model, label_names=label_names, metrics=metrics, train_args=train_args)
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(save_dir) as tmp:
        weights = tmp / WEIGHTS_NAME
        safetensors.torch.save_file(tensors, str(weights), metadata={'format': 'pt', 'hff_format': str(FORMAT_VERSION)})
        config['hff']['weights_sha256'] = file_sha256(weights)
        _write_json(tmp / CONFIG_NAME, config)
        if card:
            from ._card import build_model_card
            build_model_card(config).save(str(tmp / CARD_NAME))
    return str(Path(save_dir))


def unwrap_model(model) -> HFFModel:
    """The HFFModel inside Accelerate/DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    seen = 0
    while not isinstance(model, HFFModel) and seen < 8:
        inner = getattr(model, 'module', None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, '_orig_mod', None)
        if not isinstance(inner, torch.nn.Module):
            break
        model, seen = inner, seen + 1
    if not isinstance(model, HFFModel):
        raise TypeError(f'expected an HFFModel (from timm_hff.create_model), got {type(model).__name__}; plain timm '
                        f'models are saved with timm.models.push_to_hf_hub / save_for_hf')
    return model


def build_config(model: HFFModel, label_names: Optional[Sequence[str]] = None,
                 metrics: Optional[Dict[str, Any]] = None, train_args: Optional[Dict[str, Any]] = None
                 ) -> Dict[str, Any]:
    """The ``config.json`` content for ``model`` (without the weights checksum, added once they are written)."""
    if label_names is None:
        label_names = model.pretrained_cfg.get('label_names')
        if label_names is not None and len(label_names) != model.num_classes:
            label_names = None      # stale names from before a reset_classifier
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != model.num_classes:
            raise ValueError(f'{len(label_names)} label_names for a model with {model.num_classes} classes; give one '
                             f'name per class, in logit order')
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f'metrics must be a dict (e.g. {{"top1": 91.2, "stage_top1": [...]}}), got '
                         f'{type(metrics).__name__}')
    if train_args is not None and not isinstance(train_args, dict):
        raise ValueError(f'train_args must be a dict (the recipe), got {type(train_args).__name__}')
    metrics, train_args = _jsonable(metrics), _jsonable(train_args)
    for key in ('stage_top1', 'stage_top5'):
        values = (metrics or {}).get(key)
        if values is not None and (not isinstance(values, list) or len(values) != model.num_stages):
            raise ValueError(f"metrics['{key}'] must list one value per stage ({model.num_stages}), got {values!r}")

    timm_kwargs = saved_timm_kwargs(model.backbone)
    hff_cfg = model.hff_cfg.to_dict()
    split = model.split
    stages = []
    profile = stage_profile(model)
    for k in range(model.num_stages):
        n_params = sum(p.numel() for p in model.stage_parameters(k))
        p = profile[k]
        cut = split.feature_indices[k]
        stages.append(dict(feature_index=cut if isinstance(cut, str) else int(cut),
                           module=model.feature_info[k]['module'],
                           channels=int(split.channels[k]), reduction=int(split.reductions[k]),
                           layout=split.layouts[k], params=int(n_params), backbone_params=p['params'],
                           param_share=round(p['param_share'], 6), flops=p['flops'],
                           flops_share=round(p['flops_share'], 6), layers=p['layers'], head_flops=p['head_flops']))
    pretrained_cfg = _pretrained_cfg(model, train_args)
    model_args = {'arch': model.model_name, 'num_classes': model.num_classes, 'in_chans': model.in_chans,
                  **timm_kwargs, **{k: v for k, v in hff_cfg.items() if v is not None}}
    hff = {
        'format_version': FORMAT_VERSION,
        'library_version': __version__,
        'arch': model.model_name,
        'in_chans': model.in_chans,
        'config': hff_cfg,
        'timm_kwargs': timm_kwargs,
        'label_names': label_names,
        'stages': stages,
        'num_params': int(sum(p.numel() for p in model.parameters())),
        'metrics': metrics,
        'train_args': train_args,
        'base_model': _base_model(model, train_args),
    }
    config = {
        'architecture': GENERIC_ARCH,
        'num_classes': model.num_classes,
        'num_features': int(model.num_features),
        'label_names': label_names,
        'model_args': model_args,
        'pretrained_cfg': pretrained_cfg,
        'hff': {k: v for k, v in hff.items() if v is not None},
    }
    return {k: v for k, v in config.items() if v is not None}


def saved_timm_kwargs(backbone: torch.nn.Module) -> Dict[str, Any]:
    """The timm kwargs that rebuild ``backbone`` (timm's own ``get_model_args``, less class/channel counts)."""
    from timm.models._input import get_model_args
    out = {}
    for k, v in get_model_args(backbone).items():
        if k in ('num_classes', 'in_chans'):
            continue
        if k in _FORBIDDEN_TIMM_KWARGS:
            raise ValueError(f'the backbone was built with {k}=..., which a saved config may not carry; build it '
                             f'without')
        try:
            out[k] = json.loads(json.dumps(v, allow_nan=False))
        except (TypeError, ValueError):
            raise ValueError(f'timm kwarg {k}={v!r} cannot be written to config.json; build the backbone with a '
                             f"JSON value instead (e.g. act_layer='gelu' rather than a class)") from None
    return out


_DATA_KEYS = ('img_size', 'input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')


def _pretrained_cfg(model: HFFModel, train_args: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """timm's pretrained_cfg for the saved weights: the preprocessing they were trained with, not the backbone's
    ImageNet defaults, so ``timm.data.resolve_model_data_config(model)`` is right after loading."""
    from timm.data.model_config import resolve_input_data_config
    args = {k: train_args[k] for k in _DATA_KEYS if train_args and train_args.get(k) is not None}
    if 'img_size' not in args and 'input_size' not in args and model.hff_cfg.small_input:
        args['img_size'] = getattr(model.split, 'probe_img_size', 0) or 32
    try:
        data = resolve_input_data_config(model.backbone, args=args)
    except (TypeError, ValueError) as e:
        warnings.warn(f'train_args preprocessing {args} does not fit the model ({_one_line(e)}); saving the '
                      f"backbone's default preprocessing instead", stacklevel=2)
        data = resolve_input_data_config(model.backbone)
    source = model.backbone.pretrained_cfg or {}
    cfg = {k: source[k] for k in ('fixed_input_size', 'first_conv') if source.get(k) is not None}
    cfg.update({k: v for k, v in data.items() if v is not None})
    cfg.update(num_classes=model.num_classes, classifier='heads')
    return _jsonable(cfg)


def _base_model(model: HFFModel, train_args: Optional[Dict[str, Any]]) -> Optional[str]:
    """The Hub checkpoint this model was fine-tuned from, for the card's ``base_model``; None if from scratch."""
    train_args = train_args or {}
    if isinstance(train_args.get('base_model'), str):
        return train_args['base_model']
    source = model.pretrained_cfg.get('source')
    if source == 'hf-hub' and model.pretrained_cfg.get('hf_hub_id'):
        return str(model.pretrained_cfg['hf_hub_id']).split('@')[0]    # an HFF checkpoint it was loaded from
    start = train_args.get('model')
    if isinstance(start, str) and start.startswith('hf-hub:'):
        return start[len('hf-hub:'):].split('@')[0]
    if source == 'local-dir' or (isinstance(start, str) and start.startswith('local-dir:')):
        return None                                                     # a local checkpoint has no Hub id
    if train_args.get('pretrained') is True:                            # a timm-pretrained backbone
        return (model.backbone.pretrained_cfg or {}).get('hf_hub_id') or None
    return None


# ----- load -----
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
    source, ref = _split_source(model_name)
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    hub = {k: v for k, v in hub.items() if v is not None}
    files = _LocalFiles(ref) if source == 'local-dir' else _HubFiles(ref, **hub)
    if source == 'local-dir' and hub.get('revision'):
        raise ValueError(f"revision={hub['revision']!r} applies to 'hf-hub:' models, not to {model_name}")

    saved = read_config(files.config(), where=files.where)
    cfg, timm_kwargs = _merge_settings(saved, hff_cfg, kwargs, pretrained, files.where)
    new_chans = saved.in_chans if in_chans is None else in_chans
    state = None
    if pretrained:
        state = read_weights(files.weights(), saved.weights_sha256, where=files.where)
    build_classes = saved.num_classes if pretrained or num_classes is None else num_classes
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


def _split_source(model_name: str) -> Tuple[str, str]:
    for source in ('hf-hub', 'local-dir'):
        if isinstance(model_name, str) and model_name.startswith(source + ':'):
            ref = model_name[len(source) + 1:]
            if not ref:
                raise ValueError(f"'{model_name}' names no {'repository' if source == 'hf-hub' else 'folder'}")
            return source, ref
    raise ValueError(f"expected 'hf-hub:org/repo[@revision]' or 'local-dir:/path', got {model_name!r}")


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
                                 f'channels) {got}, the saved ones {want}; load it with the timm version that '
                                 f'saved it')


def _adapt_first_conv(model: HFFModel, state: Dict[str, torch.Tensor], in_chans: int, saved_chans: int) -> None:
    from timm.models import adapt_input_conv
    first = (model.backbone.pretrained_cfg or {}).get('first_conv')
    for name in ((first,) if isinstance(first, str) else tuple(first or ())):
        key = f'backbone.{name}.weight'
        if key in state:
            state[key] = adapt_input_conv(in_chans, state[key], base_chans=saved_chans)


def load_state_checked(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first tensor that does not fit."""
    expected = model.state_dict()
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
        raise ShapeMismatchError(f"{where}: tensor '{k}' is {list(got)} in {WEIGHTS_NAME} but {list(want)} in the "
                                 f"model built from {CONFIG_NAME}{more}; the two files come from different models")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"lacks '{missing[0]}'" if missing else f"has an unexpected tensor '{unexpected[0]}'"
        raise ShapeMismatchError(f'{where}: {WEIGHTS_NAME} {what} ({len(missing)} missing, {len(unexpected)} '
                                 f'unexpected); {CONFIG_NAME} and {WEIGHTS_NAME} come from different models')
    model.load_state_dict(state, strict=True)


def read_weights(path: Path, sha256: Optional[str] = None, where: str = '') -> Dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (never a pickle), checking its structure and, if known, its checksum."""
    where = where or str(path)
    path = Path(path)
    with open(path, 'rb') as f:
        head = f.read(9)
    if _looks_like_pickle(head, path.stat().st_size):
        raise UnsafeCheckpointError(f'{where}: {path.name} is a PyTorch pickle, not safetensors; it is refused '
                                    f'unopened. {_CONVERT_HINT}')
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            list(f.keys())
    except Exception as e:   # safetensors raises its own SafetensorError (not a subclass of anything useful)
        raise CorruptCheckpointError(f'{where}: {path.name} is truncated or corrupted ({_one_line(e)}); '
                                     f're-download it (force_download=True) or save the model again') from None
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            raise CorruptCheckpointError(f'{where}: {path.name} has sha256 {got[:12]}..., but {CONFIG_NAME} recorded '
                                         f'{sha256[:12]}...: the file is corrupted or was replaced; re-download '
                                         f'it (force_download=True) or save the model again')
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except Exception as e:
        raise CorruptCheckpointError(f'{where}: {path.name} cannot be read ({_one_line(e)})') from None


def _looks_like_pickle(head: bytes, size: int) -> bool:
    """A torch.save zip (``PK``) or a bare pickle (``\\x80`` + protocol 2-5), told apart from safetensors, whose
    8-byte little-endian header length (its first byte can be 0x80) is followed by the JSON header's ``{``."""
    if len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') <= size - 8:
        return False
    return head[:2] == b'PK' or (head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'))


_CONVERT_HINT = ("Convert it once, in a trusted environment: python -c \"import torch, safetensors.torch as st; "
                 "st.save_file(torch.load('<file>', weights_only=True), 'model.safetensors')\"")


def _pickle_names(names: Sequence[str]) -> List[str]:
    return sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))


def _unsafe_error(where: str, pickles: Sequence[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f'{where} holds only pickle weights ({", ".join(pickles)}), which timm_hff never '
                                 f'loads because unpickling can run arbitrary code. {_CONVERT_HINT}')


class _LocalFiles:
    """``local-dir:`` files."""

    def __init__(self, ref: str):
        self.root = Path(ref).expanduser()
        self.where = f'local-dir:{ref}'
        if self.root.is_file():
            if self.root.name.lower().endswith(PICKLE_SUFFIXES):
                raise _unsafe_error(self.where, [self.root.name])
            raise CheckpointFileNotFoundError(f'{self.where} is a file; local-dir: takes the folder that holds '
                                              f'{CONFIG_NAME} and {WEIGHTS_NAME}')
        if not self.root.is_dir():
            raise CheckpointFileNotFoundError(f'{self.where}: no such folder')

    def config(self) -> Path:
        return self.root / CONFIG_NAME

    def weights(self) -> Path:
        path = self.root / WEIGHTS_NAME
        if path.is_file():
            return path
        names = [p.name for p in self.root.iterdir() if p.is_file()]
        pickles = _pickle_names(names)
        if pickles:
            raise _unsafe_error(self.where, pickles)
        others = sorted(n for n in names if n.endswith('.safetensors'))
        hint = f'; found {others}: rename the right one to {WEIGHTS_NAME}' if others else ''
        raise CheckpointFileNotFoundError(f'{self.where}: {WEIGHTS_NAME} not found{hint} (or load with '
                                          f'pretrained=False for fresh weights)')

    def source_fields(self) -> Dict[str, Any]:
        return {'source': 'local-dir', 'file': str(self.root)}


class _HubFiles:
    """``hf-hub:`` files, through ``hf_hub_download`` (cache, offline mode, tokens, revisions)."""

    def __init__(self, ref: str, revision: Optional[str] = None, **hub_kwargs):
        repo_id, sep, rev = ref.partition('@')
        if sep and (not rev or '@' in rev):
            raise ValueError(f"'hf-hub:{ref}': write a revision as 'hf-hub:org/repo@revision' (one '@')")
        if rev and revision and rev != revision:
            raise ValueError(f"'hf-hub:{ref}' names revision {rev!r} but revision={revision!r} was also given")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ValueError(f"'hf-hub:{ref}': {_one_line(e)}") from None
        self.repo_id, self.revision, self.hub_kwargs = repo_id, rev or revision, hub_kwargs
        self.where = f'hf-hub:{repo_id}' + (f'@{self.revision}' if self.revision else '')
        self._config_path: Optional[Path] = None

    def _download(self, filename: str) -> Path:
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.revision, **self.hub_kwargs))
        except LocalEntryNotFoundError:
            raise CheckpointFileNotFoundError(
                f'{self.where}: {filename} is not in the local Hub cache and the Hub cannot be reached (offline '
                f'mode or no network); download it once online, or unset HF_HUB_OFFLINE') from None
        except EntryNotFoundError:
            raise CheckpointFileNotFoundError(f'{self.where}: the repository has no {filename}') from None
        except RevisionNotFoundError:
            raise CheckpointError(f'{self.where}: revision {self.revision!r} does not exist') from None
        except RepositoryNotFoundError:
            raise CheckpointError(f'{self.where}: repository not found or not accessible; check the id, or pass '
                                  f'token= (or run `hf auth login`) for a private or gated repository') from None

    def config(self) -> Path:
        self._config_path = self._download(CONFIG_NAME)
        return self._config_path

    def weights(self) -> Path:
        try:
            return self._download(WEIGHTS_NAME)
        except CheckpointFileNotFoundError:
            pickles = _pickle_names(self._known_files())
            if pickles:
                raise _unsafe_error(self.where, pickles) from None
            raise

    def _known_files(self) -> List[str]:
        """Files in the repo: the Hub listing when online, else what the cached snapshot holds."""
        names = []
        if self._config_path is not None:
            names += [p.name for p in self._config_path.parent.iterdir()]
        if not hf_constants.is_offline_mode() and not self.hub_kwargs.get('local_files_only'):
            try:
                names += HfApi().list_repo_files(self.repo_id, revision=self.revision,
                                                 token=self.hub_kwargs.get('token'))
            except Exception:   # listing is only for a better message; the missing-file error stands
                pass
        return names

    def source_fields(self) -> Dict[str, Any]:
        hub_id = self.repo_id + (f'@{self.revision}' if self.revision else '')
        return {'source': 'hf-hub', 'hf_hub_id': hub_id}


# ----- push -----
def push_to_hub(model_or_dir, repo_id: str, token: Optional[str] = None, private: bool = False,
                revision: Optional[str] = None, create_pr: bool = False,
                commit_message: str = 'Upload HFF model (timm_hff)', label_names: Optional[Sequence[str]] = None,
                metrics: Optional[Dict[str, Any]] = None, train_args: Optional[Dict[str, Any]] = None):
    """Upload an HFF model to the Hub with a freshly built model card.

    Uses ``HfApi.create_repo`` (``exist_ok``) and ``upload_folder``. Unlike timm's ``push_to_hf_hub``, the card
    (``README.md``) is rebuilt and uploaded on every push, from the metrics and recipe stored in
    ``config.json``, with the usage block naming ``repo_id``. Only ``config.json``, ``model.safetensors`` and
    ``README.md`` are uploaded; a saved folder is verified (config, checksum) before anything is sent.

    Args:
        model_or_dir: An ``HFFModel`` (saved to a temporary folder first) or a folder written by
            ``save_pretrained``.
        repo_id: ``'org/name'``.
        token: Hub token; default: ``HF_TOKEN`` or the saved login.
        private: Create the repository private (an existing repository keeps its visibility).
        revision: Branch to push to (created from the default branch if missing).
        create_pr: Open a pull request instead of committing directly.
        commit_message: The commit message.
        label_names, metrics, train_args: As in ``save_pretrained``; only used when a model is given.

    Returns:
        huggingface_hub's ``CommitInfo`` (``.commit_url``, ``.pr_url``, ``.oid``).
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f'repo_id {repo_id!r}: {_one_line(e)}') from None
    if create_pr and revision not in (None, 'main'):
        raise ValueError(f'create_pr opens a pull request against the default branch; it cannot target '
                         f'revision={revision!r} (push to the branch instead, without create_pr)')
    with tempfile.TemporaryDirectory(prefix='hff-push-') as tmp:
        stage = Path(tmp) / 'upload'
        if isinstance(model_or_dir, (str, os.PathLike)):
            src = Path(model_or_dir)
            if any(x is not None for x in (label_names, metrics, train_args)):
                raise ValueError('label_names/metrics/train_args apply when pushing a model; a saved folder already '
                                 'holds them (save it again to change them)')
            saved = read_config(src / CONFIG_NAME, where=str(src))
            weights = src / WEIGHTS_NAME
            if not weights.is_file():
                raise CheckpointFileNotFoundError(f'{src}: {WEIGHTS_NAME} not found; nothing to push')
            read_weights(weights, saved.weights_sha256, where=str(src))    # never publish a corrupt file
            stage.mkdir()
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                _link_or_copy(src / name, stage / name)
            config = saved.raw
        else:
            save_pretrained(model_or_dir, stage, label_names=label_names, metrics=metrics, train_args=train_args,
                            card=False)
            config = json.loads((stage / CONFIG_NAME).read_text(encoding='utf-8'))
        from ._card import build_model_card
        build_model_card(config, repo_id=repo_id).save(str(stage / CARD_NAME))

        api = HfApi(token=token)
        api.create_repo(repo_id, token=token, private=private, repo_type='model', exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(stage), revision=None if create_pr else revision,
                                 token=token, commit_message=commit_message, create_pr=create_pr,
                                 allow_patterns=list(HUB_FILES))


# ----- atomic folders and small helpers -----
@contextmanager
def atomic_dir(target: Union[str, Path], keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` when the block finishes without error.

    The temporary folder lives next to ``target`` (same file system, so the swap is a rename). Files are
    fsynced before the swap. On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere it is
    two renames with the old folder kept until the new one is in place. Regular files in ``target`` that the
    block did not write are carried over (hard links, or copies); a ``target`` with sub-folders is refused.
    """
    target = Path(target).expanduser()
    target = target.resolve() if target.is_symlink() else target.absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f'{target} exists and is not a folder; choose a folder path for the model')
    if target.is_dir():
        subdirs = sorted(p.name for p in target.iterdir() if p.is_dir() and not p.is_symlink())
        if subdirs:
            raise ValueError(f'{target} holds sub-folders {subdirs[:3]}, which replacing it would move; save the '
                             f'model into a folder of its own (e.g. {target / "model"})')
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
    try:
        yield tmp
        mode = 0o666 & ~_umask()     # safetensors writes 0600; a model folder is as readable as any file
        for p in tmp.iterdir():
            if p.is_file() and not p.is_symlink():
                os.chmod(p, mode)
        if target.is_dir():
            for old in target.iterdir():
                if not (tmp / old.name).exists():
                    _link_or_copy(old, tmp / old.name)
        _fsync_tree(tmp)
        _swap_dirs(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # the new folder's old name, or the replaced folder after a swap


def _swap_dirs(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; afterwards ``new`` names the old content (or nothing)."""
    os.chmod(new, 0o755 & ~_umask())
    if not target.exists():
        os.rename(new, target)
        return
    if _rename_exchange(new, target):
        return
    old = Path(tempfile.mkdtemp(prefix=f'.{target.name}.old-', dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    os.rename(old, new)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for p in root.iterdir():
        if p.is_file() and not p.is_symlink():
            with open(p, 'rb') as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + '\n', encoding='utf-8')


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy: tuples -> lists, paths/enums -> strings, tensors/numpy scalars -> numbers, NaN -> None."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _jsonable(obj.item())
    if hasattr(obj, 'item') and callable(obj.item) and getattr(obj, 'ndim', 1) == 0:   # numpy scalars
        return _jsonable(obj.item())
    if hasattr(obj, 'to_dict') and callable(obj.to_dict):
        return _jsonable(obj.to_dict())
    if hasattr(obj, '__dataclass_fields__'):
        from dataclasses import asdict
        return _jsonable(asdict(obj))
    return str(obj)


def _check_keys(where: str, prefix: str, d: Dict[str, Any], known: set) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}')


def _get_int(where: str, name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        rng = f'in [{minimum}, {maximum}]' if maximum else f'>= {minimum}'
        raise ConfigError(f'{where}: {name} must be an integer {rng}, got {value!r}')
    return value


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def hub_dataset_id(name: Optional[str]) -> Optional[str]:
    """A data set's Hub id from a recipe's name ('fashion_mnist', 'hfds/uoft-cs/cifar10', 'uoft-cs/cifar10')."""
    if not isinstance(name, str) or not name:
        return None
    for prefix in ('hfds/', 'hf-hub:', 'hf://datasets/'):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.lower() in DATASET_HUB_IDS:
        return DATASET_HUB_IDS[name.lower()]
    base = name.rstrip('/').rsplit('/', 1)[-1].lower()
    if name.startswith(('/', '.', '~')) and base in DATASET_HUB_IDS:     # a local copy, e.g. an IDX folder
        return DATASET_HUB_IDS[base]
    if re.fullmatch(r'[\w.-]+/[\w.-]+', name) and not name.startswith(('.', '/')):
        return name
    return None
