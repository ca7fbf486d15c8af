"""Bad inputs across the library: each must fail with its own error type and a one-line message that says what was
wrong and what to do, raised by timm_hff at its boundary (config, CLI, data and file loaders, model input), never a
traceback from deep inside torch or timm; faults during training (a NaN loss, a full disk) must keep the last good
checkpoint.

Every case is one entry of ``CASES``. ``docs/errors.md`` shows them all with the exact messages they produce:
``HFF_ERRORS_TABLE=docs/errors.md python -m pytest -q tests/test_bad_inputs.py`` rewrites its table, and every run
checks that the table still lists every case, in order, with its error type and a message the case's check accepts.
"""
import errno
import json
import os
import re
import shutil
import traceback

import pytest
import torch
from safetensors.torch import load_file

import timm_hff
from timm_hff.hub import (CheckpointFileNotFoundError, CorruptCheckpointError, FormatVersionError, ShapeMismatchError,
                          UnsafeCheckpointError)
from timm_hff import SplitError
from timm_hff.data import load_image_dataset
from timm_hff.train import Trainer
from timm_hff.train.checkpoint import RunInUseError, list_checkpoints
from timm_hff.train.cli import main

from conftest import Boom, ckpt, cli_args, reset_accelerate, resign, tiny, tiny_settings, weights
from test_data import make_idx, make_imagefolder

PACKAGE = os.path.dirname(os.path.abspath(timm_hff.__file__))
ERRORS_PAGE = os.path.join(os.path.dirname(PACKAGE), 'docs', 'errors.md')
TABLE_BEGIN = '<!-- errors table: written by tests/test_bad_inputs.py, checked by test_errors_page_lists_every_case -->'
TABLE_END = '<!-- end of errors table -->'
CASES = {}          # name -> (function(env), exception type, pattern)
MESSAGES = {}       # name -> (exception type name, message) as produced, for the table in docs/errors.md


def case(name, error, pattern):
    def register(fn):
        CASES[name] = (fn, error, pattern)
        return fn
    return register


class Env:
    """What a case may use: a scratch folder, tiny data, and one finished tiny run (checkpoint + saved model)."""

    def __init__(self, tmp, shared):
        self.tmp = tmp
        self.idx, self.run_dir, self.model_dir = shared['idx'], shared['run_dir'], shared['model_dir']

    def copy_model(self):
        d = self.tmp / 'model'
        shutil.copytree(self.model_dir, d)
        return d

    def copy_run(self):
        """(a copy of the finished tiny run, its first checkpoint) to damage."""
        run = self.tmp / 'copy'
        shutil.copytree(self.run_dir, run)
        return run, run / 'checkpoints' / 'epoch_0000'

    def edit_config(self, d, fn):
        cfg = json.loads((d / 'config.json').read_text())
        fn(cfg)
        (d / 'config.json').write_text(json.dumps(cfg))

    def cli(self, argv, capsys):
        """Run hff-train in this process; returns (exit code, stderr). Errors must be exactly one line."""
        reset_accelerate()
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc != 0, 'the CLI accepted a bad input'
        assert '\n' not in err and err.startswith('hff-train: error: '), err
        raise CliError(err[len('hff-train: error: '):], rc)


class CliError(Exception):
    """What a CLI case raises for the uniform checks: the one line hff-train printed, and its exit code."""

    def __init__(self, message, rc):
        super().__init__(message)
        self.rc = rc


def small_model(**kw):
    return timm_hff.create_model('test_resnet', num_classes=3, in_chans=1, small_input=True, check_img_size=28,
                                 **kw).eval()


# ----- model construction (HFFConfig, create_model) -----
@case('unknown backbone', ValueError, r"unknown model 'resnet_nope': not a timm architecture")
def _(env):
    timm_hff.create_model('resnet_nope', num_classes=3)


@case('backbone family that cannot be split', SplitError, r"timm family 'hrnet'.*cannot be tapped")
def _(env):
    timm_hff.create_model('hrnet_w18_small', num_classes=3, check_img_size=64)


