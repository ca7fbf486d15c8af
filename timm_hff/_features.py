"""``features_only=True``: an HFF model as timm's feature extractor, the backbone's levels through its own
``forward_intermediates``.

A trained HFF backbone is most useful downstream as a feature extractor (detection and segmentation necks, feature
pyramids). timm's ``FeatureGetterNet`` wraps the HFF model: it prunes the backbone to the levels asked for (the
prototype heads go with the stages past them) and returns ``forward_intermediates`` of the weights the model holds,
so a saved HFF model loaded this way gives the features it learned. Only the getter is offered as ``feature_cls``
(timm's hook and fx feature classes are not wired to the HFF model; torch.fx itself traces ``model(x)``).
"""
from typing import Any, Dict

import torch.nn as nn

__all__ = ['FEATURE_KWARGS', 'as_feature_extractor', 'pop_feature_kwargs']

FEATURE_KWARGS = ('features_only', 'out_indices', 'feature_cls', 'output_fmt', 'feature_cfg')


def pop_feature_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The feature-extraction settings of a ``create_model`` call (``as_feature_extractor``'s arguments), removed from
    ``kwargs``; {} without ``features_only``. Feature kwargs without ``features_only`` are refused: they would
    otherwise be ignored."""
    if not kwargs.pop('features_only', False):
        stray = sorted(k for k in ('out_indices', 'feature_cls', 'feature_cfg') if k in kwargs)
        if stray:
            raise ValueError(f'{stray} only apply with features_only=True')
        return {}
    found = {k: kwargs.pop(k) for k in FEATURE_KWARGS if k in kwargs}
    cfg = dict(out_indices=None, feature_cls=None, output_fmt='NCHW')   # never empty: features_only was asked for
    cfg.update(found.pop('feature_cfg', None) or {})
    cfg.update(found)
    unknown = sorted(set(cfg) - {'out_indices', 'feature_cls', 'output_fmt'})
    if unknown:
        raise ValueError(f'features_only takes out_indices, feature_cls and output_fmt; {unknown} are not supported')
    if cfg.get('feature_cls') not in (None, 'getter'):
        raise ValueError(f"feature_cls={cfg['feature_cls']!r} is not supported for an HFF model: its features come "
                         f"from the backbone's forward_intermediates; use feature_cls='getter' (the default)")
    return cfg


def as_feature_extractor(model: nn.Module, out_indices=None, feature_cls=None, output_fmt: str = 'NCHW') -> nn.Module:
    """timm's ``FeatureGetterNet`` over ``model`` (pruned to ``out_indices``; default every ``feature_info`` level),
    with timm's features pretrained cfg."""
    from timm.models._features import FeatureGetterNet
    from timm.models._builder import pretrained_cfg_for_features
    if not hasattr(model.backbone, 'forward_intermediates'):
        raise ValueError(f'{type(model.backbone).__name__} has no forward_intermediates in this timm version, so its '
                         f'HFF model cannot be a feature extractor (features_only)')
    indices = tuple(range(len(model.feature_info))) if out_indices is None else out_indices
    pretrained_cfg = dict(model.pretrained_cfg)
    net = FeatureGetterNet(model, out_indices=indices, output_fmt=output_fmt, prune=True)
    net.pretrained_cfg = net.default_cfg = pretrained_cfg_for_features(pretrained_cfg)
    net.in_chans = model.in_chans
    return net
