"""timm's model surface for an HFF model: its ``pretrained_cfg`` (the backbone's preprocessing, this model's classes
and heads, never timm's checkpoint identity), its ``group_matcher`` (the backbone's, re-rooted under
``backbone.``) and the backbone's pooling type, which the last stage's head reads.

A ``pretrained_cfg`` is what timm's scripts believe about a model: validate.py and benchmark.py take
``test_input_size`` / ``test_crop_pct`` before ``input_size`` / ``crop_pct``, onnx_export.py adds tuples to
``input_size``, train.py adapts ``first_conv`` to another channel count. So every size and name field tells the model's
own truth (``settle_cfg``), with timm's types, whether the model was built, registered, saved or loaded."""
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn

__all__ = ['first_convs', 'hff_pretrained_cfg', 'pool_type', 'prefix_spec', 'settle_cfg']

# fields timm holds as tuples (a config.json gives lists back; onnx_export.py does ``(batch,) + input_size``)
_TUPLE_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'pool_size', 'test_pool_size', 'mean', 'std')


# pretrained_cfg keys that say whose weights these are: timm's classifier checkpoint, not an HFF model's. They are
# dropped (create_model records the backbone's source as 'backbone_pretrained' when it loads timm's weights), so
# nothing claims timm's classifier for the HFF heads.
_WEIGHT_IDENTITY = ('hf_hub_id', 'hf_hub_filename', 'url', 'file', 'tag', 'paper_ids', 'paper_name', 'origin_url',
                    'notes', 'license', 'source', 'state_dict', 'custom_load', 'architecture', 'label_names')


def hff_pretrained_cfg(backbone_cfg: Optional[Dict], num_classes: int, in_chans: Optional[int] = None,
                       img_size: Optional[int] = None, reduction: Optional[int] = None,
                       first_conv: Union[str, Sequence[str], None] = None) -> Dict:
    """timm's ``pretrained_cfg`` for an HFF model: the backbone's preprocessing (so
    ``timm.data.resolve_model_data_config`` works) and this model's classes and heads, without timm's checkpoint
    identity (hub id, tag, papers, licence of weights these heads are not). Module names are this model's
    (``backbone.conv1``). Given the model's input channels, image size and the last feature map's reduction, the
    input and pool sizes are the model's own (a small-input stem keeps a 32 px image's resolution, so its unpooled
    features are 4x4, not the architecture's 7x7 at 224)."""
    cfg = {k: v for k, v in (backbone_cfg or {}).items() if k not in _WEIGHT_IDENTITY}
    if first_conv is not None:   # this model's own, resolved by ``first_convs``
        cfg['first_conv'] = first_conv
    elif cfg.get('first_conv'):
        cfg['first_conv'] = _prefixed(cfg['first_conv'])
    if in_chans is not None and img_size is not None:
        cfg['input_size'] = (in_chans, img_size, img_size)
    cfg.update(num_classes=num_classes, classifier='heads')
    return settle_cfg(cfg, reduction=reduction)


def settle_cfg(cfg: Dict[str, Any], reduction: Optional[int] = None, in_chans: Optional[int] = None,
               first_conv: Union[str, Sequence[str], None] = None) -> Dict[str, Any]:
    """``cfg`` made to describe the model as it is (in place, and returned): timm's tuples; the test-time size and
    crop are the trained ones (an ImageNet ``test_input_size`` of 288 px is a fact about timm's ImageNet weights, not
    about a model trained at 28 px: timm's scripts would evaluate at 288 px); pool sizes follow the input size;
    ``first_conv`` names this model's module (``backbone.conv1.0``, prefixed, already resolved by the caller)."""
    for key in _TUPLE_KEYS:
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    if isinstance(cfg.get('first_conv'), list):
        cfg['first_conv'] = tuple(cfg['first_conv'])
    if first_conv is not None:
        cfg['first_conv'] = first_conv if isinstance(first_conv, str) else tuple(first_conv)
    size = cfg.get('input_size')
    if in_chans is not None and size:
        cfg['input_size'] = size = (in_chans, *size[1:])
    if size:
        cfg['test_input_size'] = size
        if reduction and cfg.get('pool_size'):
            cfg['pool_size'] = tuple(math.ceil(s / reduction) for s in size[1:])
    if cfg.get('pool_size'):
        cfg['test_pool_size'] = cfg['pool_size']
    else:
        cfg.pop('test_pool_size', None)
    if cfg.get('crop_pct') is not None:
        cfg['test_crop_pct'] = cfg['crop_pct']
    else:
        cfg.pop('test_crop_pct', None)
    return cfg


def first_convs(backbone: nn.Module, in_chans: int) -> Optional[Union[str, Tuple[str, ...]]]:
    """The module name(s) of the backbone's first convolution(s), the layer(s) that see the image channels, as
    ``backbone.<name>``: what timm's cfg names when it is such a layer, else the first layer inside it (a deep stem's
    ``conv1`` is a Sequential whose conv is ``conv1.0``), else the first layer of the backbone that takes
    ``in_chans`` channels. None if there is none (timm then adapts nothing)."""
    named = (getattr(backbone, 'pretrained_cfg', None) or {}).get('first_conv')
    names = [named] if isinstance(named, str) else list(named or ())
    found = [n for n in (_first_layer(backbone, name, in_chans) for name in names) if n is not None]
    if not found:
        found = [n for n in (_first_layer(backbone, '', in_chans),) if n is not None]
    if not found:
        return None
    found = [f'backbone.{n}' for n in dict.fromkeys(found)]
    return found[0] if len(found) == 1 else tuple(found)


def _first_layer(backbone: nn.Module, name: str, in_chans: int) -> Optional[str]:
    try:
        root = backbone.get_submodule(name) if name else backbone
    except AttributeError:
        return None
    for sub, mod in root.named_modules(prefix=name):
        weight = getattr(mod, 'weight', None)
        if isinstance(weight, nn.Parameter) and weight.ndim >= 3 and weight.shape[1] * getattr(mod, 'groups', 1) \
                == in_chans and not list(mod.children()):
            return sub
    return None


def _prefixed(first):
    return f'backbone.{first}' if isinstance(first, str) else tuple(f'backbone.{f}' for f in first)


def prefix_regex(regex: str) -> str:
    """``'^conv1|bn1'`` -> ``'^backbone\\.(?:conv1|bn1)'``: every alternative re-rooted, group numbers unchanged."""
    return r'^backbone\.(?:' + (regex[1:] if regex.startswith('^') else regex) + ')'


def prefix_spec(spec):
    if isinstance(spec, str):
        return prefix_regex(spec)
    return [(prefix_regex(r), suffix) for r, suffix in spec]


def pool_type(backbone: nn.Module) -> Optional[str]:
    """The timm backbone's global pooling as ``reset_classifier`` names it ('avg', 'token', '' ...), None if unknown."""
    for owner in (backbone, getattr(backbone, 'head', None)):   # ConvNeXt, RegNet: pooling in the head module
        pool = getattr(owner, 'global_pool', None)
        if isinstance(pool, str):
            return pool
        if pool is not None and hasattr(pool, 'pool_type'):
            return pool.pool_type
    return None