@case('num_classes negative', ValueError, r'num_classes must be an integer >= 1 \(the class prototypes\), or 0 for a '
      r'model without heads \(a feature extractor\), got -1')
def _(env):
    timm_hff.create_model('test_resnet', num_classes=-1, check_img_size=32)


@case('feature kwargs without features_only', ValueError, r"\['out_indices'\] only apply with features_only=True")
def _(env):
    timm_hff.create_model('test_resnet', num_classes=3, check_img_size=32, out_indices=(1, 2))


@case('features_only with a hook extractor', ValueError, r"feature_cls='hook' is not supported for an HFF model: its "
      r"features come from the backbone's forward_intermediates; use feature_cls='getter' \(the default\)")
def _(env):
    timm_hff.create_model('test_resnet', check_img_size=32, features_only=True, feature_cls='hook')


@case('training a model without heads', ValueError, r'a training step \(model\(x, target\)\) needs the prototype '
      r'heads, but this model has none: it was built with num_classes=0; reset_classifier\(num_classes\) adds fresh '
      r'heads')
def _(env):
    model = timm_hff.create_model('test_resnet', num_classes=0, check_img_size=32)
    model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


@case('saving a model without heads', ValueError, r'save_pretrained writes an HFF model with its prototype heads, '
      r'but this one has none \(num_classes=0 or pruned by features_only\)')
def _(env):
    model = timm_hff.create_model('test_resnet', num_classes=0, check_img_size=32)
    timm_hff.save_pretrained(model, os.path.join(env.tmp, 'headless'))


@case('global_pool with heads', ValueError, r"global_pool='' with num_classes=3: the last stage's head reads the "
      r"backbone's pooled features \('avg' pooling\), so other pooling is only for num_classes=0 \(the heads removed\)")
def _(env):
    timm_hff.create_model('test_resnet', num_classes=3, check_img_size=32, global_pool='')


@case('prototypes_per_class 0', ValueError, r'prototypes_per_class must be an integer >= 1, got 0')
def _(env):
    timm_hff.create_model('test_resnet', num_classes=3, prototypes_per_class=0)


@case('negative margin', ValueError, r'margin must be a cosine margin in \[0, 2\), got -0.1')
def _(env):
    timm_hff.create_model('test_resnet', num_classes=3, margin=-0.1)


@case('non-positive scale', ValueError, r'scale must be a positive number \(1 / temperature\), got 0')
def _(env):
    timm_hff.create_model('test_resnet', num_classes=3, scale=0)


@case('stage index out of range', ValueError, r'stage index 9 is out of range for ResNet, which has 5 feature_info')
def _(env):
    timm_hff.create_model('test_resnet', num_classes=3, stage_indices=(1, 9), check_img_size=32)


# ----- model input -----
@case('wrong input channel count', ValueError, r'expected 1 input channels, got 3 .*in_chans=3')
def _(env):
    small_model()(torch.randn(2, 3, 28, 28))


