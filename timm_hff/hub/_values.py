"""The nested sections of ``config.json`` (``pretrained_cfg``, ``stages``, ``metrics``, recipe, timm kwargs), checked.

``config.json`` is written by anyone who publishes a model, and its values travel far: timm kwargs into timm's
constructors, ``pretrained_cfg`` into ``timm.data``, metrics and the recipe into the model card. So every value is
held to a type and a range here, before anything is built, and what has no schema (a recipe, extra metrics) must at
least be small, finite, plain JSON. Each failure is a ``ConfigError`` of one line naming the key.
"""
import math
from typing import Any, Dict, Optional

from ..core import printable_name, short_repr as short
from ._errors import ConfigError, one_line
from ._names import check_repo_id, check_text

__all__ = ['MAX_DEPTH', 'MAX_INT', 'MAX_ITEMS', 'MAX_KWARG_INT', 'MAX_NODES', 'MAX_SIZE', 'MAX_TEXT',
           'check_descriptions', 'check_hub_id', 'check_int', 'check_json', 'check_mapping', 'check_metrics',
           'check_names', 'check_number', 'check_pretrained_cfg', 'check_recipe', 'check_stages', 'check_str']

MAX_DEPTH = 16              # nesting of JSON values (a recipe is 3 deep)
MAX_ITEMS = 100_000         # entries of one list or mapping
MAX_NODES = 1_000_000       # values in one section, all levels together
MAX_TEXT = 65_536           # characters of one string
MAX_INT = 2 ** 53           # integers beyond a float's exact range are no size, count or seed of a model
MAX_KWARG_INT = 2 ** 20     # integers among the timm kwargs: widths, depths, sizes, heads (a million is plenty)
MAX_SIZE = 65_536           # pixels of an input side, entries of mean / std


def check_json(where: str, name: str, value: Any, max_int: int = MAX_INT) -> Any:
    """Plain JSON: None, bool, finite numbers within ``max_int``, strings, lists and string-keyed mappings.

    At most ``MAX_NODES`` values in all, so that a YAML recipe whose aliases nest lists of lists (a structure of a
    few lines that is a billion values when walked) is refused instead of walked.
    """
    _walk(where, name, value, max_int, 0, [MAX_NODES])
    return value


def _walk(where: str, name: str, value: Any, max_int: int, depth: int, budget: list) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f'{where}: {name} holds more than {MAX_NODES} values in all (or aliases that repeat them)')
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > max_int:
            raise ConfigError(f'{where}: {name} is {short(value)}, beyond the allowed magnitude {max_int}')
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f'{where}: {name} must be a finite number, got {value!r}')
        return
    if isinstance(value, str):
        if len(value) > MAX_TEXT or '\x00' in value:
            raise ConfigError(f'{where}: {name} is a string of {len(value)} characters (or holds a NUL byte)')
        return
    if depth >= MAX_DEPTH:
        raise ConfigError(f'{where}: {name} is nested more than {MAX_DEPTH} levels deep')
    if isinstance(value, (list, dict)) and len(value) > MAX_ITEMS:
        raise ConfigError(f'{where}: {name} has {len(value)} entries; at most {MAX_ITEMS} are allowed')
    if isinstance(value, list):
        for i, v in enumerate(value):
            _walk(where, f'{name}[{i}]', v, max_int, depth + 1, budget)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f'{where}: {name} has a non-string key {short(k)}')
            _walk(where, f'{name}.{printable_name(k, 40)}', v, max_int, depth + 1, budget)
    else:
        raise ConfigError(f'{where}: {name} has a value of type {type(value).__name__}, which JSON does not have')


def check_mapping(where: str, name: str, value: Any, max_int: int = MAX_INT) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f'{where}: {name} must be an object, got {type(value).__name__}')
    return check_json(where, name, value, max_int)


def check_int(where: str, name: str, value: Any, minimum: int, maximum: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f'{where}: {name} must be an integer in [{minimum}, {maximum}], got {short(value)}')
    return value


