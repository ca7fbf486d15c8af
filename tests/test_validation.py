"""The evaluation protocol: a validation split carved from the training data (disjoint, deterministic, balanced),
the test split read once after the last epoch, and how local each stage is (shares that add up).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from timm_hff.data import carve_validation, load_image_dataset, parse_split, slice_rows
from timm_hff.train import TrainConfig, Trainer

from conftest import tiny
from test_data import make_idx

pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')


@pytest.fixture(scope='module')
def idx_120(tmp_path_factory):
    """120 training images (12 per class, random pixels: each row is its own fingerprint) and 20 test images."""
    root = str(tmp_path_factory.mktemp('data') / 'idx')
    make_idx(root, n_train=120, n_test=20)
    return root


def _fingerprints(data):
    images = np.asarray(data.dataset.with_format('numpy')[:][data.image_key])
    return {img.tobytes() for img in images}


def test_validation_split_is_disjoint_balanced_and_deterministic(idx_120):
    full = load_image_dataset('idx', idx_120, 'train')
    train, val = carve_validation(full, 0.25, seed=0)
    assert (len(train), len(val)) == (90, 30)
    assert not _fingerprints(train) & _fingerprints(val)                    # never trained on
    assert _fingerprints(train) | _fingerprints(val) == _fingerprints(full)
    counts = np.bincount(np.asarray(val.dataset[val.label_key]), minlength=10)
    assert counts.tolist() == [3] * 10                                       # class-balanced
    again = carve_validation(load_image_dataset('idx', idx_120, 'train'), 0.25, seed=0)[1]
    assert _fingerprints(again) == _fingerprints(val)                        # the same rows on every run
    other = carve_validation(full, 0.25, seed=1)[1]
    assert _fingerprints(other) != _fingerprints(val)                        # split_seed picks them


def test_validation_split_of_a_data_set_on_disk(tmp_path):
    """A data set whose rows live in Arrow cache files (imagefolder, a Hub download) is carved too: datasets refuses
    keep_in_memory beside the indices cache files it names itself (val_fraction failed there with datasets' own
    'use either keep_in_memory or indices_cache_file_name')."""
    from test_data import make_imagefolder
    full = load_image_dataset('imagefolder', make_imagefolder(str(tmp_path / 'folder'), per_class=(8, 2)), 'train')
    assert full.dataset.cache_files                                          # the case: rows on disk
    train, val = carve_validation(full, 0.25, seed=0)
    assert (len(train), len(val)) == (18, 6)
    counts = np.bincount(np.asarray(val.dataset[val.label_key]), minlength=3)
    assert counts.tolist() == [2, 2, 2]
    assert not _fingerprints(train) & _fingerprints(val)


def test_validation_split_is_the_same_in_another_process(idx_120):
    code = ('import sys, hashlib, numpy as np, torch; torch.manual_seed(123); np.random.seed(7)\n'
            'from timm_hff.data import carve_validation, load_image_dataset\n'
            'v = carve_validation(load_image_dataset("idx", sys.argv[1], "train"), 0.25, seed=0)[1]\n'
            'x = np.asarray(v.dataset.with_format("numpy")[:]["image"])\n'
            'print(hashlib.sha256(np.sort(x.reshape(len(x), -1), axis=0).tobytes()).hexdigest())')
    env = dict(os.environ, PYTHONHASHSEED='99')
    out = subprocess.run([sys.executable, '-c', code, idx_120], capture_output=True, text=True, env=env, check=True)
    val = carve_validation(load_image_dataset('idx', idx_120, 'train'), 0.25, seed=0)[1]
    x = np.asarray(val.dataset.with_format('numpy')[:]['image'])
    import hashlib
    assert out.stdout.strip() == hashlib.sha256(np.sort(x.reshape(len(x), -1), axis=0).tobytes()).hexdigest()


def test_split_slices():
    assert parse_split('train') == ('train', None)
    assert parse_split('train[:54000]') == ('train', (None, '54000'))
    assert parse_split('train[90%:]') == ('train', ('90%', None))
    assert slice_rows((None, '90%'), 60000) == (0, 54000)
    assert slice_rows(('-6000', None), 60000) == (54000, 60000)
    with pytest.raises(ValueError, match='is not a name or a slice'):
        parse_split('train[1:2:3]')
    with pytest.raises(ValueError, match='selects no rows'):
        slice_rows(('50', '10'), 100)


def test_sliced_splits_must_not_overlap(idx_120, tmp_path):
    with pytest.raises(ValueError, match=r'overlaps the training rows train\[0:100\]'):
        Trainer(tiny(idx_120, tmp_path, train_split='train[:100]', val_split='train[90:]', train_num_samples=None))
    trainer = Trainer(tiny(idx_120, tmp_path / 'ok', train_split='train[:100]', val_split='train[100:]',
                           train_num_samples=None))
    assert (len(trainer.train_data), len(trainer.val_data)) == (100, 20)


def test_val_fraction_settings_are_checked():
    with pytest.raises(ValueError, match='set val_split: null'):
        TrainConfig.from_dict(dict(val_fraction=0.1))                       # val_split defaults to 'test'
    with pytest.raises(ValueError, match=r'val_fraction must be in \[0, 1\)'):
        TrainConfig.from_dict(dict(val_fraction=1.0, val_split=None))
    with pytest.raises(ValueError, match='test_split and val_split are both'):
        TrainConfig.from_dict(dict(test_split='test'))
    with pytest.raises(ValueError, match='no validation split'):
        TrainConfig.from_dict(dict(val_split=None))


def test_test_split_is_read_once_after_the_last_epoch(idx_120, tmp_path, monkeypatch):
    calls = []
    evaluate = Trainer.evaluate

    def spy(self, module, prefix='', split='val'):
        calls.append((split, prefix, len(self.history)))
        return evaluate(self, module, prefix=prefix, split=split)

    monkeypatch.setattr(Trainer, 'evaluate', spy)
    cfg = tiny(idx_120, tmp_path, epochs=3, val_split=None, val_fraction=0.2, test_split='test',
               train_num_samples=None, batch_size=32, model_ema=True)
    trainer = Trainer(cfg)
    final = trainer.fit()
    tests = [c for c in calls if c[0] == 'test']
    assert tests == [('test', '', 3), ('test', 'ema_', 3)]                  # once each, after all 3 epochs
    assert [c[2] for c in calls if c[0] == 'val'] == [0, 0, 1, 1, 2, 2]       # validation every epoch
    doc = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert doc['run']['val_images'] == 24 and doc['run']['test_images'] == 20
    assert doc['test']['test_images'] == 20 and [r['epoch'] for r in doc['epochs']] == [1, 2, 3]
    assert final['test_top1'] == doc['test']['top1'] and final['top1'] == doc['epochs'][-1]['top1']
    assert final['test_images'] == 20 and final['test_ema_top1'] == doc['test']['ema_top1']
    last_csv_row = (tmp_path / 'run' / 'metrics.csv').read_text().splitlines()[-1]
    assert last_csv_row.startswith('test,')
    card = (tmp_path / 'run' / 'model' / 'README.md').read_text()
    assert 'measured on the test split.' in card and 'Val top-1' in card
    cfg_json = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())
    assert cfg_json['hff']['metrics']['split'] == 'test'
    assert cfg_json['hff']['metrics']['top1'] == doc['test']['top1']
    ema = json.loads((tmp_path / 'run' / 'model_ema' / 'config.json').read_text())['hff']['metrics']
    assert ema['top1'] == doc['test']['ema_top1'] and ema['val_top1'] == doc['epochs'][-1]['ema_top1']


@pytest.mark.parametrize('kw', [dict(model='test_resnet', small_input=True, check_img_size=28, in_chans=1),
                                dict(model='resnet18', num_stages=4, check_img_size=32),
                                dict(model='test_vit', num_stages=3)], ids=['test_resnet', 'resnet18', 'test_vit'])
def test_stage_shares_add_up(kw):
    import timm_hff
    from timm_hff._profile import stage_profile
    kw = dict(kw)
    model = timm_hff.create_model(kw.pop('model'), num_classes=5, **kw)
    rows = stage_profile(model)
    assert len(rows) == model.num_stages
    assert sum(r['param_share'] for r in rows) == pytest.approx(1.0)
    assert sum(r['flops_share'] for r in rows) == pytest.approx(1.0)
    assert sum(r['params'] for r in rows) == sum(len(n) and sum(
        dict(model.backbone.named_parameters())[p].numel() for p in n) for n in model.split.stage_param_names)
    assert all(r['flops'] > 0 and r['layers'] >= 1 for r in rows)
    # the FLOPs of the stages are those of the backbone's own forward
    from torch.utils.flop_counter import FlopCounterMode
    size = model.split.probe_img_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval().backbone.forward_head(model.backbone.forward_features(torch.zeros(1, model.in_chans, size, size)),
                                           pre_logits=True)
    assert sum(r['flops'] for r in rows) == counter.get_total_flops()


def test_hff_validate_reproduces_the_trainers_test_figures(idx_120, tmp_path, capsys):
    from timm_hff.validate import main as validate_main
    cfg = tiny(idx_120, tmp_path, epochs=1, val_split=None, val_fraction=0.2, test_split='test',
               train_num_samples=None, batch_size=32)
    Trainer(cfg).fit()
    doc = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    out = tmp_path / 'val.json'
    assert validate_main([f'local-dir:{tmp_path / "run" / "model"}', '--dataset', 'idx', '--data-dir', idx_120,
                          '--split', 'test', '--results-file', str(out), '--batch-size', '7']) == 0
    got = json.loads(out.read_text())
    assert got['images'] == 20 and got['split'] == 'test'
    for key in ['top1', 'top1_ensemble'] + [f'top1_stage{k}' for k in range(4)]:
        assert got[key] == pytest.approx(doc['test'][key]), key
    assert 'top-1' in capsys.readouterr().out
    assert validate_main(['resnet18', '--dataset', 'idx', '--data-dir', idx_120]) == 2
    assert "is not a saved model; pass 'local-dir:" in capsys.readouterr().err