@case('uint8 images (not normalised)', ValueError, r'expected floating-point images, got torch.uint8')
def _(env):
    small_model()(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


@case('input too small for the stem', ValueError,
      r'test_convnext cannot take a 3x3 input \(.*Kernel size.*\); it was built and checked at 32x32')
def _(env):
    model = timm_hff.create_model('test_convnext', num_classes=3, check_img_size=32).eval()
    model(torch.randn(1, 3, 3, 3))


@case('wrong size for a fixed-size ViT', ValueError,
      r"test_vit cannot take a 48x48 input \(Input height \(48\) doesn't match model \(32\)\.\); .*32x32")
def _(env):
    model = timm_hff.create_model('test_vit', num_classes=3, img_size=32, dynamic_img_size=False).eval()
    model(torch.randn(1, 3, 48, 48), torch.tensor([0]))   # a training forward: the same boundary


@case('labels outside [0, num_classes) (model input)', ValueError,
      r"target holds class 3, outside \[0, 3\) for this model's 3 classes; .*num_classes >= 4")
def _(env):
    small_model().train()(torch.randn(2, 1, 28, 28), torch.tensor([0, 3]))


@case('target batch size differs from the images', ValueError,
      r'target has shape \(3,\) but the batch needs \(2,\) \(2 images, 3 classes\)')
def _(env):
    small_model().train()(torch.randn(2, 1, 28, 28), torch.tensor([0, 1, 2]))


# ----- adaptive exit -----
@case('exit threshold outside (0, 1]', ValueError,
      r'exit_thresholds must be confidences in \(0, 1\], one per stage except the last .*got \(0.5, 1.5, 0.9\)')
def _(env):
    timm_hff.create_model('test_resnet', num_classes=3, exit_thresholds=(0.5, 1.5, 0.9))


@case('adaptive prediction without exit thresholds', ValueError,
      r"adaptive exit with exit_rule='max_prob' needs exit_thresholds .*timm_hff.calibrate_exits")
def _(env):
    small_model().set_predict_from('adaptive')


@case('exit FLOPs budget below the cost of stage 1', ValueError,
      r'flops_budget=1000 is below the cost of stage 1 alone \(.* FLOPs per image at 28 px\)')
def _(env):
    timm_hff.calibrate_exits(small_model(), [(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))], flops_budget=1000)


@case('calibrating exits on an empty loader', ValueError, r'the calibration loader yielded no images')
def _(env):
    timm_hff.calibrate_exits(small_model(), [])


@case('saved exit thresholds for another number of stages', ValueError,
      r'exit_thresholds lists 1 threshold\(s\) but this model has 4 stages, so it needs 3 .*calibrate_exits')
def _(env):
    d = env.copy_model()
    env.edit_config(d, lambda cfg: cfg['hff']['config'].update(exit_thresholds=[0.9]))
    timm_hff.create_model(f'local-dir:{d}', pretrained=True)


# ----- data -----
@case('missing data dir', FileNotFoundError, r"data_dir '.*nowhere' does not exist or is not a folder")
def _(env):
    load_image_dataset('idx', str(env.tmp / 'nowhere'), 'train')


@case('empty data split', ValueError, r'empty:test holds no images; check data_dir and the split name')
def _(env):
    make_idx(str(env.tmp / 'empty'), n_train=8, n_test=0)
    load_image_dataset('idx', str(env.tmp / 'empty'), 'test')


@case('truncated IDX file', ValueError,
      r't10k-images-idx3-ubyte is truncated or corrupt: 3820 data bytes, expected 3920')
def _(env):
    root = str(env.tmp / 'trunc')
    make_idx(root, n_train=8, n_test=5)
    path = os.path.join(root, 't10k-images-idx3-ubyte')
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:-100])
    load_image_dataset('idx', root, 'test')


@case('image column missing', ValueError, r"folder:train has no image column 'img'; columns are \['image', 'label'\]")
def _(env):
    root = make_imagefolder(str(env.tmp / 'folder'), per_class=(1, 1))
    load_image_dataset('imagefolder', root, 'train', input_key='img')


@case('labels outside [0, num_classes) (training data)', ValueError,
      r"column 'label' has 10 classes but num_classes=5: labels would fall outside \[0, 5\)")
def _(env):
    Trainer(tiny(env.idx, env.tmp, num_classes=5))


# ----- recipes and the CLI -----
@case('recipe YAML with an unknown key', CliError,
      r"recipe\.yaml: unknown setting 'learning_rate'; did you mean 'lr'\?")
def _(env, capsys):
    (env.tmp / 'recipe.yaml').write_text('model: test_resnet\nlearning_rate: 0.1\n')
    env.cli(['--config', str(env.tmp / 'recipe.yaml')], capsys)


