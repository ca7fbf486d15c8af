"""Training: config loading, every recipe's two-step smoke run (through the CLI), schedules, resume equivalence,
bf16 on CPU, a 2-process DDP run, the BP baseline, saved models, metrics files and run-folder safety.

All runs are tiny (timm's ``test_resnet`` or the recipe's own backbone at <= 32 px, a few dozen generated images).
"""
import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from timm_hff.train import TrainConfig, Trainer
from timm_hff.train.checkpoint import RunInUseError
from timm_hff.train.cli import build_parser, main, parse_overrides

from conftest import REPO, ckpt, tiny, weights   # also the fixtures idx_root, fresh_accelerate_state
from conftest import cli_args as _cli_args, reset_accelerate as AcceleratorReset
from test_data import make_imagefolder

RECIPES = sorted(glob.glob(os.path.join(REPO, 'recipes', '*.yaml')))
pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')


@pytest.fixture(scope='module')
def folder_root(tmp_path_factory):
    return make_imagefolder(str(tmp_path_factory.mktemp('data') / 'folder'), per_class=(4, 3))


def run(cfg):
    trainer = Trainer(cfg)
    return trainer, trainer.fit()


# ----- config -----
def test_config_is_strict():
    with pytest.raises(ValueError, match="unknown setting 'lrr'; did you mean 'lr'"):
        TrainConfig.from_dict(dict(lrr=0.1))
    with pytest.raises(ValueError, match='epochs must be an integer'):
        TrainConfig.from_dict(dict(epochs='ten'))
    with pytest.raises(ValueError, match='pretrained must be true or false'):
        TrainConfig.from_dict(dict(pretrained='yes'))
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig.from_dict(dict(schedule='greedy'))
    with pytest.raises(ValueError, match='unknown HFF setting'):
        TrainConfig.from_dict(dict(hff=dict(protos=2)))
    with pytest.raises(ValueError, match="method 'bp' trains end to end"):
        TrainConfig.from_dict(dict(method='bp', schedule='sequential'))
    with pytest.raises(ValueError, match='set train_num_samples'):
        TrainConfig.from_dict(dict(dataset='hfids/ILSVRC/imagenet-1k'))
    assert TrainConfig.from_dict(dict(lr='1e-3')).lr == pytest.approx(1e-3)   # YAML 1.1 reads 1e-3 as a string
    assert TrainConfig.from_dict(dict(lr=1)).lr == 1.0 and isinstance(TrainConfig.from_dict(dict(lr=1)).lr, float)


