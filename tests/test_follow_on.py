"""The user's second step: a saved model in timm's tools, and every follow-on run (fine-tune, resume, a new label set,
a BP comparison) does what it says or refuses in one line naming the setting.

Each test here failed on the code before issue 31's fixes (its log: benchmarks/results/follow_on/before.log).
timm's own scripts on a model trained by hff-train are the slow peer suite, tests/test_timm_scripts.py.
"""
import json
import logging
import os

import pytest
import timm
import torch

import timm_hff
from timm_hff.train import TrainConfig, Trainer

from conftest import ckpt, reset_accelerate, tiny, tiny_settings, weights   # also the fixture idx_root
from test_data import make_imagefolder


def _run(cfg):
    reset_accelerate()
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.lock and trainer.lock.release()
    return trainer


def _saved(tmp_path, **kw):
    """A small-input model (deep stem, 3 classes, 28 px, one channel) saved as hff-train saves it."""
    model = timm_hff.create_model('resnet18', num_classes=3, in_chans=1, small_input=True, check_img_size=28,
                                  channels=[8, 16, 16, 16], stem_type='deep', stem_width=8, layers=[1, 1, 1, 1],
                                  **kw)
    path = str(tmp_path / 'saved')
    timm_hff.save_pretrained(model, path, label_names=['a', 'b', 'c'],
                             train_args=dict(img_size=28, mean=[0.5], std=[0.25], crop_pct=1.0))
    return model, path


# ----- timm cfgs that tell the model's truth -----
def _assert_truthful(model, size=28, chans=1):
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (chans, size, size) and isinstance(cfg['input_size'], tuple)
    assert cfg['test_input_size'] == cfg['input_size']                       # timm's scripts use the test size
    assert cfg['test_crop_pct'] == cfg['crop_pct']
    assert all(isinstance(cfg[k], tuple) for k in ('mean', 'std', 'pool_size'))
    state = model.state_dict()
    first = cfg['first_conv']
    assert f'{first}.weight' in state and state[f'{first}.weight'].shape[1] == chans   # the layer that sees the image
    with torch.no_grad():
        feats = model.eval().forward_features(torch.randn(1, chans, size, size))
    assert tuple(feats.shape[-2:]) == cfg['pool_size'] == cfg['test_pool_size']
    data = timm.data.resolve_data_config(model=model, use_test_size=True)   # what validate.py / benchmark.py read
    assert data['input_size'] == (chans, size, size) and data['crop_pct'] == cfg['crop_pct']


@pytest.mark.parametrize('loader', ['timm', 'timm_hff'])
def test_saved_model_cfg_is_the_trained_one(tmp_path, loader):
    built, path = _saved(tmp_path)
    _assert_truthful(built)
    create = timm.create_model if loader == 'timm' else timm_hff.create_model
    loaded = create(f'local-dir:{path}', pretrained=True)
    _assert_truthful(loaded)
    assert loaded.pretrained_cfg['mean'] == (0.5,) and loaded.pretrained_cfg['label_names'] == ['a', 'b', 'c']
    # onnx_export.py: (batch,) + input_size
    assert ((2,) + loaded.pretrained_cfg['input_size']) == (2, 1, 28, 28)


def test_a_folder_saved_before_the_fix_loads_with_the_same_truth(tmp_path):
    _, path = _saved(tmp_path)
    cfg_path = os.path.join(path, 'config.json')
    doc = json.loads(open(cfg_path).read())
    pcfg = doc['pretrained_cfg']
    for key in ('test_input_size', 'test_crop_pct', 'test_pool_size'):
        pcfg.pop(key, None)
    pcfg['first_conv'] = 'conv1'   # what earlier versions wrote: timm's name, unprefixed, a Sequential here
    open(cfg_path, 'w').write(json.dumps(doc))
    _assert_truthful(timm.create_model(f'local-dir:{path}', pretrained=True))


def test_another_channel_count_adapts_the_real_first_conv(tmp_path):
    """validate.py / onnx_export.py build with in_chans=3: the deep stem's conv1.0 is adapted, as timm does."""
    built, path = _saved(tmp_path)
    rgb = timm.create_model(f'local-dir:{path}', pretrained=True, in_chans=3).eval()
    assert rgb.pretrained_cfg['input_size'] == (3, 28, 28) and rgb.pretrained_cfg['first_conv'] == 'backbone.conv1.0'
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(rgb(x.expand(-1, 3, -1, -1)), built.eval()(x), atol=1e-4)


def test_registered_names_carry_their_test_size():
    cfg = timm.models.get_pretrained_cfg('hff_resnet18_small')
    assert cfg.test_input_size == cfg.input_size == (3, 32, 32) and cfg.test_crop_pct == cfg.crop_pct