@case('recipe YAML with a wrong type', CliError, r"batch_size must be an integer, got '64 images'")
def _(env, capsys):
    (env.tmp / 'recipe.yaml').write_text('model: test_resnet\nbatch_size: 64 images\n')
    env.cli(['--config', str(env.tmp / 'recipe.yaml')], capsys)


@case('experiment name that climbs out of the output folder', CliError,
      r"experiment '\.\./\.\./escape' must be a single folder name .*so that the run stays inside the output folder")
def _(env, capsys):
    (env.tmp / 'recipe.yaml').write_text('model: test_resnet\n')
    before = set(env.tmp.parent.parent.iterdir())
    try:
        env.cli(['--config', str(env.tmp / 'recipe.yaml'), '--output', str(env.tmp / 'out'), '--experiment',
                 '../../escape'], capsys)
    finally:   # refused before anything is written, inside or outside the output folder
        assert set(env.tmp.parent.parent.iterdir()) == before and not (env.tmp / 'out').exists()


@case('recipe that is not valid YAML', CliError,
      r"recipe\.yaml is not valid YAML: expected ',' or '\]', but got '<stream end>' at line 2, column 1")
def _(env, capsys):
    (env.tmp / 'recipe.yaml').write_text('model: [test_resnet\n')
    env.cli(['--config', str(env.tmp / 'recipe.yaml')], capsys)


@case('--resume pointing at a run of another model', CliError,
      r"--resume .*epoch_0000: the checkpoint was made with model='test_resnet' but this run has "
      r"model='test_convnext'")
def _(env, capsys):
    settings = tiny_settings(env.idx, env.tmp, model='test_convnext', hff={}, img_size=32)
    env.cli(cli_args(settings) + ['--resume', env.run_dir], capsys)


@case('cuda_graphs on a machine without a GPU', CliError,
      r'cuda_graphs: true captures the training step as CUDA graphs, but this run is on cpu: drop cuda_graphs')
def _(env, capsys):
    env.cli(cli_args(tiny_settings(env.idx, env.tmp, cuda_graphs=True)), capsys)


@case('cuda_graphs with an optimizer that has no fused step', ValueError,
      r"cuda_graphs: opt 'lamb' has no device-side \(fused\) step; use one of \['sgd', 'momentum', 'adam', 'adamw'\]")
def _(env):
    tiny(env.idx, env.tmp, cuda_graphs=True, opt='lamb')


@case('--resume pointing at a folder without checkpoints', CliError,
      r"--resume '.*model' holds no complete checkpoint \(checkpoints/epoch_NNNN with trainer_state\.json\)")
def _(env, capsys):
    env.cli(cli_args(tiny_settings(env.idx, env.tmp)) + ['--resume', env.model_dir], capsys)


@case('--resume at a checkpoint with truncated weights', CorruptCheckpointError,
      r'--resume: .*epoch_0000/model\.safetensors differs from the file trainer_state\.json recorded \(truncated, '
      r'.*resume from an earlier checkpoint')
def _(env):
    run, ckpt = env.copy_run()
    path = ckpt / 'model.safetensors'
    path.write_bytes(path.read_bytes()[:1000])
    Trainer(tiny(env.idx, env.tmp / 'out', resume=str(run)))


@case('--resume at a checkpoint whose optimizer state is a pickle that runs code', CorruptCheckpointError,
      r'--resume: .*epoch_0000/optimizer\.bin cannot be loaded without unpickling code or is damaged '
      r'\(UnpicklingError\)')
def _(env):
    run, ckpt = env.copy_run()
    marker = env.tmp / 'unpickled'
    torch.save({'state': {0: Boom(str(marker))}, 'param_groups': []}, ckpt / 'optimizer.bin')
    resign(ckpt)   # as a deliberate editor would
    try:
        Trainer(tiny(env.idx, env.tmp / 'out', resume=str(run)))
    finally:
        assert not marker.exists()


