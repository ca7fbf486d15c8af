"""Data sources (IDX, imagefolder, Hub id, streaming), column inference, errors, transforms and loaders.

Everything runs on small generated data; the Hub is intercepted (``datasets.load_dataset`` patched) so the Hub code
path, its column inference and its errors are exercised offline.
"""
import gzip
import os

import numpy as np
import pytest
import torch

import datasets   # a hard dependency of timm_hff: a missing one is a failure, not a skip
from PIL import Image

from timm_hff.data import (
    AugConfig, BatchTransform, EpochSampler, SampleTransform, create_image_loader, images_to_uint8,
    load_image_dataset, random_pad_crop, resolve_data_config,
)


def write_idx(path, array, gz=True):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b''.join(
        int(d).to_bytes(4, 'big') for d in array.shape)
    data = header + array.tobytes()
    with (gzip.open(path + '.gz', 'wb') if gz else open(path, 'wb')) as f:
        f.write(data)


def make_idx(root, n_train=40, n_test=13, classes=10, size=28, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        y = (np.arange(n) % classes).astype(np.uint8)
        write_idx(os.path.join(root, f'{prefix}-images-idx3-ubyte'), x, gz=split == 'train')
        write_idx(os.path.join(root, f'{prefix}-labels-idx1-ubyte'), y, gz=split == 'train')
        out[split] = (x, y)
    return out


def make_imagefolder(root, classes=('cat', 'dog', 'eel'), per_class=(4, 2), size=20, mode='RGB'):
    rng = np.random.default_rng(1)
    for split, n in zip(('train', 'test'), per_class):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                shape = (size, size, 3) if mode == 'RGB' else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    os.path.join(root, split, c, f'{i}.png'))
    return root


@pytest.fixture
def idx_dir(tmp_path):
    root = str(tmp_path / 'idx')
    return root, make_idx(root)


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(str(tmp_path / 'folder'))


class _Model:   # what resolve_model_data_config needs from a model
    pretrained_cfg = dict(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          crop_pct=0.875, interpolation='bicubic')


def data_cfg(in_chans=1, size=28, crop_pct=1.0):
    return resolve_data_config(_Model(), in_chans, size, crop_pct=crop_pct)


# ----- sources -----
def test_idx_source_is_a_dataset_with_classlabel(idx_dir):
    root, arrays = idx_dir
    d = load_image_dataset('idx', root, 'test')
    assert isinstance(d.dataset, datasets.Dataset)
    assert isinstance(d.dataset.features['label'], datasets.ClassLabel)
    assert (d.image_key, d.label_key, d.num_classes, len(d)) == ('image', 'label', 10, 13)
    assert d.array_images and d.source == 'idx'
    row = d.dataset.with_format('numpy')[5]
    np.testing.assert_array_equal(row['image'], arrays['test'][0][5])
    assert row['label'] == arrays['test'][1][5]
    # '' infers IDX from the folder; num_samples keeps the first rows
    d2 = load_image_dataset('', root, 'train', num_samples=7)
    assert d2.source == 'idx' and len(d2) == 7


def test_idx_fashion_names_and_unknown_split(tmp_path):
    root = str(tmp_path / 'fashion-mnist')
    make_idx(root)
    d = load_image_dataset('idx', root, 'train')
    assert d.label_names[0] == 'T-shirt/top' and d.label_names[9] == 'Ankle boot'
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_image_dataset('idx', root, 'validation')


def test_imagefolder_source_and_unknown_split(folder):
    d = load_image_dataset('imagefolder', folder, 'train')
    assert d.label_names == ['cat', 'dog', 'eel'] and len(d) == 12 and not d.array_images
    assert type(d.dataset.features[d.image_key]).__name__ == 'Image'
    assert load_image_dataset('', folder, 'test').source == 'imagefolder'
    with pytest.raises(ValueError, match="split 'validation' does not exist"):
        load_image_dataset('imagefolder', folder, 'validation')


def test_missing_path_and_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_image_dataset('idx', str(tmp_path / 'nope'))
    with pytest.raises(ValueError, match='set data_dir'):
        load_image_dataset('imagefolder', None)
    with pytest.raises(ValueError, match="hfds/uoft-cs/cifar10"):
        load_image_dataset('uoft-cs/cifar10')
    with pytest.raises(ValueError, match='unknown dataset'):
        load_image_dataset('cifar10')


def _cifar100_like(n=12):
    rng = np.random.default_rng(0)
    feats = datasets.Features({'img': datasets.Image(), 'fine_label': datasets.ClassLabel(num_classes=100),
                               'coarse_label': datasets.ClassLabel(num_classes=20)})
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({'img': imgs, 'fine_label': list(range(n)), 'coarse_label': [0] * n},
                                      features=feats)


