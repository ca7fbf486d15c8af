"""The ``config.json`` format: file names, format version, schema, and its validation before anything is built.

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
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..core import GENERIC_ARCH, HFFConfig
from ..version import __version__
from ._errors import (
    CheckpointFileNotFoundError, ConfigError, FormatVersionError, UnknownArchitectureError, one_line)
from ._values import (
    MAX_INT, MAX_KWARG_INT, check_descriptions, check_hub_id, check_int, check_mapping, check_metrics, check_names,
    check_pretrained_cfg, check_recipe, check_stages, check_str, short)

__all__ = ['CARD_NAME', 'CONFIG_NAME', 'FORBIDDEN_TIMM_KWARGS', 'FORMAT_VERSION', 'HUB_FILES', 'MAX_CLASSES',
           'MAX_CONFIG_BYTES', 'RUNTIME_SETTINGS', 'SavedConfig', 'WEIGHTS_NAME', 'parse_config', 'read_config']

FORMAT_VERSION = 1                      # bump when a reader of the previous version would misread a file
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CARD_NAME = 'README.md'
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
MAX_CONFIG_BYTES = 10 * 2 ** 20        # an HFF config is a few KB; refuse to parse something huge
MAX_CLASSES = 2 ** 31 - 1              # the weights header bounds the real count (``_dry_build``)

_TOP_KEYS = {'architecture', 'num_classes', 'num_features', 'global_pool', 'label_names', 'label_descriptions',
             'model_args', 'pretrained_cfg', 'hff'}
_HFF_REQUIRED = {'format_version', 'arch', 'in_chans', 'config', 'timm_kwargs'}
_HFF_KEYS = _HFF_REQUIRED | {'library_version', 'label_names', 'weights_sha256', 'stages', 'num_params', 'metrics',
                             'train_args', 'base_model'}
# timm kwargs a config.json may never set: they load files, change the task, or are set by the loader itself.
FORBIDDEN_TIMM_KWARGS = {'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args',
                          'checkpoint_path', 'cache_dir', 'num_classes', 'in_chans', 'features_only', 'out_indices',
                          'feature_cls', 'scriptable', 'exportable', 'no_jit', 'device', 'dtype', 'arch'}
# HFF settings that do not change any parameter's shape, so they may differ from the saved ones on load.
RUNTIME_SETTINGS = ('predict_from', 'check_split', 'check_img_size', 'scale', 'margin', 'exit_rule', 'exit_thresholds',
                    'exit_patience')
# The ``architecture`` that saved HFF configs name: one entrypoint for every wrapped timm architecture (the timm
# arch is in ``model_args['arch']``), so ``timm.create_model('hf-hub:...')`` resolves any HFF checkpoint. The
# registry (``timm_hff._registry``) registers an entrypoint under this name.


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
    if raw.get('method') == 'ff':   # hff-train --baseline ff writes its own config.json beside its weights
        raise ConfigError(f"{where} holds a Forward-Forward baseline (hff-train --baseline ff), not an HFF model; "
                          f"rebuild it with timm_hff.baselines.create_ff_model as its 'rebuild' entry says")
    hff = raw.get('hff')
    if not isinstance(hff, dict):
        raise ConfigError(f"{where} has no 'hff' section, so it is not a timm_hff model; load a plain timm "
                          f"checkpoint with timm.create_model(...) or wrap its architecture with "
                          f"timm_hff.create_model('<arch>', pretrained=True)")
    _check_version(where, hff.get('format_version'))
    _check_keys(where, '', raw, _TOP_KEYS)
    _check_keys(where, 'hff.', hff, _HFF_KEYS)
    missing = sorted(_HFF_REQUIRED - set(hff))
    if missing:
        raise ConfigError(f'{where}: the hff section lacks {missing}; the file is incomplete, save the model again')

    import timm   # here, not at import: reading the file names costs nothing
    architecture = raw.get('architecture', GENERIC_ARCH)
    if not isinstance(architecture, str) or not (
            architecture == GENERIC_ARCH or (architecture.startswith('hff_') and timm.is_model(architecture))):
        raise UnknownArchitectureError(f"{where}: architecture {short(architecture)} is not an HFF entrypoint "
                                       f"(expected '{GENERIC_ARCH}'); the file was edited or is from another library")
    arch = hff['arch']
    if not isinstance(arch, str) or arch.startswith('hff_') or not timm.is_model(arch):
        raise UnknownArchitectureError(f'{where}: hff.arch {short(arch)} is not an architecture of this timm '
                                       f'({timm.__version__}); upgrade timm or check the file')
    num_classes = check_int(where, 'num_classes', raw.get('num_classes'), 1, MAX_CLASSES)
    in_chans = check_int(where, 'hff.in_chans', hff['in_chans'], 1, 4096)
    if raw.get('num_features') is not None:
        check_int(where, 'num_features', raw['num_features'], 1, MAX_KWARG_INT)
    check_mapping(where, 'hff.config', hff['config'])
    try:
        cfg = HFFConfig.from_dict(hff['config'])
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{where}: hff.config: {one_line(e)}') from None
    if cfg.balance is not None and cfg.stage_indices is None:
        raise ConfigError(f'{where}: hff.config has balance={cfg.balance!r} but no stage_indices; a saved model '
                          f'stores the cut balance chose, so the file is incomplete: save the model again')

    timm_kwargs = check_mapping(where, 'hff.timm_kwargs', hff['timm_kwargs'], max_int=MAX_KWARG_INT)
    bad = sorted(set(timm_kwargs) & (FORBIDDEN_TIMM_KWARGS | set(HFFConfig.__dataclass_fields__)))
    if bad:
        raise ConfigError(f'{where}: hff.timm_kwargs may not set {bad} (they load files or are set by the loader)')

    label_names = _label_names(where, raw, hff, num_classes)
    if raw.get('label_descriptions') is not None:
        check_descriptions(where, 'label_descriptions', raw['label_descriptions'])
    if raw.get('global_pool') is not None:
        check_str(where, 'global_pool', raw['global_pool'])
    pretrained_cfg = check_pretrained_cfg(where, raw.get('pretrained_cfg', {}), num_classes)
    check_mapping(where, 'model_args', raw.get('model_args', {}))
    metrics = check_metrics(where, hff['metrics']) if hff.get('metrics') is not None else None
    train_args = check_recipe(where, hff['train_args']) if hff.get('train_args') is not None else None
    sha = hff.get('weights_sha256')
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r'[0-9a-f]{64}', sha)):
        raise ConfigError(f'{where}: hff.weights_sha256 must be 64 lowercase hex digits, got {short(sha)}')
    base_model = check_hub_id(where, 'hff.base_model', hff.get('base_model'))
    stages = check_stages(where, hff['stages']) if hff.get('stages') is not None else None
    if hff.get('library_version') is not None:
        check_str(where, 'hff.library_version', hff['library_version'])
    if hff.get('num_params') is not None:
        check_int(where, 'hff.num_params', hff['num_params'], 0)
    return SavedConfig(arch=arch, num_classes=num_classes, in_chans=in_chans, cfg=cfg, timm_kwargs=dict(timm_kwargs),
                       label_names=label_names, pretrained_cfg=dict(pretrained_cfg), weights_sha256=sha,
                       stages=stages, metrics=metrics, train_args=train_args, base_model=base_model, raw=raw)


def _check_version(where: str, version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f'{where}: hff.format_version must be an integer >= 1, got {short(version)}')
    if version > MAX_INT:
        raise ConfigError(f'{where}: hff.format_version {short(version)} is no format version')
    if version > FORMAT_VERSION:
        raise FormatVersionError(f'{where} uses HFF format version {version}, but timm_hff {__version__} reads up to '
                                 f'version {FORMAT_VERSION}; upgrade with `pip install -U timm-hff`')


def _label_names(where: str, raw: Dict[str, Any], hff: Dict[str, Any], num_classes: int):
    """The class names (``hff.label_names``, or timm's top-level ``label_names``): one per class, both agreeing."""
    label_names = hff.get('label_names', raw.get('label_names'))
    if label_names is not None:
        check_names(where, 'label_names', label_names)
        if len(label_names) != num_classes:
            raise ConfigError(f'{where}: {len(label_names)} label_names for num_classes={num_classes}')
        if raw.get('label_names') is not None and raw['label_names'] != label_names:
            raise ConfigError(f'{where}: label_names and hff.label_names disagree; the file was edited by hand')
    return label_names


def read_config(path: Union[str, Path], where: Optional[str] = None) -> SavedConfig:
    """Read and validate a ``config.json`` file."""
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        for sub in ('model', 'model_ema'):   # an hff-train run folder: its saved models are in model/ (model_ema/)
            if (path.parent / sub / CONFIG_NAME).is_file():
                raise CheckpointFileNotFoundError(f'{where}: {CONFIG_NAME} not found; this looks like an hff-train run '
                                                  f'folder: load its saved model from {where}/{sub}')
        raise CheckpointFileNotFoundError(f'{where}: {CONFIG_NAME} not found; a saved HFF model folder holds '
                                          f'{CONFIG_NAME} and {WEIGHTS_NAME} (write them with save_pretrained)')
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f'{where}: {CONFIG_NAME} is {size / 2 ** 20:.1f} MiB, far too large for an HFF config')
    try:
        raw = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # ValueError: JSONDecodeError, a 5000-digit int
        raise ConfigError(f'{where}: {CONFIG_NAME} is not valid JSON ({one_line(e)[:120]}); re-download or '
                          f'save again') from None
    return parse_config(raw, where)


def _check_keys(where: str, prefix: str, d: Dict[str, Any], known: set) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {short([prefix + k for k in unknown], 120)}; known: '
                          f'{sorted(known)}')



