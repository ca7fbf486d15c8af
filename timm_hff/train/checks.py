"""The checks of ``TrainConfig``: each setting's type (from its annotation), choices, ranges and names, then the
settings that do not go together (the method's and the schedule's own refusals, read from their objects). Every
failure is one line naming the setting and what to give instead."""
import math
import typing
from dataclasses import fields
from typing import Any, Dict, List, Tuple, Union

from ..core import short_repr
from ..hub import MAX_KWARG_INT, check_json
from .registry import get_method, get_schedule, method_names

__all__ = ['check_combinations', 'check_declared', 'check_values', 'coerce']

MAPPING_SETTINGS = ('hff', 'model_kwargs', 'ff')   # settings that are mappings of their own (merged key by key)
PRECISIONS = ('no', 'bf16', 'fp16')


def check_values(cfg) -> None:
    """Choices, ranges and names of single settings."""
    check_declared(cfg)
    check_names(cfg)
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1) (the share of train_split held out), got '
                         f'{cfg.val_fraction!r}')
    if cfg.val_fraction > 0 and cfg.val_split is not None:
        raise ValueError(f'val_fraction={cfg.val_fraction:g} carves the validation split from train_split, but '
                         f'val_split={cfg.val_split!r} names another; set val_split: null (and test_split: '
                         f'{cfg.val_split} to evaluate it once at the end)')
    if cfg.val_fraction == 0 and cfg.val_split is None:
        raise ValueError('no validation split: set val_split (e.g. test) or val_fraction (e.g. 0.1)')
    if cfg.test_split is not None and cfg.test_split == cfg.val_split:
        raise ValueError(f'test_split and val_split are both {cfg.test_split!r}: the test split is evaluated once '
                         f'at the end, so validate on another split (or val_fraction) or drop test_split')
    if cfg.label_names is not None and len(set(cfg.label_names)) != len(cfg.label_names):
        seen = set()
        dup = next(n for n in cfg.label_names if n in seen or seen.add(n))
        raise ValueError(f'label_names has a duplicate ({short_repr(dup)}): give each class its own name')
    if cfg.stage_lr is not None and (not cfg.stage_lr or any(f <= 0 for f in cfg.stage_lr)):
        raise ValueError(f'stage_lr must list one positive factor per stage, got {short_repr(cfg.stage_lr)}')
    if cfg.calibrate_exits is not None and cfg.calibrate_exits < 0:
        raise ValueError(f'calibrate_exits is the top-1 points adaptive exit may lose (e.g. 0.2), so it must '
                         f'be >= 0, got {cfg.calibrate_exits!r}; null turns calibration off')
    if cfg.exit_confidence is not None and not 0 < cfg.exit_confidence < 1:
        raise ValueError(f'exit_confidence is the probability the calibrate_exits bound holds on new data, between 0 '
                         f'and 1 exclusive (e.g. 0.9), got {cfg.exit_confidence!r}; null fits without a guarantee')
    if not cfg.stage_parallel_timeout > 0:
        raise ValueError(f'stage_parallel_timeout must be > 0 seconds, got {cfg.stage_parallel_timeout!r}')
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise ValueError(f'clip_grad must be > 0 (or null to disable), got {cfg.clip_grad!r}')
    if cfg.in_chans not in (1, 3):
        raise ValueError(f'in_chans must be 1 (grayscale) or 3 (RGB) for image data, got {cfg.in_chans}')
    for name in ('scale', 'ratio'):
        v = getattr(cfg, name)
        if v is not None and (len(v) != 2 or not 0 < v[0] <= v[1]):
            raise ValueError(f'{name} must be two increasing positive numbers [lo, hi], got {short_repr(v)}')


def check_combinations(cfg) -> None:
    """Settings that do not go together: the method's and the schedule's refusals, fine-tuning, streaming."""
    method = get_method(cfg.method)
    for other in method_names():   # a method's own settings section, given to another method
        owned = [k for k in get_method(other).owns if other != cfg.method and getattr(cfg, k)]
        if owned:
            raise ValueError(f"{owned[0]} settings ({', '.join(sorted(getattr(cfg, owned[0])))}) apply to method "
                             f"{other!r}; drop them or use --baseline {other}")
    method.check(cfg)
    get_schedule(cfg.schedule).check(cfg)
    _check_finetune(cfg)
    if cfg.cuda_graphs:
        from .graph_settings import check_settings
        check_settings(cfg)
    if cfg.freeze_stages and cfg.head_only:
        raise ValueError('give freeze_stages or head_only, not both (head_only freezes the whole backbone)')
    if cfg.hff:
        from ..core import HFFConfig
        HFFConfig.from_dict(dict(cfg.hff, check_split=False))   # unknown keys / bad values fail here
    if cfg.streaming or cfg.dataset.startswith('hfids/'):
        if cfg.train_num_samples is None:
            raise ValueError('a streamed training split has no known length: set train_num_samples (the '
                             'images per epoch)')
        if cfg.data_in_memory:
            raise ValueError('data_in_memory cannot hold a streamed split; set data_in_memory: null')