def test_yaml_and_cli_overrides(tmp_path):
    recipe = tmp_path / 'my_recipe.yaml'
    recipe.write_text('lr: 0.5\nepochs: 3\nmodel_kwargs: {channels: [8, 16]}\n')
    ns = build_parser().parse_args(['--config', str(recipe), '--epochs', '7', '--model-kwargs', '{a: 1}',
                                    '--freeze_stages', '[0, 1]', '--experiment', '2024', '--crop-pct', 'null'])
    over = parse_overrides(ns)
    assert over == dict(epochs=7, model_kwargs=dict(a=1), freeze_stages=[0, 1], experiment='2024', crop_pct=None)
    cfg = TrainConfig.from_yaml(str(recipe), over)
    assert (cfg.lr, cfg.epochs, cfg.experiment) == (0.5, 7, '2024')
    assert TrainConfig.from_yaml(str(recipe)).experiment == 'my_recipe'
    assert TrainConfig.from_yaml(str(recipe), dict(method='bp')).experiment == 'my_recipe_bp'
    # mappings merge key by key: --hff '{margin: 0.3}' keeps the recipe's cut and stem
    (tmp_path / 'cut.yaml').write_text('hff: {small_input: true, stage_indices: [0, 4]}\n'
                                       'model_kwargs: {layers: [1, 1]}\n')
    over = parse_overrides(build_parser().parse_args(['--hff', '{margin: 0.3}', '--model-kwargs', '{channels: [8]}']))
    cfg = TrainConfig.from_yaml(str(tmp_path / 'cut.yaml'), over)
    assert cfg.hff == dict(small_input=True, stage_indices=[0, 4], margin=0.3)
    assert cfg.model_kwargs == dict(layers=[1, 1], channels=[8])
    (tmp_path / 'bad.yaml').write_text('lr: 0.1\nbatchsize: 4\n')
    with pytest.raises(ValueError, match="unknown setting 'batchsize'; did you mean 'batch_size'"):
        TrainConfig.from_yaml(str(tmp_path / 'bad.yaml'))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / 'bad.yaml').write_text('epochs: -1\n')
    assert main(['--config', str(tmp_path / 'bad.yaml')]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'hff-train: error: epochs must be >= 1, got -1'
    assert main(['--config', str(tmp_path / 'missing.yaml')]) == 2
    assert 'not found' in capsys.readouterr().err


# ----- recipes -----
from timm_hff.data import load_idx_arrays  # noqa: E402
def _stand_in(recipe, idx_root, folder_root, out, tmp_path):
    """Overrides that turn a recipe into a two-step run on local generated data, keeping everything else."""
    with open(recipe) as f:
        import yaml
        d = yaml.safe_load(f)
    over = dict(train_num_samples=4, val_num_samples=5, batch_size=2, validation_batch_size=3, epochs=1, min_steps=0,
                workers=0, output=str(out), progress=False, warmup_epochs=0, pretrained=False,
                data_in_memory=None, dataset_config=None, input_key=None, target_key=None, train_split='train',
                val_split='test')
    if d.get('in_chans', 3) == 1:
        over.update(dataset='idx', data_dir=idx_root)
    else:
        over.update(dataset='imagefolder', data_dir=folder_root, streaming=bool(d.get('dataset', '').startswith(
            'hfids/')), num_classes=None)
    if d.get('val_fraction'):   # the recipe's own protocol: a class-balanced hold-out, the test split at the end
        over.update(val_split=None, val_fraction=0.25, train_num_samples=48, batch_size=18,
                    test_split=d.get('test_split'))
        if over['dataset'] == 'imagefolder':   # 12 training images: half held out, at least 5 to validate on
            over.update(val_fraction=0.5, train_num_samples=12)
    if (d.get('img_size') or 224) > 32:
        over['img_size'] = 32
    if str(d.get('model', '')).startswith('local-dir:'):
        over.update(model='local-dir:' + _saved_hff_model(tmp_path), pretrained=True)
    return over


def _saved_hff_model(tmp_path, source_recipe=os.path.join(REPO, 'recipes', 'fashion_mnist.yaml')):
    """A model of the source recipe that transfer_hff.yaml names (the same cut and stage count), untrained."""
    import timm_hff
    from timm_hff import hub as _hub
    src = TrainConfig.from_yaml(source_recipe)
    model = timm_hff.create_model(src.model, num_classes=10, in_chans=src.in_chans, check_img_size=src.img_size,
                                  **src.model_kwargs, **src.hff)
    return _hub.save_pretrained(model, str(tmp_path / 'source_model'), card=False)


@pytest.mark.parametrize('recipe', RECIPES, ids=[os.path.basename(r)[:-5] for r in RECIPES])
def test_recipe_runs_two_steps(recipe, idx_root, folder_root, tmp_path, capsys):
    cfg = TrainConfig.from_yaml(recipe)   # parses as written
    assert cfg.experiment == os.path.basename(recipe)[:-5]
    over = _stand_in(recipe, idx_root, folder_root, tmp_path / 'out', tmp_path)
    assert main(['--config', recipe] + _cli_args(over)) == 0
    run_dir = tmp_path / 'out' / cfg.experiment
    history = json.loads((run_dir / 'metrics.json').read_text())['epochs']
    assert len(history) == 1
    row = history[0]
    steps = -(-round(over['train_num_samples'] * (1 - over.get('val_fraction', 0))) // over['batch_size'])
    assert row['train_img_per_s'] > 0 and np.isfinite(row['train_loss'])
    assert row['val_images'] == 5 and 0 <= row['top1'] <= 100
    assert os.path.isfile(run_dir / 'model' / 'model.safetensors')
    state = json.loads((run_dir / 'checkpoints' / 'epoch_0000' / 'trainer_state.json').read_text())
    assert state['updates'] == steps // cfg.grad_accum_steps
    if cfg.log_with == 'tensorboard':   # a dev dependency: the recipe's tracker really writes its events
        assert glob.glob(str(run_dir / '**' / 'events.out.tfevents.*'), recursive=True)
    # transfer from a saved HFF model: frozen stages keep the source backbone exactly, their heads are re-fitted (from
    # timm's pretrained weights, which the stand-in does not load: tests/test_pretrained.py checks those bitwise)
    if cfg.freeze_stages and 'model' in over:
        import timm_hff
        src = timm_hff.create_model(over['model'], pretrained=True)
        assert max(cfg.freeze_stages) < src.num_stages - 1, 'the recipe freezes every stage of its documented source'
        new = weights(str(run_dir / 'model'))
        frozen = [n for k in cfg.freeze_stages for n in src.split.stage_param_names[k]]
        assert frozen and all(torch.equal(new[f'backbone.{n}'], src.backbone.get_parameter(n)) for n in frozen)
        trained = src.split.stage_param_names[-1][0]
        assert not torch.equal(new[f'backbone.{trained}'], src.backbone.get_parameter(trained))
        if cfg.reset_prototypes:
            k = cfg.freeze_stages[0]
            assert not torch.equal(new[f'heads.{k}.prototypes'], src.heads[k].prototypes)   # re-fitted
    out = capsys.readouterr().out
    assert 'weights: ' in out and 'val top-1' in out
    if cfg.test_split:
        whole = (len(load_idx_arrays(idx_root, 'test')[1]) if over['dataset'] == 'idx'
                 else len(glob.glob(os.path.join(folder_root, 'test', '*', '*.png'))))
        # the whole test split, once: val_num_samples truncates the validation split only
        assert json.loads((run_dir / 'metrics.json').read_text())['test']['test_images'] == whole


@pytest.mark.parametrize('recipe', RECIPES, ids=[os.path.basename(r)[:-5] for r in RECIPES])
def test_recipe_runs_two_steps_as_bp_baseline(recipe, idx_root, folder_root, tmp_path, capsys, caplog):
    """``--baseline bp`` runs every shipped recipe: BP freezes the blocks HFF's freeze_stages names, takes a saved HFF
    model's backbone, and drops HFF-only settings (a schedule, reset_prototypes) with one line each."""
    import logging
    import yaml
    with open(recipe) as f:
        d = yaml.safe_load(f)
    over = _stand_in(recipe, idx_root, folder_root, tmp_path / 'out', tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(['--config', recipe, '--baseline', 'bp'] + _cli_args(over)) == 0
    run_dir = tmp_path / 'out' / (os.path.basename(recipe)[:-5] + '_bp')
    assert json.loads((run_dir / 'metrics.json').read_text())['run']['method'] == 'bp'
    said = ' '.join(r.getMessage() for r in caplog.records)
    if d.get('schedule') not in (None, 'simultaneous'):
        assert f"the recipe's schedule '{d['schedule']}' is HFF's" in said
    if d.get('reset_prototypes'):
        assert 'reset_prototypes draws fresh HFF prototypes' in said
    assert os.path.isfile(run_dir / 'model' / 'model.safetensors') and 'weights: ' in capsys.readouterr().out


def test_min_steps_stretches_a_small_datasets_schedule_by_a_whole_factor(idx_root, tmp_path, capsys):
    """16 images at batch 8 are 2 steps an epoch: min_steps 10 over 2 epochs (4 steps) stretches everything x3, so the
    run takes 12 steps, warms up for 3 epochs and validates as often as the recipe would have (every 3rd epoch)."""
    trainer, _ = run(tiny(idx_root, tmp_path, epochs=2, warmup_epochs=1, min_steps=10, save_model=False))
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())['epochs']
    assert len(history) == 6 and [r['epoch'] for r in history if 'top1' in r] == [3, 6]
    assert trainer.updates == 12 and trainer.cfg.warmup_epochs == 3
    assert 'stretched x3 (epochs 6, warmup_epochs 3, val_every 3)' in capsys.readouterr().out
    assert 'epochs: 6' in (tmp_path / 'run' / 'config.yaml').read_text()
    AcceleratorReset()
    big, _ = run(tiny(idx_root, tmp_path, experiment='big', epochs=2, min_steps=4, save_model=False))
    assert big.cfg.epochs == 2 and big.updates == 4   # enough steps already: unchanged


# ----- schedules -----
def test_memory_efficient_equals_simultaneous(idx_root, tmp_path):
    _, a = run(tiny(idx_root, tmp_path, experiment='sim', schedule='simultaneous', save_model=False))
    AcceleratorReset()
    _, b = run(tiny(idx_root, tmp_path, experiment='mem', schedule='memory_efficient', save_model=False))
    wa, wb = weights(ckpt(tmp_path, 0, 'sim')), weights(ckpt(tmp_path, 0, 'mem'))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
    # plus checkpointing inside the stages: the same parameters (norm statistics differ: a checkpointed block's
    # recompute runs its norms' forward a second time, as with any checkpointing)
    AcceleratorReset()
    tc, c = run(tiny(idx_root, tmp_path, experiment='memck', schedule='memory_efficient', grad_checkpointing=True,
                     save_model=False))
    assert tc.accelerator.unwrap_model(tc.model).backbone.grad_checkpointing
    wc = weights(ckpt(tmp_path, 0, 'memck'))
    params = [k for k in wa if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert len(params) < len(wa)
    for k in params:
        torch.testing.assert_close(wa[k], wc[k], rtol=1e-5, atol=1e-6, msg=k)
    assert a['train_loss'] == pytest.approx(c['train_loss'], rel=1e-5)


def test_sequential_trains_one_stage_at_a_time(idx_root, tmp_path):
    trainer, final = run(tiny(idx_root, tmp_path, schedule='sequential', checkpoint_hist=4, save_model=False))
    model = trainer.accelerator.unwrap_model(trainer.model)
    S = model.num_stages
    assert len(trainer.history) == S and [r['active_stage'] for r in trainer.history] == list(range(S))
    snaps = [weights(ckpt(tmp_path, e)) for e in range(S)]
    for e in range(1, S):
        for k in range(S):
            names = [f'backbone.{n}' for n in model.split.stage_param_names[k]] + \
                    [n for n in snaps[e] if n.startswith(f'heads.{k}.')]
            changed = any(not torch.equal(snaps[e][n], snaps[e - 1][n]) for n in names
                          if not n.endswith('num_batches_tracked'))
            assert changed == (k == e), (e, k)   # epoch e trains stage e only
    assert 'train_loss_stage0' in trainer.history[0] and 'train_loss_stage1' not in trainer.history[0]


def test_ema_model_is_saved_with_its_own_accuracy(idx_root, tmp_path):
    trainer, final = run(tiny(idx_root, tmp_path, epochs=1, model_ema=True, model_ema_decay=0.5))
    run_dir = tmp_path / 'run'
    live = json.loads((run_dir / 'model' / 'config.json').read_text())['hff']['metrics']
    ema = json.loads((run_dir / 'model_ema' / 'config.json').read_text())['hff']['metrics']
    assert live['top1'] == final['top1'] and ema['top1'] == final['ema_top1']
    assert ema['top1_stage0'] == final['ema_top1_stage0'] and ema['train_loss'] == final['train_loss']
    assert not any(k.startswith('ema_') for k in ema)
    ema_weights = weights(str(run_dir / 'model_ema'))
    assert any(not torch.equal(v, weights(str(run_dir / 'model'))[k]) for k, v in ema_weights.items())


# ----- resume -----
def test_resume_continues_bitwise(idx_root, tmp_path, monkeypatch):
    kw = dict(epochs=3, model_ema=True, model_ema_decay=0.9, mixup=0.2, cutmix=0.5, reprob=0.3,
              train_num_samples=24, save_model=False)
    run(tiny(idx_root, tmp_path / 'a', **kw))
    AcceleratorReset()

    original = Trainer.train_epoch

    def crash_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt('simulated crash')
        return original(self, epoch)

    monkeypatch.setattr(Trainer, 'train_epoch', crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(idx_root, tmp_path / 'b', **kw))
    monkeypatch.setattr(Trainer, 'train_epoch', original)
    assert [os.path.basename(p) for p in glob.glob(str(tmp_path / 'b' / 'run' / 'checkpoints' / '*'))] == \
        ['epoch_0000']
    AcceleratorReset()
    with pytest.raises(ValueError, match='pass --resume'):
        Trainer(tiny(idx_root, tmp_path / 'b', **kw))
    AcceleratorReset()
    trainer, _ = run(tiny(idx_root, tmp_path / 'b', resume='auto', **kw))
    assert trainer.start_epoch == 1
    wa, wb = weights(ckpt(tmp_path / 'a', 2)), weights(ckpt(tmp_path / 'b', 2))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = load_file(os.path.join(ckpt(tmp_path / 'a', 2), 'ema.safetensors'))
    eb = load_file(os.path.join(ckpt(tmp_path / 'b', 2), 'ema.safetensors'))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    ha = json.loads((tmp_path / 'a' / 'run' / 'metrics.json').read_text())['epochs']
    hb = json.loads((tmp_path / 'b' / 'run' / 'metrics.json').read_text())['epochs']
    assert [r['top1'] for r in ha] == [r['top1'] for r in hb] and len(hb) == 3
    # a checkpoint of another model is refused
    AcceleratorReset()
    with pytest.raises(ValueError, match="made with model='test_resnet'"):
        Trainer(tiny(idx_root, tmp_path / 'c', resume=ckpt(tmp_path / 'a', 2), model='test_convnext',
                     hff=dict()))


# ----- precision, baseline, outputs, safety -----
def test_bf16_on_cpu(idx_root, tmp_path):
    trainer = Trainer(tiny(idx_root, tmp_path, mixed_precision='bf16', save_model=False))
    seen, head_out = [], []
    model = trainer.accelerator.unwrap_model(trainer.model)
    conv = model.backbone.conv1[0]
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    hooks = [h.register_forward_hook(lambda m, i, o: head_out.append(o.dtype)) for h in model.heads]
    final = trainer.fit()
    handle.remove()
    for h in hooks:
        h.remove()
    assert torch.bfloat16 in seen                      # the forward really ran in bf16
    assert head_out and set(head_out) == {torch.float32}   # while the heads scored in fp32 (autocast off there)
    assert np.isfinite(final['train_loss']) and final['val_images'] == 13
    assert all(v.dtype == torch.float32 for v in weights(ckpt(tmp_path, 0)).values() if v.is_floating_point())


def test_bp_baseline_same_backbone(idx_root, tmp_path):
    trainer, final = run(tiny(idx_root, tmp_path, method='bp', experiment='bp', channels_last=True))
    assert 'top1_stage0' not in final and 0 <= final['top1'] <= 100
    bp = weights(str(tmp_path / 'bp' / 'model'))
    assert json.loads((tmp_path / 'bp' / 'model' / 'config.json').read_text())['num_classes'] == 10
    import timm_hff
    hff = timm_hff.create_model('test_resnet', num_classes=10, in_chans=1, small_input=True, check_img_size=28)
    hff_backbone = {k[len('backbone.'):]: v.shape for k, v in hff.state_dict().items() if k.startswith('backbone.')}
    bp_backbone = {k: v.shape for k, v in bp.items() if not k.startswith('fc.')}
    assert bp_backbone == hff_backbone
    bp_model = trainer.accelerator.unwrap_model(trainer.model)
    assert bp_model.conv1[0].stride == (1, 1)          # the same small-input stem adaptation as HFF


def test_ff_baseline_trains_the_same_backbone_and_scores_its_stages(idx_root, tmp_path):
    """--baseline ff: Forward-Forward at HFF's cut through the same trainer; its per-stage rows are its own
    goodness predictions, recomputed here from the saved weights."""
    trainer, final = run(tiny(idx_root, tmp_path, method='ff', experiment='ff', ff=dict(threshold=1.5),
                              test_split='test', val_split=None, val_fraction=0.5, train_num_samples=None,
                              model_ema=True))
    model = trainer.accelerator.unwrap_model(trainer.model)
    from timm_hff.baselines import FFModel, create_ff_model
    from timm_hff.baselines.ff import FFConfig
    assert isinstance(model, FFModel) and model.cfg.threshold == 1.5 and trainer.num_stages == model.num_stages > 1
    import timm_hff
    hff = timm_hff.create_model('test_resnet', num_classes=10, in_chans=2, small_input=True, check_img_size=28)
    assert {k: v.shape for k, v in model.backbone.state_dict().items()} == {
        k[len('backbone.'):]: v.shape for k, v in hff.state_dict().items() if k.startswith('backbone.')}
    rows = json.loads((tmp_path / 'ff' / 'metrics.json').read_text())
    epoch = rows['epochs'][-1]
    assert {f'train_loss_stage{k}' for k in range(model.num_stages)} <= set(epoch)
    assert np.isfinite(epoch['train_loss']) and 'ema_top1' in epoch and rows['test']['test_images'] == 13
    saved = tmp_path / 'ff' / 'model'
    cfg = json.loads((saved / 'config.json').read_text())
    assert cfg['method'] == 'ff' and cfg['ff']['threshold'] == 1.5 and cfg['metrics']['top1'] == rows['test']['top1']
    rebuilt = create_ff_model(cfg['model_name'], cfg['num_classes'], cfg['in_chans'], FFConfig(**cfg['ff']),
                              **cfg['model_kwargs'], **cfg['hff'])
    from safetensors.torch import load_model
    load_model(rebuilt, str(saved / 'model.safetensors'))
    with pytest.raises(ValueError, match='holds a Forward-Forward baseline.*create_ff_model'):
        timm_hff.create_model(f'local-dir:{saved}', pretrained=True)     # not an HFF model: said so, in one line
    from timm_hff.data import load_idx_arrays
    images, labels = load_idx_arrays(idx_root, 'test')
    x = trainer.test_loader.transform(torch.from_numpy(images[:, None].copy()))
    with torch.no_grad():
        g = rebuilt.eval().class_goodness(x)
    y = torch.from_numpy(labels.astype(np.int64))
    for k in range(model.num_stages):    # each stage's goodness alone, as the metrics row says
        assert rows['test'][f'top1_stage{k}'] == pytest.approx((g[k].argmax(1) == y).double().mean().item() * 100)
    assert rows['test']['top1'] == pytest.approx((rebuilt.scores(g).argmax(1) == y).double().mean().item() * 100)


def test_scheduler_built_without_none_settings_older_timm_multiplies(idx_root, tmp_path, monkeypatch):
    """timm 1.0.29's create_scheduler_v2 multiplies decay_epochs by the updates per epoch even for a cosine schedule,
    so passing decay_epochs=None (the setting's default) failed there with a TypeError; seen on a lent GPU machine."""
    import timm.scheduler
    real = timm.scheduler.create_scheduler_v2

    def like_timm_1_0_29(optimizer, *args, **kwargs):
        if 'decay_epochs' in kwargs and kwargs['decay_epochs'] is None:
            raise TypeError("unsupported operand type(s) for *: 'NoneType' and 'int'")
        return real(optimizer, *args, **kwargs)

    monkeypatch.setattr(timm.scheduler, 'create_scheduler_v2', like_timm_1_0_29)
    trainer = Trainer(tiny(idx_root, tmp_path, sched='cosine', epochs=2))
    assert trainer.scheduler is not None
    trainer.lock.release()
    trainer = Trainer(tiny(idx_root, tmp_path, sched='step', decay_epochs=1, experiment='step', epochs=2))
    assert trainer.scheduler.decay_t == trainer.updates_per_epoch   # a step schedule still gets its decay epochs
    trainer.lock.release()


def test_ff_resume_refuses_other_ff_settings(idx_root, tmp_path):
    """Resuming an FF run with another threshold (here: the default, by dropping --ff) would silently train another
    baseline; the scoring-only chunk_size may change."""
    run(tiny(idx_root, tmp_path, method='ff', ff=dict(threshold=4.0), experiment='ff', save_model=False))
    AcceleratorReset()
    with pytest.raises(ValueError, match="made with ff=.*'threshold': 4.0"):
        Trainer(tiny(idx_root, tmp_path, method='ff', experiment='ff', resume='auto', epochs=2))
    AcceleratorReset()
    trainer = Trainer(tiny(idx_root, tmp_path, method='ff', ff=dict(threshold=4.0, chunk_size=4096), experiment='ff',
                           resume='auto', epochs=2))
    assert trainer.start_epoch == 1
    trainer.lock.release()


@pytest.mark.parametrize('bad, match', [
    (dict(ff=dict(threshold=2.0)), "apply to method 'ff'"),
    (dict(method='ff', ff=dict(thresh=2.0)), 'unknown setting.*thresh.*threshold'),
    (dict(method='ff', ff=dict(threshold=-1)), 'ff: threshold must be a positive number'),
    (dict(method='ff', schedule='memory_efficient'), "method 'ff' trains all its stages"),
    (dict(method='ff', mixup=0.2), r"mixup makes soft labels.*method 'ff'.*--mixup 0.0"),
    (dict(method='ff', grad_checkpointing=True), r"grad_checkpointing is for HFF and BP.*--grad_checkpointing false"),
    (dict(method='ff', calibrate_exits=0.0), "calibrate_exits is for HFF exits"),
])
def test_ff_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(bad)


def test_outputs_and_saved_model(idx_root, tmp_path):
    trainer, final = run(tiny(idx_root, tmp_path, epochs=2, clip_grad=1.0))
    run_dir = tmp_path / 'run'
    rows = json.loads((run_dir / 'metrics.json').read_text())['epochs']
    assert [r['epoch'] for r in rows] == [1, 2]
    header = (run_dir / 'metrics.csv').read_text().splitlines()[0].split(',')
    S = trainer.num_stages
    assert {f'top1_stage{k}' for k in range(S)} | {'top1', 'top5', 'train_loss'} <= set(header)
    assert (run_dir / 'accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not glob.glob(str(run_dir / '**' / '*.tmp*'), recursive=True)     # nothing half-written left
    assert not (run_dir / '.lock').exists()
    import timm_hff
    loaded = timm_hff.create_model(f'local-dir:{run_dir / "model"}', pretrained=True).eval()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    cfg = json.loads((run_dir / 'model' / 'config.json').read_text())
    assert cfg['hff']['metrics']['top1'] == final['top1'] and cfg['hff']['metrics']['split'] == 'test'
    # the reported accuracies, recomputed independently from the IDX files
    from timm_hff.data import load_idx_arrays
    images, labels = load_idx_arrays(idx_root, 'test')
    mean, std = trainer.data_cfg['mean'][0], trainer.data_cfg['std'][0]
    x = (torch.tensor(images).float().unsqueeze(1) / 255 - mean) / std
    y = torch.tensor(labels)
    with torch.no_grad():
        stage_logits = loaded.forward_stages(x)
        final_logits = loaded(x)
    for k, logits in enumerate(stage_logits):
        assert final[f'top1_stage{k}'] == pytest.approx(100 * (logits.argmax(-1) == y).double().mean().item())
    assert final['top1'] == pytest.approx(100 * (final_logits.argmax(-1) == y).double().mean().item())
    ens = torch.stack([l.log_softmax(-1) for l in stage_logits]).mean(0)
    assert final['top1_ensemble'] == pytest.approx(100 * (ens.argmax(-1) == y).double().mean().item())
    top5 = (final_logits.topk(5, -1).indices == y[:, None]).any(-1).double().mean().item()
    assert final['top5'] == pytest.approx(100 * top5)


def test_labels_outside_num_classes(idx_root, tmp_path):
    with pytest.raises(ValueError, match='has 10 classes but num_classes=5'):
        Trainer(tiny(idx_root, tmp_path, num_classes=5))
    assert not (tmp_path / 'run' / '.lock').exists()   # a failed start releases the folder


def test_label_names_are_saved_with_the_model(idx_root, tmp_path):
    names = [f'kind {i}' for i in range(10)]
    run(tiny(idx_root, tmp_path, label_names=names))
    saved = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())
    assert saved['label_names'] == names
    assert 'kind 7' in (tmp_path / 'run' / 'model' / 'README.md').read_text()
    run(tiny(idx_root, tmp_path / 'default'))   # without it the IDX column's own names (digits here)
    assert json.loads((tmp_path / 'default' / 'run' / 'model' / 'config.json').read_text())['label_names'][7] == '7'
    with pytest.raises(ValueError, match='label_names lists 3 names but .* has 10 classes'):
        Trainer(tiny(idx_root, tmp_path / 'short', label_names=['a', 'b', 'c']))
    with pytest.raises(ValueError, match='label_names has a duplicate'):
        tiny(idx_root, tmp_path / 'dup', label_names=['a'] * 10)


def test_run_folder_is_locked(idx_root, tmp_path):
    os.makedirs(tmp_path / 'run')
    other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path / 'run' / '.lock').write_text(str(other.pid))
        with pytest.raises(RunInUseError, match=f'pid {other.pid}'):
            Trainer(tiny(idx_root, tmp_path))
    finally:
        other.kill()
        other.wait()
    AcceleratorReset()
    Trainer(tiny(idx_root, tmp_path)).lock.release()   # a stale lock (dead pid) is taken over


# ----- multi-process -----
DDP_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch
    from timm_hff.train import TrainConfig, Trainer

    base = json.loads(sys.argv[1])
    out = {}
    for schedule in ('simultaneous', 'sequential'):
        trainer = Trainer(TrainConfig.from_dict(dict(base, schedule=schedule, experiment=schedule)))
        final = trainer.fit()
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        digest = hashlib.sha256(b''.join(state[k].detach().cpu().numpy().tobytes() for k in sorted(state)))
        out[schedule] = dict(hash=digest.hexdigest(), val_images=final['val_images'], top1=final['top1'],
                             steps=trainer.steps_per_epoch, epochs=len(trainer.history))
    try:
        Trainer(TrainConfig.from_dict(dict(base, schedule='memory_efficient', experiment='me')))
    except ValueError as e:
        out['memory_efficient_error'] = str(e)
    rank = trainer.accelerator.process_index
    with open(os.path.join(base['output'], f'rank{rank}.json'), 'w') as f:
        json.dump(out, f)
''')


def test_two_process_cpu_ddp(idx_root, tmp_path):
    """accelerate launch, 2 CPU processes: identical weights on both ranks, every test image counted once."""
    script = tmp_path / 'ddp_run.py'
    script.write_text(DDP_SCRIPT)
    base = dict(dataset='idx', data_dir=idx_root, model='test_resnet', hff=dict(small_input=True), in_chans=1,
                img_size=28, crop_pct=1.0, train_num_samples=20, batch_size=4, validation_batch_size=4, epochs=1,
                workers=0, output=str(tmp_path), progress=False, save_model=False, seed=1)
    # `accelerate launch --cpu` starts one process unless MPI is set up; ACCELERATE_USE_CPU=1 with the torchrun
    # launcher gives real 2-process DDP over gloo on CPU
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1',
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                           str(script), json.dumps(base)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f'rank{i}.json').read_text()) for i in range(2))
    for schedule in ('simultaneous', 'sequential'):
        assert r0[schedule]['hash'] == r1[schedule]['hash'], schedule
        assert r0[schedule]['val_images'] == r1[schedule]['val_images'] == 13      # 13 images, none twice
        assert r0[schedule]['steps'] == 3   # 20 images / (4 x 2 processes), last partial batch kept
    assert r0['sequential']['epochs'] == 4
    assert 'DDP' in r0['memory_efficient_error'] and 'simultaneous' in r0['memory_efficient_error']


def test_module_entry_point():
    proc = subprocess.run([sys.executable, '-m', 'timm_hff.train', '--help'], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and '--config' in proc.stdout and '--baseline' in proc.stdout


def test_threads_setting(idx_root, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Trainer(tiny(idx_root, tmp_path, threads=1)).lock.release()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match='threads must be >= 1'):
        tiny(idx_root, tmp_path, threads=0)


def test_stage_lr_scales_each_stage(idx_root, tmp_path):
    trainer = Trainer(tiny(idx_root, tmp_path, stage_lr=[1.0, 0.5, 0.25, 2.0], weight_decay=0.1, save_model=False))
    model = trainer.accelerator.unwrap_model(trainer.model)
    scale_of = {id(p): g['lr_scale'] for g in trainer.optimizer.param_groups for p in g['params']}
    for k, factor in enumerate([1.0, 0.5, 0.25, 2.0]):
        assert {scale_of[id(p)] for p in model.stage_parameters(k)} == {factor}
    for g in trainer.optimizer.param_groups:   # timm's scheduler applies the factor to the scheduled rate
        assert g['lr'] == pytest.approx(trainer.optimizer.param_groups[0]['lr'] / trainer.optimizer.param_groups[0][
            'lr_scale'] * g['lr_scale'])
    decay = {id(p): g['weight_decay'] for g in trainer.optimizer.param_groups for p in g['params']}
    assert all(decay[id(h.prototypes)] == 0 for h in model.heads)
    assert decay[id(model.backbone.conv1[0].weight)] == 0.1 and decay[id(model.backbone.bn1.bias)] == 0
    trainer.lock.release()
    with pytest.raises(ValueError, match='stage_lr lists 2 factors but the model has 4 stages'):
        Trainer(tiny(idx_root, tmp_path / 'b', stage_lr=[1.0, 2.0]))


def test_cli_help_lists_every_setting_and_suggests_flags(capsys):
    from dataclasses import fields as dc_fields
    from timm_hff.train import method_names, schedule_names
    from timm_hff.train.help import GROUPS, setting
    # no setting without its group and help line (setting() refuses one); method's and schedule's choices are read
    # from their registries
    assert all(f.metadata.get('group') in GROUPS and f.metadata.get('help') for f in dc_fields(TrainConfig))
    with pytest.raises(ValueError, match='needs one of the groups'):
        setting(1, 'Dataset', '')
    with pytest.raises(SystemExit):
        main(['--help'])
    text = capsys.readouterr().out
    assert all(f"'{n}'" in text for n in method_names() + schedule_names())
    for f in dc_fields(TrainConfig):
        if f.name != 'resume':
            assert f'--{f.name.replace("_", "-")}' in text, f.name
    assert 'Optimizer parameters' in text and '[float, default: 0.1]' in text      # type and default of --lr
    with pytest.raises(SystemExit):
        main(['--config', 'x.yaml', '--learning-rate', '0.1'])
    assert "did you mean '--lr'?" in capsys.readouterr().err
    assert main([]) == 2
    assert "pass --config <recipe>.yaml or a shipped recipe's name (" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so(idx_root, tmp_path, capsys):
    run(tiny(idx_root, tmp_path, epochs=1))
    AcceleratorReset()
    before = (tmp_path / 'run' / 'model' / 'model.safetensors').stat().st_mtime_ns
    trainer = Trainer(tiny(idx_root, tmp_path, epochs=1, resume='auto'))
    trainer.fit()
    out = capsys.readouterr().out
    assert 'nothing left to train' in out and 'resume with --epochs N (N > 1)' in out
    assert (tmp_path / 'run' / 'model' / 'model.safetensors').stat().st_mtime_ns == before   # nothing rewritten


def test_channel_mismatch_is_said_at_set_up(idx_root, tmp_path, caplog):
    import logging
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny(idx_root, tmp_path, in_chans=3, save_model=False))
    trainer.lock.release()
    lines = [r.getMessage() for r in caplog.records if 'in_chans=3' in r.getMessage()]
    assert len(lines) == 1 and 'grayscale images' in lines[0] and "the model's default mean / std" in lines[0]
    assert 'set in_chans: 1' in lines[0] and '\n' not in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(tiny(idx_root, tmp_path / 'b', save_model=False)).lock.release()
    assert not [r for r in caplog.records if 'in_chans' in r.getMessage()]


def test_frozen_stages_refit_their_heads_on_a_new_label_set(idx_root, tmp_path):
    """Transfer to new classes with frozen early stages: the frozen backbone slices stay as they are, but their heads
    learn the new prototypes (otherwise they sit at chance and pull the stage ensemble down)."""
    import timm_hff
    from timm_hff import hub as _hub
    torch.manual_seed(0)
    src = timm_hff.create_model('test_resnet', num_classes=10, in_chans=1, small_input=True, check_img_size=28)
    path = _hub.save_pretrained(src, str(tmp_path / 'src'), card=False)
    trainer, _ = run(tiny(idx_root, tmp_path, model=f'local-dir:{path}', pretrained=True, hff={}, epochs=2,
                          reset_prototypes=True, freeze_stages=[0, 1], save_model=False))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.frozen_stages == [] and model.frozen_backbone_stages == [0, 1]
    start = timm_hff.create_model(f'local-dir:{path}', pretrained=True)
    for n in model.split.stage_param_names[0] + model.split.stage_param_names[1]:
        assert torch.equal(model.backbone.get_parameter(n), start.backbone.get_parameter(n)), n
    assert {'train_loss_stage0', 'train_loss_stage1'} <= set(trainer.history[-1])   # their heads trained
    assert all(p.requires_grad for p in model.heads[0].parameters())
    # the same freeze without a new label set keeps the whole stage (head too) as it was
    AcceleratorReset()
    trainer, _ = run(tiny(idx_root, tmp_path / 'same', model=f'local-dir:{path}', pretrained=True, hff={},
                          freeze_stages=[0, 1], save_model=False))
    assert trainer.accelerator.unwrap_model(trainer.model).frozen_stages == [0, 1]


@pytest.mark.slow
def test_torchcompile_trains_like_eager(idx_root, tmp_path):
    _, eager = run(tiny(idx_root, tmp_path / 'eager', save_model=False, model_ema=True))
    AcceleratorReset()
    trainer, compiled = run(tiny(idx_root, tmp_path / 'compiled', save_model=False, model_ema=True,
                                 torchcompile='inductor'))
    assert compiled['train_loss'] == pytest.approx(eager['train_loss'], rel=1e-4)
    assert compiled['top1'] == eager['top1']
    ema = trainer.ema.module   # the EMA copy stays eager and has its own weights (not the compiled live model's)
    assert not any('forward' in m.__dict__ for m in ema.modules())


def test_val_every_validates_every_n_epochs_and_after_the_last(idx_root, tmp_path, fresh_accelerate_state):
    from conftest import tiny
    from timm_hff.train import train
    train(tiny(idx_root, tmp_path, epochs=3, val_every=2, val_split='test', model_ema=True))
    with open(tmp_path / 'run' / 'metrics.json') as f:
        epochs = json.load(f)['epochs']
    assert [('top1' in r, 'ema_top1' in r) for r in epochs] == [(False, False), (True, True), (True, True)]
    assert all('train_loss' in r for r in epochs)


@pytest.mark.parametrize('module', ['timm_hff.train.cli', 'timm_hff.validate', 'timm_hff.predict', 'timm_hff.hub_cli',
                                    'timm_hff.seed_cli'])
def test_cli_help_and_argument_errors_import_no_heavy_library(module):
    """--help and a bad argument answer before torch, timm or datasets are imported (they take seconds)."""
    code = textwrap.dedent(f'''
        import sys
        from {module} import main
        for argv in (['--help'], ['--no-such-flag']):
            try:
                main(argv)
            except SystemExit:
                pass
        print(sorted(m for m in ('torch', 'timm', 'datasets', 'accelerate') if m in sys.modules))
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == '[]', out.stdout + out.stderr


def test_a_bad_setting_is_refused_before_any_heavy_import():
    code = ("import sys\nfrom timm_hff.train.cli import main\n"
            "rc = main(['--config', 'recipes/fashion_mnist_quick.yaml', '--lr', 'abc'])\n"
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.split() == ['2', 'False'] and 'lr must be a number' in out.stderr


def test_a_launcher_that_started_fewer_processes_is_named(monkeypatch, caplog):
    from timm_hff.train.engines.accelerate import trainer
    launched = ['/usr/bin/python3', '/usr/local/bin/accelerate', 'launch', '--cpu', '--num_processes', '2', '-m',
                'timm_hff.train', '--config', 'x.yaml']
    monkeypatch.setattr(trainer, 'launcher_cmdline', lambda: launched)
    with caplog.at_level('WARNING'):
        line = trainer.fewer_processes_warning(1)
    assert 'asked for 2 processes but 1 started' in line and line in caplog.text
    assert trainer.fewer_processes_warning(2) is None
    monkeypatch.setattr(trainer, 'launcher_cmdline', lambda: ['/usr/bin/python3', '-m', 'timm_hff.train'])
    assert trainer.fewer_processes_warning(1) is None


def test_every_run_folder_keeps_a_train_log_and_a_redirected_run_draws_no_bar(idx_root, tmp_path, capsys,
                                                                              fresh_accelerate_state):
    from conftest import tiny
    from timm_hff.train import train
    train(tiny(idx_root, tmp_path, epochs=2, progress=True, val_split='test'))   # stderr is not a terminal here
    log = (tmp_path / 'run' / 'train.log').read_text()
    assert 'HFF test_resnet' in log and 'epoch 1:' in log and 'epoch 2:' in log and 'weights:' in log
    assert 'epoch 1/2' not in capsys.readouterr().err   # the bar's description: never drawn into a log


SWEEP = '''
from timm_hff.train.registry import register_schedule
from timm_hff.train.schedules.base import Schedule


@register_schedule
class Sweep(Schedule):
    """One stage per epoch, in turn."""
    name, help = 'sweep', 'one stage per epoch, in turn'
    unused_parameters = True

    def active_stage(self, epoch, epochs, num_stages):
        return epoch % num_stages
'''


def test_a_new_schedule_is_one_file(idx_root, tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    """The file docs/architecture.md shows, imported: the setting, --help, the errors and a whole run take it."""
    from conftest import tiny
    from timm_hff.train import registry, train
    from timm_hff.train.cli import main as cli_main
    (tmp_path / 'hff_test_sweep.py').write_text(SWEEP)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import hff_test_sweep  # noqa: F401  (registers 'sweep')
        with pytest.raises(SystemExit):
            cli_main(['--help'])
        assert "'sweep' (one stage per epoch, in turn)" in ' '.join(capsys.readouterr().out.split())
        with pytest.raises(ValueError, match=r"schedule must be one of \[.*'sweep'\]"):
            tiny(idx_root, tmp_path, schedule='swep')
        train(tiny(idx_root, tmp_path, schedule='sweep', epochs=3, val_split='test'))
        rows = json.loads((tmp_path / 'run' / 'metrics.json').read_text())['epochs']
        assert [r['active_stage'] for r in rows] == [0, 1, 2]
        assert all(set(k for k in r if k.startswith('train_loss_stage')) == {f"train_loss_stage{r['active_stage']}"}
                   for r in rows)
    finally:
        registry._SCHEDULES.pop('sweep', None)
        sys.modules.pop('hff_test_sweep', None)


def test_every_augmentation_field_is_a_setting_with_the_same_default():
    """``AugConfig`` (the loaders' view) and ``TrainConfig`` (the settings) name the same augmentation fields with the
    same defaults, so ``aug_config`` reads each by name and a field added to one without the other fails here."""
    from dataclasses import fields
    from timm_hff.data import AugConfig
    settings = {f.name: f for f in fields(TrainConfig)}
    for f in fields(AugConfig):
        assert f.name in settings, f'AugConfig.{f.name} has no TrainConfig setting'
        assert settings[f.name].default == f.default, f"{f.name}: {settings[f.name].default!r} vs {f.default!r}"
    cfg = TrainConfig(hflip=0.25, scale=[0.5, 1.0], aa='rand-m9', reprob=0.1)
    aug = cfg.aug_config()
    assert (aug.hflip, aug.scale, aug.aa, aug.reprob, aug.ratio) == (0.25, (0.5, 1.0), 'rand-m9', 0.1, None)