def test_hub_id_and_stream_with_inferred_columns(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        if split != 'train':
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'test\'].')
        ds = _cifar100_like()
        return ds.to_iterable_dataset(num_shards=2) if streaming else ds

    monkeypatch.setattr(datasets, 'load_dataset', fake_load_dataset)
    d = load_image_dataset('hfds/uoft-cs/cifar100')
    assert calls[-1] == ('uoft-cs/cifar100', None, 'train', False)
    assert (d.source, d.name, d.image_key, d.label_key, d.num_classes) == ('hub', 'uoft-cs/cifar100', 'img',
                                                                         'fine_label', 100)
    s = load_image_dataset('hfids/uoft-cs/cifar100', num_samples=5)
    assert calls[-1][3] is True and s.streaming and len(s) == 5
    assert sum(1 for _ in s.dataset) == 5
    with pytest.raises(ValueError, match="split 'validation' does not exist in uoft-cs/cifar100"):
        load_image_dataset('hfds/uoft-cs/cifar100', split='validation')


def test_label_columns_checked(monkeypatch):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(4)]
    tables = {
        'strings': datasets.Dataset.from_dict({'image': imgs, 'label': ['a', 'b', 'a', 'b']}),
        'ints': datasets.Dataset.from_dict({'image': imgs, 'label': [0, 1, 2, 7]}),
        'classes': datasets.Dataset.from_dict({'image': imgs, 'label': [0, 1, 2, 3]}, features=datasets.Features(
            {'image': datasets.Image(), 'label': datasets.ClassLabel(num_classes=4)})),
        'nolabel': datasets.Dataset.from_dict({'image': imgs, 'y1': [0] * 4, 'y2': [1] * 4}),
    }
    monkeypatch.setattr(datasets, 'load_dataset', lambda path, name=None, split=None, streaming=False: tables[path])
    with pytest.raises(ValueError, match="column 'label' is .*not a class label"):
        load_image_dataset('hfds/strings')
    with pytest.raises(ValueError, match='not a ClassLabel, so the class count is unknown; set num_classes'):
        load_image_dataset('hfds/ints')
    with pytest.raises(ValueError, match=r'labels in \[0, 7\], outside \[0, 5\)'):
        load_image_dataset('hfds/ints', num_classes=5)
    ok = load_image_dataset('hfds/ints', num_classes=8)
    assert ok.num_classes == 8 and isinstance(ok.dataset.features['label'], datasets.ClassLabel)
    with pytest.raises(ValueError, match='has 4 classes but num_classes=3'):
        load_image_dataset('hfds/classes', num_classes=3)
    with pytest.raises(ValueError, match=r'has 4 classes \(0, 1, 2, 3\) but num_classes=6: .*no image has'):
        load_image_dataset('hfds/classes', num_classes=6)   # never phantom classes '4', '5'
    with pytest.raises(ValueError, match='set target_key'):
        load_image_dataset('hfds/nolabel')
    with pytest.raises(ValueError, match="no label column 'target'"):
        load_image_dataset('hfds/classes', target_key='target')


# ----- transforms -----
def test_resolve_data_config_fits_channels():
    cfg = data_cfg(in_chans=1, size=28)
    assert cfg['input_size'] == (1, 28, 28) and len(cfg['mean']) == 1
    assert cfg['mean'][0] == pytest.approx(np.mean(_Model.pretrained_cfg['mean']))
    assert resolve_data_config(_Model(), 1, 28, mean=[0.3], std=[0.2])['mean'] == (0.3,)
    with pytest.raises(ValueError, match='mean has 2 values'):
        resolve_data_config(_Model(), 3, 32, mean=[0.1, 0.2])


@pytest.mark.parametrize('in_chans', [1, 3])
def test_grayscale_and_rgb_sources_follow_in_chans(folder, idx_dir, in_chans):
    for spec, root in (('imagefolder', folder), ('idx', idx_dir[0])):
        d = load_image_dataset(spec, root, 'test')
        loader = create_image_loader(d, data_cfg(in_chans, 16, 0.875), False, 4, workers=0)
        x, y = next(iter(loader.loader))
        assert x.dtype == torch.uint8 and x.shape == (4, in_chans, 16, 16), spec
        out = loader.transform(x)
        assert out.dtype == torch.float32 and out.shape == (4, in_chans, 16, 16)