def _check_finetune(cfg) -> None:
    """The fine-tuning settings: weights, lr factors, heads-only warm-up."""
    if cfg.pretrained_file is not None:
        if cfg.model.startswith(('hf-hub:', 'local-dir:')):
            raise ValueError(f'pretrained_file holds timm backbone weights; {cfg.model} is a saved HFF model, '
                             f'which loads its own weights (drop pretrained_file)')
        if not cfg.pretrained_file.endswith('.safetensors'):
            raise ValueError(f'pretrained_file must be a .safetensors file (weights never load from a pickle), got '
                             f'{short_repr(cfg.pretrained_file)}; convert it: hff-seed-weights <arch> <file> '
                             f'--safetensors OUT.safetensors')
    if cfg.layer_decay is not None and not 0.0 < cfg.layer_decay <= 1.0:
        raise ValueError(f'layer_decay must be in (0, 1] (each earlier layer group trains at that factor of the '
                         f'next), got {cfg.layer_decay!r}')
    if not 0.0 < cfg.backbone_lr_scale <= 1e3:
        raise ValueError(f'backbone_lr_scale must be > 0 (e.g. 0.1 for a backbone lr ten times below the '
                         f"heads'), got {cfg.backbone_lr_scale!r}; use head_only to freeze the backbone")
    if cfg.head_warmup_epochs:
        if cfg.head_only:
            raise ValueError('head_warmup_epochs trains the heads alone before fine-tuning; head_only trains them '
                             'alone throughout: give one of them')
        if cfg.head_warmup_epochs >= cfg.epochs:
            raise ValueError(f'head_warmup_epochs ({cfg.head_warmup_epochs}) leaves no fine-tuning epoch of '
                             f'{cfg.epochs}; lower it or use head_only: true')



def _type_name(tp) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def coerce(name: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; accept int for float and YAML-1.1 '1e-3' strings for float."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:   # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return coerce(name, value, inner)
    if tp is Any:
        return value
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'{name} must be a list, got {short_repr(value)}')
        return [coerce(f'{name}[{i}]', v, args[0]) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f'{name} must be a mapping, got {short_repr(value)}')
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f'{name} must be true or false, got {short_repr(value)}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'{name} must be an integer, got {short_repr(value)}')
        if abs(value) > 2 ** 53:
            raise ValueError(f'{name} must be an integer of magnitude <= 2**53, got {short_repr(value)}')
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f'{name} must be a number, got {short_repr(value)}') from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f'{name} must be a finite number, got {short_repr(value)}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f'{name} must be a string, got {short_repr(value)}')
        return value
    raise TypeError(f'unsupported setting type {_type_name(tp)} for {name}')


def check_names(cfg) -> None:
    """Strings that become paths, folder names or model-card text: no '..' escape, no NUL, no line break."""
    from ..hub import check_folder_name, check_path, check_text
    if cfg.experiment:
        check_folder_name(cfg.experiment, 'experiment')
    for name in ('output', 'data_dir', 'resume', 'model', 'dataset'):
        if getattr(cfg, name) is not None:
            check_path(getattr(cfg, name), name)
    for i, label in enumerate(cfg.label_names or ()):
        check_text(label, f'label_names[{i}]')
    for name in MAPPING_SETTINGS:
        try:
            check_json('recipe', name, getattr(cfg, name), max_int=MAX_KWARG_INT)
        except ValueError as e:
            raise ValueError(str(e)) from None   # a recipe error, not a checkpoint's


def check_declared(cfg) -> None:
    """Each setting's own bounds, from its declaration (``help.setting``: choices, at_least, at_most, within)."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None:
            continue
        choices = meta.get('choices')
        choices = choices() if callable(choices) else choices
        if choices is not None and value not in choices:
            raise ValueError(f'{f.name} must be one of {list(choices)}, got {short_repr(value)}')
        if meta.get('at_least') is not None and value < meta['at_least']:
            raise ValueError(f"{f.name} must be >= {meta['at_least']}, got {value!r}")
        if meta.get('at_most') is not None and value > meta['at_most']:
            raise ValueError(f"{f.name} must be <= {meta['at_most']}, got {value!r}")
        if meta.get('within') is not None:
            lo, hi, *shut = meta['within']
            if not (lo <= value < hi if shut == [')'] else lo <= value <= hi):
                raise ValueError(f"{f.name} must be in [{lo}, {hi}{shut[0] if shut else ']'}, got {value!r}")


def check_device_precision(mixed_precision: str, device) -> None:
    """fp16 is CUDA's (autocast to half and loss scaling): on a CPU it would be accepted, logged and do nothing."""
    if mixed_precision == 'fp16' and getattr(device, 'type', str(device)) == 'cpu':
        raise ValueError("mixed_precision 'fp16' needs a CUDA device, but this run is on the CPU, where it would "
                         "change nothing; use mixed_precision: bf16 (CPU autocast) or no")