# ----- timm's training loop reaches every stage -----
def test_a_plain_loss_in_train_mode_trains_every_unfrozen_stage():
    model = timm_hff.create_model('test_resnet', num_classes=4, check_img_size=32, predict_from='last')
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).logsumexp(-1).mean().backward()
    heads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters()) for h in model.heads]
    assert all(heads)
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.freeze_stages([0])
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.stage_parameters(0))
    with torch.no_grad():   # evaluation predicts as predict_from says: the last stage
        model.eval()
        assert torch.equal(model(x), model.forward_stages(x)[-1])


def test_a_frozen_stage_is_wholly_in_eval_mode():
    model = timm_hff.create_model('test_vit', num_classes=3, num_stages=2, drop_path_rate=0.2, pos_drop_rate=0.2)
    model.freeze_stages([0])
    model.train()
    blocks0 = [n for n in model.split.stage_param_names[0] if n.startswith('blocks.')]
    prefix = blocks0[0].split('.')[0] + '.' + blocks0[0].split('.')[1]
    inside = {n: m for n, m in model.backbone.named_modules() if n.startswith(prefix + '.') or n == 'pos_drop'}
    assert any('drop_path' in n for n in inside) and all(not m.training for m in inside.values())
    later = model.split.stage_param_names[1][0].rsplit('.', 1)[0]
    assert model.backbone.get_submodule(later).training


def test_a_truncated_cut_serves_its_last_trained_stage():
    model = timm_hff.create_model('test_resnet', num_classes=3, stage_indices=[0, 1], check_img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.split.channels[-1] == model.num_features
        assert torch.allclose(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.split.channels[-1])
        model.reset_classifier(0)
        assert model(x).shape == (2, model.split.channels[-1])


# ----- a follow-on hff-train run -----
def test_resume_applies_the_runs_optimizer_settings(idx_root, tmp_path, capsys):
    _run(tiny(idx_root, tmp_path, opt='adamw', weight_decay=0.05, epochs=1))
    trainer = Trainer(tiny(idx_root, tmp_path, opt='adamw', weight_decay=0.2, opt_betas=[0.8, 0.9], opt_eps=1e-6,
                           epochs=2, resume=ckpt(tmp_path, 0)))
    try:
        groups = trainer.optimizer.param_groups
        assert {g['weight_decay'] for g in groups if g['weight_decay']} == {0.2}
        assert all(g['betas'] == (0.8, 0.9) and g['eps'] == 1e-6 for g in groups)
    finally:
        trainer.lock.release()
    assert "weight_decay 0.05 -> 0.2 (this run's)" in capsys.readouterr().out


@pytest.mark.parametrize('change', [dict(opt='sgd'), dict(freeze_stages=[0]), dict(head_only=True),
                                    dict(layer_decay=0.8)], ids=lambda c: next(iter(c)))
def test_resume_refuses_a_change_of_what_trains_in_one_line(idx_root, tmp_path, change):
    _run(tiny(idx_root, tmp_path, opt='adamw', epochs=1))
    reset_accelerate()
    key = next(iter(change))
    with pytest.raises(ValueError, match=f'made with {key}=.* but this run has {key}=') as e:
        Trainer(tiny(idx_root, tmp_path, **{**dict(opt='adamw', epochs=2, resume=ckpt(tmp_path, 0)), **change}))
    assert 'cannot be loaded' not in str(e.value) and '\n' not in str(e.value)


def test_a_bare_resume_with_nothing_to_resume_is_refused(idx_root, tmp_path):
    from timm_hff.train.cli import main
    reset_accelerate()
    rc = main(['--config', _write_recipe(tmp_path, tiny_settings(idx_root, tmp_path)), '--resume'])
    assert rc != 0 and not os.path.exists(os.path.join(str(tmp_path), 'run', 'checkpoints'))


def _write_recipe(tmp_path, settings) -> str:
    import yaml
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_fp16_on_a_cpu_is_refused(idx_root, tmp_path):
    reset_accelerate()
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        Trainer(tiny(idx_root, tmp_path, mixed_precision='fp16'))


def test_a_recipes_class_count_that_disagrees_with_the_data_is_refused(tmp_path):
    data = make_imagefolder(str(tmp_path / 'folder'), per_class=(4, 2), size=28, mode='L')
    reset_accelerate()
    with pytest.raises(ValueError, match='has 3 classes .* but num_classes=10'):
        Trainer(TrainConfig.from_dict(dict(tiny_settings(None, tmp_path, dataset='imagefolder', data_dir=data,
                                                         num_classes=10, train_num_samples=None))))


def test_a_new_label_set_from_a_saved_model_is_said(idx_root, tmp_path):
    """Same class count, other classes: the saved prototypes are the old classes', so it is refused without
    reset_prototypes, and with it every stage (frozen ones too) gets fresh, fitted prototypes."""
    src = timm_hff.create_model('test_resnet', num_classes=10, in_chans=1, small_input=True, check_img_size=28)
    path = timm_hff.save_pretrained(src, str(tmp_path / 'src'), label_names=[f'class{i}' for i in range(10)],
                                    card=False)
    settings = dict(model=f'local-dir:{path}', pretrained=True, freeze_stages=[0], hff={})
    reset_accelerate()
    with pytest.raises(ValueError, match='reset_prototypes'):
        Trainer(tiny(idx_root, tmp_path, **settings))
    _run(tiny(idx_root, tmp_path, experiment='new', reset_prototypes=True, **settings))
    new = weights(str(tmp_path / 'new' / 'model'))
    assert not torch.equal(new['heads.0.prototypes'], src.heads[0].prototypes)          # fitted, not kept
    frozen = src.split.stage_param_names[0][0]
    assert torch.equal(new[f'backbone.{frozen}'], src.backbone.get_parameter(frozen))   # the frozen slice kept


def test_freezing_random_layers_is_said(idx_root, tmp_path, caplog):
    reset_accelerate()
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny(idx_root, tmp_path, freeze_stages=[0]))
    trainer.lock.release()
    assert any('freezes randomly initialised layers' in r.getMessage() for r in caplog.records)