@case('--resume at a checkpoint whose trainer_state.json says epoch 10**30', CorruptCheckpointError,
      r'--resume: .*trainer_state\.json holds epoch = 10000000000\d*\.\.\. \(31 chars\), not a count from 0 to '
      r'10,000,000; the '
      r'checkpoint is damaged')
def _(env):
    run, ckpt = env.copy_run()
    path = ckpt / 'trainer_state.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), 'epoch': 10 ** 30}))
    Trainer(tiny(env.idx, env.tmp / 'out', resume=str(run)))


@case('--resume with another optimizer', CliError,
      r"--resume .*epoch_0000: the checkpoint was made with opt='sgd' but this run has opt='adamw'; resume with "
      r'opt: "sgd" or start a new experiment')
def _(env, capsys):
    env.cli(cli_args(tiny_settings(env.idx, env.tmp, opt='adamw')) + ['--resume', env.run_dir], capsys)


@case('bare --resume of a run that never ran', CliError,
      r'--resume: .*never-ran holds no checkpoint to continue .*; drop --resume to start it')
def _(env, capsys):
    env.cli(cli_args(tiny_settings(env.idx, env.tmp, experiment='never-ran')) + ['--resume'], capsys)


@case('mixed_precision fp16 on a CPU', CliError,
      r"mixed_precision 'fp16' needs a CUDA device, but this run is on the CPU, where it would change nothing")
def _(env, capsys):
    env.cli(cli_args(tiny_settings(env.idx, env.tmp, mixed_precision='fp16')), capsys)


@case('a recipe num_classes above the data\'s classes', ValueError,
      r"column 'label' has 3 classes \(a, b, c\) but num_classes=10: the model would predict classes no image has")
def _(env):
    from test_data import make_imagefolder
    data = make_imagefolder(str(env.tmp / 'folder'), classes=('a', 'b', 'c'), per_class=(4, 2), size=28, mode='L')
    Trainer(tiny(None, env.tmp, dataset='imagefolder', data_dir=data, num_classes=10, train_num_samples=None))


@case('a saved model trained on other classes (same count)', ValueError,
      r'local-dir:.* was trained on the classes \[.*\], the data has \[0, 1, 2, 3, ...\]: for a new label set set '
      r'reset_prototypes: true')
def _(env):
    d = env.copy_model()
    names = [f'class{i}' for i in range(10)]
    env.edit_config(d, lambda c: (c['hff'].update(label_names=names), c.update(label_names=names)))
    Trainer(tiny(env.idx, env.tmp, model=f'local-dir:{d}', pretrained=True, hff={}))


@case('hff-train --device', CliError, r'unrecognized arguments: --device cuda; hff-train has no --device: Accelerate')
def _(env, capsys):
    with pytest.raises(SystemExit):   # argparse's own exit: a usage line, then the one-line error
        main(cli_args(tiny_settings(env.idx, env.tmp)) + ['--device', 'cuda'])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('hff-train: error: '), err
    raise CliError(err[len('hff-train: error: '):], 2)


@case('new run into a folder that holds checkpoints', ValueError,
      r'run already holds checkpoints of a run; pass --resume to continue it')
def _(env):
    Trainer(tiny(env.idx, os.path.dirname(env.run_dir)))


# ----- saved models (config.json + model.safetensors) -----
@case('config.json from a newer format version', FormatVersionError,
      r'uses HFF format version 7, but timm_hff .* reads up to version 1; upgrade with `pip install -U timm-hff`')
def _(env):
    import timm
    d = env.copy_model()
    env.edit_config(d, lambda c: c['hff'].update(format_version=7))
    timm.create_model(f'local-dir:{d}', pretrained=True)   # through timm's own entry point


