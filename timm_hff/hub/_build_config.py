"""A model's ``config.json`` content: what rebuilds it (settings, timm kwargs), what it was (metrics, recipe).

Everything the model card shows is stored here, so the card can be rebuilt from ``config.json`` alone.
"""
import json
import math
import warnings
from typing import Any, Dict, Optional, Sequence

import torch

from ..model import HFFModel, settle_cfg, stage_profile
from ..version import __version__
from ._errors import one_line
from ._format import FORBIDDEN_TIMM_KWARGS, FORMAT_VERSION, GENERIC_ARCH, parse_config
from ._names import check_repo_id

__all__ = ['build_config', 'jsonable', 'saved_timm_kwargs', 'unwrap_model']


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
    metrics, train_args = jsonable(metrics), jsonable(train_args)
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
                           module=model.stage_info[k]['module'],
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
        'base_model': _hub_id(_base_model(model, train_args)),
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
    config = {k: v for k, v in config.items() if v is not None}
    parse_config(config, where='the model to save')   # what is written must load: one line naming the bad value
    return config


def saved_timm_kwargs(backbone: torch.nn.Module) -> Dict[str, Any]:
    """The timm kwargs that rebuild ``backbone`` (timm's own ``get_model_args``, less class/channel counts)."""
    from timm.models._input import get_model_args
    out = {}
    for k, v in get_model_args(backbone).items():
        if k in ('num_classes', 'in_chans'):
            continue
        if k in FORBIDDEN_TIMM_KWARGS:
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
    try:   # the model's own cfg: a loaded model's trained preprocessing, a built one's size and channels
        data = resolve_input_data_config(model, args=args)
    except (TypeError, ValueError) as e:
        warnings.warn(f'train_args preprocessing {args} does not fit the model ({one_line(e)}); saving the '
                      f"model's default preprocessing instead", stacklevel=2)
        data = resolve_input_data_config(model)
    source = model.pretrained_cfg or {}
    cfg = {k: source[k] for k in ('fixed_input_size', 'first_conv') if source.get(k) is not None}
    cfg.update({k: v for k, v in data.items() if v is not None})
    cfg.update(num_classes=model.num_classes, classifier='heads')
    return jsonable(settle_cfg(cfg, reduction=model.output_reduction, in_chans=model.in_chans))


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


def _hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` if it is a Hub repository id (the card links it), else None."""
    try:
        return check_repo_id(name) if name else None
    except ValueError:
        return None


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: tuples -> lists, paths/enums -> strings, tensors/numpy scalars -> numbers, NaN -> None."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return jsonable(obj.item())
    if hasattr(obj, 'item') and callable(obj.item) and getattr(obj, 'ndim', 1) == 0:   # numpy scalars
        return jsonable(obj.item())
    if hasattr(obj, 'to_dict') and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if hasattr(obj, '__dataclass_fields__'):
        from dataclasses import asdict
        return jsonable(asdict(obj))
    return str(obj)