def check_number(where: str, name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        bracket = '(' if low_open else '['
        raise ConfigError(f'{where}: {name} must be a number in {bracket}{low:g}, {high:g}], got {short(value)}')
    return value


def check_str(where: str, name: str, value: Any, max_chars: int = 4096) -> str:
    try:
        return check_text(value, name, max_chars)
    except ValueError as e:
        raise ConfigError(f'{where}: {one_line(e)}') from None


def check_names(where: str, name: str, value: Any) -> list:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise ConfigError(f'{where}: {name} must be a list of strings, got {short(value)}')
    for i, n in enumerate(value):
        check_str(where, f'{name}[{i}]', n)
    return value


def check_hub_id(where: str, name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    try:
        return check_repo_id(value, name)
    except ValueError as e:
        raise ConfigError(f'{where}: {one_line(e)}') from None


# ----- timm's pretrained_cfg -----
_SIZE_KEYS = ('input_size', 'test_input_size', 'min_input_size')
_TEXT_KEYS = ('file', 'hf_hub_id', 'hf_hub_filename', 'source', 'architecture', 'tag', 'license', 'description',
              'origin_url', 'paper_name', 'interpolation')
_CHOICES = {'crop_mode': ('center', 'squash', 'border')}


def check_pretrained_cfg(where: str, cfg: Any, num_classes: int) -> Dict[str, Any]:
    """timm's preprocessing fields: ``timm.data.resolve_model_data_config`` reads them after loading."""
    check_mapping(where, 'pretrained_cfg', cfg)
    name = 'pretrained_cfg.{}'.format
    if 'state_dict' in cfg:
        raise ConfigError(f'{where}: pretrained_cfg.state_dict may not be set (weights live in model.safetensors)')
    for key in _SIZE_KEYS:
        v = cfg.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 3):
            raise ConfigError(f'{where}: {name(key)} must be [channels, height, width], got {short(v)}')
        for i, x in enumerate(v or ()):
            check_int(where, f'{name(key)}[{i}]', x, 1, MAX_SIZE)
    for key in ('mean', 'std'):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, list) and 1 <= len(v) <= MAX_SIZE):
            raise ConfigError(f'{where}: {name(key)} must be a list of numbers, one per channel, got {short(v)}')
        for i, x in enumerate(v or ()):
            check_number(where, f'{name(key)}[{i}]', x, 0 if key == 'std' else -1e6, 1e6, low_open=key == 'std')
    for key in ('crop_pct', 'test_crop_pct'):
        if cfg.get(key) is not None:
            check_number(where, name(key), cfg[key], 0, 4, low_open=True)
    for key in ('fixed_input_size', 'custom_load'):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ConfigError(f'{where}: {name(key)} must be true or false, got {short(cfg[key])}')
    for key in _TEXT_KEYS:
        if cfg.get(key) is not None:
            check_str(where, name(key), cfg[key])
    for key, choices in _CHOICES.items():
        if cfg.get(key) is not None and cfg[key] not in choices:
            raise ConfigError(f'{where}: {name(key)} must be one of {list(choices)}, got {short(cfg[key])}')
    for key in ('first_conv', 'classifier', 'url', 'paper_ids', 'notes'):
        v = cfg.get(key)
        if v is not None:
            check_names(where, name(key), [v] if isinstance(v, str) else v)
    for key in ('pool_size', 'test_pool_size'):
        for i, x in enumerate(cfg.get(key) or ()):
            check_int(where, f'{name(key)}[{i}]', x, 1, MAX_SIZE)
    if cfg.get('label_offset') is not None:
        check_int(where, name('label_offset'), cfg['label_offset'], 0, 1)
    if cfg.get('num_classes') is not None and cfg['num_classes'] != num_classes:
        raise ConfigError(f'{where}: pretrained_cfg.num_classes ({short(cfg["num_classes"])}) disagrees with '
                          f'num_classes ({num_classes}); the file was edited by hand')
    if cfg.get('label_names') is not None:
        check_names(where, name('label_names'), cfg['label_names'])
    if cfg.get('label_descriptions') is not None:
        check_descriptions(where, name('label_descriptions'), cfg['label_descriptions'])
    return cfg


def check_descriptions(where: str, name: str, value: Any) -> Dict[str, str]:
    check_mapping(where, name, value)
    for k, v in value.items():
        check_str(where, f'{name}[{k[:40]!r}]', v)
    return value


# ----- what the model card shows -----
_LAYOUTS = ('NCHW', 'NHWC', 'NLC', 'NC')
_STAGE_INTS = ('channels', 'reduction', 'params', 'backbone_params', 'flops', 'layers', 'head_flops')
_METRIC_TEXT = ('dataset', 'split', 'eval_split', 'val_split')
_RECIPE_TEXT = ('dataset', 'dataset_name', 'val_split', 'license', 'model')


def check_stages(where: str, stages: Any) -> list:
    """The saved cut (each stage's tap, width, stride, cost): compared with the rebuilt one, shown on the card."""
    if not isinstance(stages, list) or not 1 <= len(stages) <= 1024:
        raise ConfigError(f'{where}: hff.stages must be a list of 1 to 1024 objects, got {short(stages)}')
    for k, s in enumerate(stages):
        name = f'hff.stages[{k}]'
        check_mapping(where, name, s)
        index = s.get('feature_index')
        if isinstance(index, str):
            check_str(where, f'{name}.feature_index', index)
        elif index is not None:
            check_int(where, f'{name}.feature_index', index, -1024, 1024)
        if s.get('module') is not None:
            check_str(where, f'{name}.module', s['module'])
        if s.get('layout') is not None and s['layout'] not in _LAYOUTS:
            raise ConfigError(f'{where}: {name}.layout must be one of {list(_LAYOUTS)}, got {short(s["layout"])}')
        for key in _STAGE_INTS:
            if s.get(key) is not None:
                check_int(where, f'{name}.{key}', s[key], 0)
        for key in ('param_share', 'flops_share'):
            if s.get(key) is not None:
                check_number(where, f'{name}.{key}', s[key], 0, 1)
    return stages


def check_metrics(where: str, metrics: Any) -> Dict[str, Any]:
    """Evaluation results: accuracies are numbers, the data set and split are one-line names."""
    check_mapping(where, 'hff.metrics', metrics)
    for key, v in metrics.items():
        name = f'hff.metrics.{printable_name(str(key), 40)}'
        if v is None:
            continue
        if key in _METRIC_TEXT:
            check_str(where, name, v)
        elif key.startswith('stage_') and isinstance(v, list):
            for i, x in enumerate(v):
                if x is not None:
                    check_number(where, f'{name}[{i}]', x, -1e300, 1e300)
        elif 'top1' in key or 'top5' in key:
            check_number(where, name, v, -1e300, 1e300)
    return metrics


def check_recipe(where: str, train_args: Any) -> Dict[str, Any]:
    """The training recipe: plain JSON, and the names the card shows are one line each."""
    check_mapping(where, 'hff.train_args', train_args)
    for key in _RECIPE_TEXT:
        if isinstance(train_args.get(key), str):
            check_str(where, f'hff.train_args.{key}', train_args[key])
    return train_args