@case('truncated weights', CorruptCheckpointError, r'model\.safetensors is truncated or corrupted \(')
def _(env):
    d = env.copy_model()
    data = (d / 'model.safetensors').read_bytes()
    (d / 'model.safetensors').write_bytes(data[:len(data) // 2])
    timm_hff.create_model(f'local-dir:{d}', pretrained=True)


@case('corrupted weights', CorruptCheckpointError,
      r'model\.safetensors has sha256 [0-9a-f]{12}\.\.\., but config\.json recorded [0-9a-f]{12}\.\.\.: the file is '
      r'corrupted')
def _(env):
    d = env.copy_model()
    data = bytearray((d / 'model.safetensors').read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    (d / 'model.safetensors').write_bytes(bytes(data))
    timm_hff.create_model(f'local-dir:{d}', pretrained=True)


@case('pickle weights', UnsafeCheckpointError, r'holds only pickle weights \(pytorch_model\.bin\), which timm_hff '
                                               r'never loads')
def _(env):
    d = env.copy_model()
    state = load_file(d / 'model.safetensors')
    (d / 'model.safetensors').unlink()
    torch.save(state, d / 'pytorch_model.bin')
    timm_hff.create_model(f'local-dir:{d}', pretrained=True)


@case('local-dir at an hff-train run folder', CheckpointFileNotFoundError,
      r"config\.json not found; this looks like an hff-train run folder: load its saved model from local-dir:.*/model$")
def _(env):
    d = env.copy_model()   # <tmp>/model: the layout of a run folder (<run>/model/config.json)
    timm_hff.create_model(f'local-dir:{d.parent}', pretrained=True)


@case('weights whose shapes do not match', ShapeMismatchError,
      r"tensor 'heads\.0\.[\w.]+' is \[.*128.*\] in model\.safetensors but \[.*8.*\] for the .*embed_dim=8 of "
      r"config\.json; refused before building anything")
def _(env):
    d = env.copy_model()

    def smaller(c):
        c['hff']['config']['embed_dim'] = 8
        c['model_args']['embed_dim'] = 8
    env.edit_config(d, smaller)
    timm_hff.create_model(f'local-dir:{d}', pretrained=True)


# ----- faults during training -----
def _nan_in(trainer, stage, at_call, value=float('nan')):
    """Make stage ``stage``'s loss ``value`` at the ``at_call``-th training step (1-based, over epochs): the stage's
    loss as the training forward returns it (the heads' scoring is one fused call, so no per-head function runs)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    original, calls = model.local_losses, [0]

    def local_losses(*args, **kwargs):
        calls[0] += 1
        out = original(*args, **kwargs)
        if calls[0] == at_call:
            out.stage_losses[stage] = out.stage_losses[stage] * value
            out.loss = out.loss * value
        return out
    model.local_losses = local_losses


def _assert_complete(path, epoch):
    """A checkpoint folder that is whole: its state names its epoch and its weights load and are finite."""
    state = json.loads(open(os.path.join(path, 'trainer_state.json')).read())
    assert state['epoch'] == epoch
    assert all(torch.isfinite(v).all() for v in weights(path).values() if v.is_floating_point())


@case('NaN loss during training', FloatingPointError,
      r'stage 1 loss is nan at epoch 2, step 1 of 2; training stopped without saving and the last good checkpoint '
      r'.*epoch_0000 is kept')
def _(env):
    trainer = Trainer(tiny(env.idx, env.tmp, epochs=3, save_model=False))
    _nan_in(trainer, stage=1, at_call=3, value=float('nan'))   # 2 steps per epoch: epoch 2, step 1
    try:
        trainer.fit()
    finally:
        assert [os.path.basename(p) for p in list_checkpoints(str(env.tmp / 'run'))] == ['epoch_0000']
        assert os.listdir(env.tmp / 'run' / 'checkpoints') == ['epoch_0000']   # no temp folder either
        _assert_complete(ckpt(env.tmp, 0), 0)
        assert len(json.loads((env.tmp / 'run' / 'metrics.json').read_text())['epochs']) == 1
        assert not (env.tmp / 'run' / '.lock').exists()


@case('inf loss during training (CLI)', CliError,
      r'stage 0 loss is inf at epoch 1, step 2 of 2; training stopped without saving and no checkpoint had been '
      r'written yet: .*then start the run again')
def _(env, capsys, monkeypatch):
    from timm_hff import HFFModel
    original, calls = HFFModel.local_losses, [0]

    def local_losses(self, *args, **kwargs):   # every stage goes inf at step 2: the first stage is named
        calls[0] += 1
        out = original(self, *args, **kwargs)
        if calls[0] > 1:
            out.stage_losses = [s * float('inf') for s in out.stage_losses]
            out.loss = out.loss * float('inf')
        return out
    monkeypatch.setattr(HFFModel, 'local_losses', local_losses)
    try:
        env.cli(cli_args(tiny_settings(env.idx, env.tmp, save_model=False, epochs=2)), capsys)
    except CliError as e:
        assert e.rc == 1 and not list_checkpoints(str(env.tmp / 'run'))
        raise


@case('disk full while writing a checkpoint', OSError,
      r'\[Errno 28\] cannot write checkpoint .*epoch_0001 \(No space left on device\); the last good checkpoint '
      r'.*epoch_0000 is kept: free disk space or fix permissions, then continue with --resume')
def _(env, monkeypatch):
    import accelerate.utils.other as acc_other
    real = acc_other.safe_save_file

    def disk_full(tensors, filename, metadata=None):
        if 'epoch_0001' not in str(filename):
            return real(tensors, filename, metadata=metadata)
        with open(filename, 'wb') as f:   # half a file, then the device is full
            f.write(b'\0' * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(acc_other, 'safe_save_file', disk_full)
    try:
        Trainer(tiny(env.idx, env.tmp, epochs=2, save_model=False)).fit()
    finally:
        monkeypatch.setattr(acc_other, 'safe_save_file', real)
        assert os.listdir(env.tmp / 'run' / 'checkpoints') == ['epoch_0000']
        _assert_complete(ckpt(env.tmp, 0), 0)
        reset_accelerate()   # nothing lost: the run continues from the kept checkpoint once there is space
        trainer = Trainer(tiny(env.idx, env.tmp, epochs=2, save_model=False, resume='auto'))
        assert trainer.start_epoch == 1
        trainer.fit()
        _assert_complete(ckpt(env.tmp, 1), 1)


@case('read-only output folder', PermissionError,
      r'\[Errno 13\] cannot write to the output folder .*run \(Permission denied\); choose a writable --output')
def _(env, monkeypatch):
    out = str(env.tmp / 'run')
    os.makedirs(out)
    real_open = os.open

    def read_only(path, *args, **kwargs):   # what a read-only mount does (chmod does not stop root)
        if str(path).startswith(out):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, 'open', read_only)
    Trainer(tiny(env.idx, env.tmp))


@case('two runs writing into the same output folder', RunInUseError,
      r'run is in use by another training run in this process; let it finish, or release it')
def _(env):
    first = Trainer(tiny(env.idx, env.tmp))
    try:
        reset_accelerate()
        Trainer(tiny(env.idx, env.tmp))
    finally:
        first.lock.release()


# ----- the suite -----
@pytest.fixture(scope='module')
def shared(tmp_path_factory, idx_root):
    """One finished tiny run: a checkpoint of test_resnet and its saved model folder."""
    out = tmp_path_factory.mktemp('finished')
    reset_accelerate()
    Trainer(tiny(idx_root, out)).fit()
    reset_accelerate()
    return dict(idx=idx_root, run_dir=str(out / 'run'), model_dir=str(out / 'run' / 'model'))


@pytest.fixture(scope='module', autouse=True)
def errors_table():
    yield
    path = os.environ.get('HFF_ERRORS_TABLE')
    if path and MESSAGES:
        if len(MESSAGES) != len(CASES):
            raise RuntimeError(f'HFF_ERRORS_TABLE: {len(MESSAGES)} of {len(CASES)} cases passed; {path} not written')
        rows = ['| Bad input | Error | Message |', '|---|---|---|']
        rows += [f'| {name} | `{kind}` | {msg} |' for name, (kind, msg) in MESSAGES.items()]
        table = (f'{TABLE_BEGIN}\n**{len(MESSAGES)} distinct bad inputs**, each raised by timm_hff (`<tmp>`, `<run>`, '
                 f'`<data>` are test folders):\n\n' + '\n'.join(rows) + f'\n{TABLE_END}')
        text = open(path, encoding='utf-8').read() if os.path.exists(path) else ''
        if TABLE_BEGIN in text and TABLE_END in text:   # replace the table, keep the page around it
            text = text[:text.index(TABLE_BEGIN)] + table + text[text.index(TABLE_END) + len(TABLE_END):]
        else:
            text = table + '\n'
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)


def _errors_page_rows():
    """(bad input, error, message) of each row of the table in docs/errors.md; the count line's number."""
    with open(ERRORS_PAGE, encoding='utf-8') as f:
        text = f.read()
    assert TABLE_BEGIN in text and TABLE_END in text, f'{ERRORS_PAGE} lost its table markers'
    block = text[text.index(TABLE_BEGIN):text.index(TABLE_END)]
    count = re.search(r'\*\*(\d+) distinct bad inputs\*\*', block)
    rows = [[c.strip() for c in re.split(r'(?<!\\)\|', line)[1:-1]] for line in block.splitlines()
            if line.startswith('| ') and not line.startswith('| Bad input |')]
    return rows, int(count.group(1)) if count else None


def test_errors_page_lists_every_case():
    """docs/errors.md shows every case, in order, with its error type and a message that its check accepts."""
    rows, count = _errors_page_rows()
    assert [r[0] for r in rows] == list(CASES), (
        'docs/errors.md is out of date; regenerate it: HFF_ERRORS_TABLE=docs/errors.md python -m pytest -q '
        'tests/test_bad_inputs.py')
    assert count == len(CASES), f'docs/errors.md says {count} distinct bad inputs, there are {len(CASES)}'
    folders = {'<tmp>': '/tmp/case', '<run>': '/tmp/finished/run', '<data>': '/tmp/data/idx'}   # as in test_bad_input
    for name, kind, message in rows:
        _, error, pattern = CASES[name]
        message = re.sub('|'.join(folders), lambda m: folders[m.group(0)], message)
        want = r'`hff-train \(exit \d+\)`' if error is CliError else f'`{error.__name__}`'
        assert re.fullmatch(want, kind), f'{name}: docs/errors.md says {kind}, the case raises {want}'
        assert re.search(pattern, message.replace('\\|', '|')), f'{name}: docs/errors.md shows {message!r}'


def _raised_by_timm_hff(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE + os.sep)


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input(name, shared, tmp_path, capsys, monkeypatch, fresh_accelerate_state):
    fn, error, pattern = CASES[name]
    env = Env(tmp_path, shared)
    extra = dict(capsys=capsys, monkeypatch=monkeypatch)
    kwargs = {k: v for k, v in extra.items() if k in fn.__code__.co_varnames[:fn.__code__.co_argcount]}
    with pytest.raises(error) as info:
        fn(env, **kwargs)
    message = str(info.value)
    assert type(info.value) is error, f'{type(info.value).__name__}: {message}'   # the precise type, not a parent
    assert re.search(pattern, message), message
    assert message and '\n' not in message, message
    if error is not CliError:   # raised by timm_hff at its boundary, not leaked from torch / timm internals
        assert _raised_by_timm_hff(info.value), ''.join(traceback.format_tb(info.value.__traceback__)[-1:])
    shown = message.replace(str(tmp_path), '<tmp>').replace(shared['run_dir'], '<run>')
    shown = shown.replace(shared['idx'], '<data>').replace('|', '\\|')
    MESSAGES[name] = ('hff-train (exit %d)' % info.value.rc if error is CliError else type(info.value).__name__,
                      shown)


def test_enough_distinct_cases():
    assert len(CASES) >= 20
