"""The six silent wrong behaviours an independent review found (issue 24), each pinned by a test that failed on the code
before the fix: a test split overlapping the training rows, one config shared by two models, settings accepted and
ignored, stale label names, a truncated test split, and a class-score bound stated wrongly."""
import json
import math
import os

import pytest
import torch

import timm_hff
from timm_hff import HFFConfig

from test_data import make_idx


@pytest.fixture(scope='module')
def idx_60(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data') / 'idx')
    make_idx(root, n_train=60, n_test=30)
    return root


def _splits(idx_root, tmp_path, **kw):
    from conftest import tiny
    from timm_hff.train.data import build_data

    class Solo:
        process_index, num_processes, is_main_process = 0, 1, True

        @staticmethod
        def main_process_first():
            import contextlib
            return contextlib.nullcontext()
    settings = dict(train_num_samples=None, val_split=None, val_fraction=0.5)
    settings.update(kw)
    return build_data(tiny(idx_root, tmp_path, **settings), Solo())


# 1 ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('test_split', ['train', 'train[:20]', 'train[50:]'])
def test_a_test_split_overlapping_the_training_rows_is_refused_with_val_fraction(idx_60, tmp_path, test_split):
    """Was accepted: disjointness was checked only when val_fraction == 0 (the same overlap as val_split was
    refused)."""
    with pytest.raises(ValueError, match='overlaps the training rows'):
        _splits(idx_60, tmp_path, test_split=test_split)


def test_a_disjoint_test_split_is_still_accepted_with_val_fraction(idx_60, tmp_path):
    train, val, test = _splits(idx_60, tmp_path, train_split='train[:40]', test_split='train[40:]')
    assert (len(train), len(val), len(test)) == (20, 20, 20)


# 2 ------------------------------------------------------------------------------------------------------------------
def test_one_config_shared_by_two_models_is_changed_by_neither():
    """Was: m1.set_exits gave m2 the thresholds; m1.set_predict_from('ensemble') made m2 save (and reload as)
    'ensemble'."""
    cfg = HFFConfig(small_input=True, check_img_size=28)
    m1 = timm_hff.create_model('test_resnet', num_classes=3, in_chans=1, hff_cfg=cfg)
    m2 = timm_hff.create_model('test_resnet', num_classes=3, in_chans=1, hff_cfg=cfg)
    m1.set_predict_from('ensemble')
    m1.set_exits(thresholds=[0.9] * (m1.num_stages - 1))
    assert m2.predict_from == 'last' and m2.hff_cfg.exit_thresholds is None
    assert cfg.predict_from == 'last' and cfg.exit_thresholds is None
    assert m1.predict_from == 'ensemble' and m1.hff_cfg.predict_from == 'ensemble'   # held once, in its own config


def test_a_balanced_build_leaves_the_callers_config_as_it_was():
    """Was: the balanced cut was written into the caller's config, and reusing it on another depth failed."""
    cfg = HFFConfig(balance='memory', num_stages=3)
    m = timm_hff.create_model('resnet18', num_classes=3, hff_cfg=cfg, layers=[1, 1, 1, 1],
                              channels=[8, 8, 16, 16])
    assert cfg.stage_indices is None and m.hff_cfg.stage_indices is not None
    deeper = timm_hff.create_model('resnet18', num_classes=3, hff_cfg=cfg, layers=[2, 2, 2, 2],
                                   channels=[8, 8, 16, 16])
    assert deeper.num_stages == 3


# 3 ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('model, kwargs, match', [
    ('test_resnet', dict(pool='token'), "pool='token' reads a class token"),
    ('test_vit', dict(aux_size=2), 'aux_size=2 pools a feature map'),
    ('test_resnet', dict(aux='none', aux_channels=16), "aux='none' has none"),
    ('test_resnet', dict(aux='none', aux_depth=2), "aux='none' has none"),
    ('test_resnet', dict(balance='memory', stage_indices=[1, 4]), 'give balance or stage_indices, not both'),
    ('test_resnet', dict(num_stages=9), 'num_stages=9, but ResNet has 5 reduction levels'),
    ('test_vit', dict(num_stages=9), 'num_stages=9, but VisionTransformer has'),
])
def test_a_setting_that_would_be_ignored_is_refused(model, kwargs, match):
    """Each was accepted and changed nothing (pool='token' on a CNN is 'avg', aux_size on tokens, aux settings with
    no aux block, balance beside stage_indices, 9 stages on 5 levels silently 5)."""
    with pytest.raises(ValueError, match=match):
        timm_hff.create_model(model, num_classes=3, **kwargs)


# 4 ------------------------------------------------------------------------------------------------------------------
def test_reset_classifier_forgets_the_old_label_names(tmp_path):
    """Was: with the same class count, save_pretrained wrote the names of the classes the heads no longer have."""
    m = timm_hff.create_model('test_resnet', num_classes=3)
    timm_hff.save_pretrained(m, tmp_path / 'a', label_names=['cat', 'dog', 'cow'])
    loaded = timm_hff.create_model(f'local-dir:{tmp_path / "a"}', pretrained=True)
    assert loaded.pretrained_cfg['label_names'] == ['cat', 'dog', 'cow']
    loaded.reset_classifier(3)   # a new label set of the same size
    timm_hff.save_pretrained(loaded, tmp_path / 'b')
    saved = json.loads((tmp_path / 'b' / 'config.json').read_text())
    assert 'label_names' not in saved and saved['hff'].get('label_names') is None


# 5 ------------------------------------------------------------------------------------------------------------------
def test_val_num_samples_truncates_the_validation_split_only(idx_60, tmp_path):
    """Was: the test split was truncated too (documented for validation only)."""
    train, val, test = _splits(idx_60, tmp_path, val_split='test', val_fraction=0.0, val_num_samples=5,
                               test_split='train[40:]', train_split='train[:40]')
    assert len(val) == 5 and len(test) == 20


# 6 ------------------------------------------------------------------------------------------------------------------
def test_a_class_score_with_several_prototypes_exceeds_one_by_at_most_ln_k_over_scale():
    """The docstring said [-1, 1]; a LogSumExp over K cosines reaches 1 + ln(K) / scale."""
    from timm_hff.heads import PrototypeHead
    k, scale = 3, 16.0
    head = PrototypeHead(8, 'NC', 2, HFFConfig(prototypes_per_class=k, scale=scale, embed_dim=None))
    with torch.no_grad():
        head.prototypes[:k] = head.prototypes[0]   # class 0's K prototypes in one direction
    z = head.unit_prototypes()[:1]
    scores = head.class_scores(z)
    assert scores[0, 0].item() == pytest.approx(1 + math.log(k) / scale, abs=1e-5)
    random = head.class_scores(torch.nn.functional.normalize(torch.randn(64, 8), dim=1)).detach()
    assert float(random.max()) <= 1 + math.log(k) / scale + 1e-6 and float(random.min()) >= -1 - 1e-6
    assert 'ln(K) / scale' in PrototypeHead.class_scores.__doc__ and '[-1, 1 + ln(K) / scale]' in \
        PrototypeHead.class_scores.__doc__
