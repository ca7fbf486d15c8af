"""timm's model surface for an HFF model: its ``pretrained_cfg`` (the backbone's preprocessing, this model's classes
and heads, never timm's checkpoint identity), its ``group_matcher`` (the backbone's, re-rooted under
``backbone.``) and the backbone's pooling type, which the last stage's head reads."""
import math
from typing import Dict, Optional

import torch.nn as nn

__all__ = ['hff_pretrained_cfg', 'pool_type', 'prefix_spec']


# pretrained_cfg keys that say whose weights these are: timm's classifier checkpoint, not an HFF model's. They are
# dropped (create_model records the backbone's source as 'backbone_pretrained' when it loads timm's weights), so
# nothing claims timm's classifier for the HFF heads.
_WEIGHT_IDENTITY = ('hf_hub_id', 'hf_hub_filename', 'url', 'file', 'tag', 'paper_ids', 'paper_name', 'origin_url',
                    'notes', 'license', 'source', 'state_dict', 'custom_load', 'architecture', 'label_names')


def hff_pretrained_cfg(backbone_cfg: Optional[Dict], num_classes: int, in_chans: Optional[int] = None,
                       img_size: Optional[int] = None, reduction: Optional[int] = None) -> Dict:
    """timm's ``pretrained_cfg`` for an HFF model: the backbone's preprocessing (so
    ``timm.data.resolve_model_data_config`` works) and this model's classes and heads, without timm's checkpoint
    identity (hub id, tag, papers, licence of weights these heads are not). Module names are this model's
    (``backbone.conv1``). Given the model's input channels, image size and the last feature map's reduction, the
    input and pool sizes are the model's own (a small-input stem keeps a 32 px image's resolution, so its unpooled
    features are 4x4, not the architecture's 7x7 at 224)."""
    cfg = {k: v for k, v in (backbone_cfg or {}).items() if k not in _WEIGHT_IDENTITY}
    first = cfg.get('first_conv')
    if first:
        cfg['first_conv'] = f'backbone.{first}' if isinstance(first, str) else tuple(f'backbone.{f}' for f in first)
    if in_chans is not None and img_size is not None:
        cfg['input_size'] = (in_chans, img_size, img_size)
        if reduction and cfg.get('pool_size'):
            cfg['pool_size'] = (math.ceil(img_size / reduction),) * 2
    cfg.update(num_classes=num_classes, classifier='heads')
    return cfg


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