@pytest.mark.parametrize('size,crop_pct', [(28, 1.0), (24, 0.875), (32, 1.0)])
def test_memory_path_equals_per_sample_timm_path(idx_dir, size, crop_pct):
    """Decoding once into a tensor gives bit-identical eval inputs to timm's per-sample PIL transform."""
    d = load_image_dataset('idx', idx_dir[0], 'test')
    cfg = data_cfg(1, size, crop_pct)
    mem = create_image_loader(d, cfg, False, 5, in_memory=True)
    per = create_image_loader(d, cfg, False, 5, in_memory=False, workers=0)
    assert (mem.kind, per.kind) == ('memory', 'samples')
    for (xm, ym), (xp, yp) in zip(mem.loader, per.loader):
        assert torch.equal(ym, yp)
        assert torch.equal(xm, xp)


def test_images_to_uint8_luma_like_pil():
    rgb = torch.randint(0, 256, (3, 6, 6, 3), dtype=torch.uint8)
    cfg = dict(input_size=(1, 6, 6), crop_pct=1.0)
    assert images_to_uint8(rgb, dict(input_size=(1, 5, 5))) is None   # a resize is left to timm's transform
    got = images_to_uint8(rgb, cfg)
    want = np.stack([np.asarray(Image.fromarray(a.numpy()).convert('L')) for a in rgb])
    np.testing.assert_array_equal(got[:, 0].numpy(), want)


def test_random_pad_crop_is_a_shifted_window():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 1, 10, 10), dtype=torch.uint8)
    out = random_pad_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 10, dx:dx + 10])]
        assert match, i
        shifts.add(match[0])
    assert len(shifts) > 5   # offsets really vary per image


def test_batch_transform_normalises_flips_and_erases():
    cfg = dict(mean=(0.5,), std=(0.25,), input_size=(1, 8, 8))
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(4, 1, 1, 1)
    ev = BatchTransform(cfg, train=False)(x)
    torch.testing.assert_close(ev, (x.float() / 255 - 0.5) / 0.25)
    flip = BatchTransform(cfg, train=True, aug=AugConfig(aug='none', hflip=1.0))(x)
    torch.testing.assert_close(flip, ev.flip(-1))
    erased = BatchTransform(cfg, train=True, aug=AugConfig(aug='none', hflip=0.0, reprob=1.0, remode='const'))(x)
    assert (erased == 0).any() and not torch.equal(erased, ev)


def test_timm_aug_runs_per_sample(folder):
    d = load_image_dataset('imagefolder', folder, 'train')
    cfg = data_cfg(3, 16, 1.0)
    loader = create_image_loader(d, cfg, True, 4, aug=AugConfig(aug='timm', aa='rand-m5-n1'), workers=0,
                                 in_memory=True)
    assert loader.kind == 'samples'   # a per-sample timm augmentation cannot run from the decoded tensor
    x, y = next(iter(loader.loader))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 16, 16)
    torch.manual_seed(0)
    draws = [loader.loader.dataset[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])   # random per draw
    ev = SampleTransform(cfg, train=False)
    assert torch.equal(ev(d.dataset[0]['image']), ev(d.dataset[0]['image']))


# ----- loaders -----
def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_memory_loader_serves_whole_batches_in_sampler_order(idx_dir):
    root, arrays = idx_dir
    d = load_image_dataset('idx', root, 'train')
    loader = create_image_loader(d, data_cfg(1, 28), True, 8, seed=5)
    loader.loader.sampler.set_epoch(1)
    order = list(loader.loader.sampler)
    x, y = next(iter(loader.loader))
    np.testing.assert_array_equal(x[:, 0].numpy(), arrays['train'][0][order[:8]])
    np.testing.assert_array_equal(y.numpy(), arrays['train'][1][order[:8]])


def test_stream_loader_and_label_check(folder):
    d = load_image_dataset('imagefolder', folder, 'train', streaming=True, num_samples=10)
    loader = create_image_loader(d, data_cfg(3, 16), True, 4, workers=0, shuffle_buffer=8)
    assert loader.kind == 'stream' and loader.sharded
    batches = list(loader.loader)
    assert sum(len(y) for _, y in batches) == 10 and batches[0][0].shape == (4, 3, 16, 16)
    # a label the split did not promise is caught in the batch (streams cannot be scanned up front)
    d.num_classes = 2
    bad = create_image_loader(d, data_cfg(3, 16), False, 12, workers=0)
    with pytest.raises(ValueError, match=r'outside \[0, 2\)'):
        list(bad.loader)
    with pytest.raises(ValueError, match='cannot also be held in memory'):
        create_image_loader(d, data_cfg(3, 16), False, 4, in_memory=True)


def test_stream_split_by_process(folder):
    d = load_image_dataset('imagefolder', folder, 'train', streaming=True)
    seen = []
    for rank in range(2):
        loader = create_image_loader(d, data_cfg(3, 16), False, 3, workers=0, process_index=rank, num_processes=2)
        seen.append(sum(len(y) for _, y in loader.loader))
    assert sum(seen) == 12 and all(s > 0 for s in seen)