def test_hff_validate_device_and_flag_mistakes_are_one_line(capsys):
    from timm_hff.validate import main
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present')
    assert main(['local-dir:/nonexistent', '--data_dir', '/nonexistent', '--device', 'cuda']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('hff-validate: error: --device cuda: this machine has 0 CUDA device(s)')


def test_hff_train_device_flag_says_what_to_do(capsys):
    from timm_hff.train.cli import main
    with pytest.raises(SystemExit):
        main(['--config', 'recipes/fashion_mnist_quick.yaml', '--device', 'cuda'])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'has no --device' in err and 'decay_rate' not in err


# ----- BP with the same frozen blocks -----
def test_bp_freezes_the_very_blocks_hff_freezes(idx_root, tmp_path):
    settings = dict(freeze_stages=[0, 1], pretrained=False, opt='adamw', lr=0.01)
    hff = _run(tiny(idx_root, tmp_path, experiment='hff', **settings))
    hff_model = hff.accelerator.unwrap_model(hff.model)
    bp = _run(tiny(idx_root, tmp_path, experiment='bp', method='bp', **settings))
    bp_model = bp.accelerator.unwrap_model(bp.model)
    hff_frozen = {n for k in (0, 1) for n in hff_model.split.stage_param_names[k]}
    bp_frozen = {n for n, p in bp_model.named_parameters() if not p.requires_grad}
    assert bp_frozen == hff_frozen and bp_frozen
    start = timm_hff.create_model('test_resnet', num_classes=10, in_chans=1, small_input=True, check_img_size=28)
    assert set(start.backbone.state_dict()) <= set(bp_model.state_dict()) | {'fc.weight', 'fc.bias'}
    bp_model.train()
    bp.method.train_mode(bp_model, bp.cfg, 0)
    from timm_hff._stages import stage_modules
    assert all(not m.training for m in stage_modules(bp_model, sorted(bp_frozen)))


def test_bp_from_a_saved_hff_model_fine_tunes_its_backbone(idx_root, tmp_path):
    src = timm_hff.create_model('test_resnet', num_classes=10, in_chans=1, small_input=True, check_img_size=28)
    path = timm_hff.save_pretrained(src, str(tmp_path / 'src'), card=False)
    bp = _run(tiny(idx_root, tmp_path, experiment='bp', method='bp', model=f'local-dir:{path}', pretrained=True,
                   hff={}, freeze_stages=[0]))
    saved = weights(str(tmp_path / 'bp' / 'model'))
    frozen = src.split.stage_param_names[0]
    assert all(torch.equal(saved[n], src.backbone.get_parameter(n)) for n in frozen)   # the saved weights, kept
    last = src.split.stage_param_names[-1][0]
    assert not torch.equal(saved[last], src.backbone.get_parameter(last))              # the rest trained end to end
    again = timm.create_model(f'local-dir:{tmp_path / "bp" / "model"}', pretrained=True, in_chans=1)
    assert type(again).__name__ == type(bp.accelerator.unwrap_model(bp.model)).__name__


def test_resume_gives_a_fused_step_its_flags_back():
    """cuda_graphs resumed from an eager run: torch's load_state_dict would restore the checkpoint's fused=None (and
    capturable=False), and the capture would stop on a host read; the run's flags are written back instead."""
    from timm_hff.train.optim import run_settings_kept
    w = torch.nn.Parameter(torch.randn(4, 3))
    eager = torch.optim.AdamW([w], lr=0.1, weight_decay=0.05)
    w.grad = torch.randn_like(w)
    eager.step()
    fused = torch.optim.AdamW([w], lr=0.1, weight_decay=0.2, fused=True)
    changes = []
    with run_settings_kept(fused, changes):
        fused.load_state_dict(eager.state_dict())
    group = fused.param_groups[0]
    assert group['fused'] is True and group['weight_decay'] == 0.2
    assert {k for k, _, _ in changes} == {'fused', 'weight_decay'}
    assert fused.state[w]['step'].dtype == torch.float32 and int(fused.state[w]['step']) == 1   # the count kept
    fused.step()   # the fused kernel takes the restored state
    assert int(fused.state[w]['step']) == 2
