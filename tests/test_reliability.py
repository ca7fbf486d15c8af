"""Nothing is lost when a run dies, and several processes train one model.

- Kill and resume: a real ``hff-train`` process is SIGKILLed in the middle of an epoch, resumed, SIGKILLed again
  half-way through writing a checkpoint, and resumed to the end; its weights and metrics must equal an
  uninterrupted run's bit for bit (CPU), and at every moment each checkpoint folder on disk is whole.
- Distributed: ``accelerate launch`` with two CPU processes (gloo) through the two loader paths that
  ``tests/test_train.py``'s DDP test does not take (per-sample decoding, and a stream sharded per process), under
  both schedules, and a NaN that appears on one process only: both processes must stop together, with the same
  message, instead of one of them hanging in the next collective.

The worker scripts only add pause points and fault injection around the real CLI / Trainer.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from timm_hff.train import TrainConfig, Trainer
from timm_hff.train.checkpoint import CKPT_DIR, RunInUseError, list_checkpoints

from conftest import REPO, ckpt, cli_args, tiny_settings, weights
from test_data import make_imagefolder

pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')

WORKER = textwrap.dedent('''
    """hff-train with one pause point (HFF_TEST_PAUSE, JSON): it writes a marker file and waits to be killed."""
    import json, os, sys, time

    from timm_hff.train import cli
    from timm_hff.train.engines.accelerate import steps, trainer

    pause = json.loads(os.environ.get('HFF_TEST_PAUSE', 'null'))

    def hold():
        with open(pause['marker'], 'w') as f:
            f.write(str(os.getpid()))
        time.sleep(600)

    if pause and pause['at'] == 'step':   # mid-epoch: after `step` updates of epoch `epoch` (0-based)
        real_train_epoch, real_take, now = trainer.Trainer.train_epoch, steps.take, {}

        def train_epoch(self, epoch):
            now['epoch'] = epoch
            return real_train_epoch(self, epoch)

        def take(iterable, n, restart=False):
            for i, batch in enumerate(real_take(iterable, n, restart)):
                if now['epoch'] == pause['epoch'] and i == pause['step']:
                    hold()
                yield batch
        trainer.Trainer.train_epoch, steps.take = train_epoch, take

    if pause and pause['at'] == 'write':   # half-way through the weights file of epoch `epoch`'s checkpoint
        import accelerate.utils.other as other
        real_save = other.safe_save_file

        def save_half(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if 'epoch_%04d' % pause['epoch'] in str(filename):
                with open(filename, 'rb') as f:
                    data = f.read()
                with open(filename, 'wb') as f:
                    f.write(data[:len(data) // 2])
                hold()
        other.safe_save_file = save_half

    sys.exit(cli.main(sys.argv[1:]))
''')

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))


def start(script, argv, log, pause=None):
    env = dict(ENV, HFF_TEST_PAUSE=json.dumps(pause))
    with open(log, 'w') as out:
        return subprocess.Popen([sys.executable, str(script)] + argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(marker, proc, log, timeout=300):
    """Until the worker reaches its pause point; a worker that exits first fails the test with its log."""
    deadline = time.time() + timeout
    while not os.path.exists(marker):
        if proc.poll() is not None:
            pytest.fail(f'worker exited with {proc.returncode} before its pause point:\n{open(log).read()[-3000:]}')
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f'worker never reached its pause point:\n{open(log).read()[-3000:]}')
        time.sleep(0.05)


def sigkill(proc):
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def assert_whole(run_dir, epochs):
    """Exactly these checkpoints are listed, and each is complete: state, loadable weights, optimizer, RNG."""
    listed = list_checkpoints(str(run_dir))
    assert [os.path.basename(p) for p in listed] == [f'epoch_{e:04d}' for e in epochs]
    for path, epoch in zip(listed, epochs):
        state = json.loads(open(os.path.join(path, 'trainer_state.json')).read())
        assert state['epoch'] == epoch and len(state['history']) == epoch + 1
        w = weights(path)
        assert w and all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
        assert {'optimizer.bin', 'random_states_0.pkl'} <= set(os.listdir(path))


def test_sigkill_mid_epoch_and_mid_checkpoint_then_resume_is_bitwise(idx_root, tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    settings = tiny_settings(idx_root, tmp_path / 'killed', epochs=3, save_model=False, checkpoint_hist=2,
                             reprob=0.5)   # random erasing too: the RNG state must survive the kill
    run_dir = tmp_path / 'killed' / 'run'

    # 1. SIGKILL in the middle of epoch 2 (one of its two updates done, not saved anywhere)
    marker = tmp_path / 'paused-1'
    proc = start(script, cli_args(settings), tmp_path / 'log-1', dict(at='step', epoch=1, step=1, marker=str(marker)))
    wait_for(marker, proc, tmp_path / 'log-1')
    assert_whole(run_dir, [0])
    with pytest.raises(RunInUseError, match=f'in use by another training run \\(pid {proc.pid}\\)'):
        Trainer(TrainConfig.from_dict(dict(settings, resume='auto')))   # a second run into a live run's folder
    sigkill(proc)
    assert_whole(run_dir, [0])

    # 2. resume; SIGKILL half-way through writing the weights of epoch 3's checkpoint
    marker = tmp_path / 'paused-2'
    proc = start(script, cli_args(settings) + ['--resume'], tmp_path / 'log-2',
                 dict(at='write', epoch=2, marker=str(marker)))
    wait_for(marker, proc, tmp_path / 'log-2')
    sigkill(proc)
    half = run_dir / CKPT_DIR / '.tmp-epoch_0002' / 'model.safetensors'
    with pytest.raises(Exception):
        load_file(half)   # really a half-written file: it lies in the temp folder, never in a checkpoint
    assert_whole(run_dir, [0, 1])

    # 3. resume to the end
    done = subprocess.run([sys.executable, str(script)] + cli_args(settings) + ['--resume'], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert 'resumed from' in done.stdout and 'epoch_0001' in done.stdout
    assert_whole(run_dir, [1, 2])
    assert sorted(os.listdir(run_dir / CKPT_DIR)) == ['epoch_0001', 'epoch_0002']   # the temp folder is gone
    assert not (run_dir / '.lock').exists()

    # an uninterrupted run with the same seed, single-threaded like the workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(TrainConfig.from_dict(dict(settings, output=str(tmp_path / 'ref')))).fit()
    finally:
        torch.set_num_threads(threads)
    ref, got = weights(ckpt(tmp_path / 'ref', 2)), weights(ckpt(tmp_path / 'killed', 2))
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], got[k])][:5]
    rows = [json.loads((d / 'run' / 'metrics.json').read_text())['epochs']
            for d in (tmp_path / 'ref', tmp_path / 'killed')]
    assert [(r['train_loss'], r['top1']) for r in rows[0]] == [(r['train_loss'], r['top1']) for r in rows[1]]


# ----- two processes -----
DDP_WORKER = textwrap.dedent('''
    import hashlib, json, os, sys
    from timm_hff.train import TrainConfig, Trainer

    base = json.loads(sys.argv[1])
    runs = json.loads(sys.argv[2])
    out = {}

    def digest(trainer):
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        return hashlib.sha256(b''.join(state[k].detach().cpu().numpy().tobytes() for k in sorted(state))).hexdigest()

    for name, over in runs.items():
        trainer = Trainer(TrainConfig.from_dict(dict(base, experiment=name, **over)))
        rank = trainer.accelerator.process_index
        if name == 'nan':   # a NaN on process 1 only, at its second step of epoch 2
            model = trainer.accelerator.unwrap_model(trainer.model)
            real, calls = model.local_losses, [0]

            def local_losses(*args, **kwargs):   # stage 1's loss as the training forward returns it
                calls[0] += 1
                out = real(*args, **kwargs)
                if rank == 1 and calls[0] == trainer.steps_per_epoch + 2:
                    out.stage_losses[1] = out.stage_losses[1] * float('nan')
                    out.loss = out.loss * float('nan')
                return out
            model.local_losses = local_losses
        try:
            final = trainer.fit()
        except FloatingPointError as e:
            out[name] = dict(error=str(e))
            continue
        out[name] = dict(hash=digest(trainer), final=final, epochs=len(trainer.history),
                         val_kind=trainer.val_loader.kind, val_sharded=trainer.val_loader.sharded,
                         steps=trainer.steps_per_epoch, data_cfg={k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in trainer.data_cfg.items()})
    with open(os.path.join(base['output'], 'rank%d.json' % rank), 'w') as f:
        json.dump(out, f)
''')


def test_two_processes_per_sample_and_stream_loaders_and_a_nan_on_one_process(tmp_path):
    """2 CPU processes: both hold the same weights, every test image counts once, a NaN stops both."""
    from timm_hff.data import create_image_loader, load_image_dataset
    import timm_hff

    root = make_imagefolder(str(tmp_path / 'folder'), per_class=(4, 3), size=20)   # 12 train / 9 test images
    base = dict(dataset='imagefolder', data_dir=root, model='test_resnet', hff=dict(small_input=True, num_stages=2),
                img_size=32, crop_pct=1.0, batch_size=2, validation_batch_size=2, epochs=1, workers=0, lr=0.05,
                output=str(tmp_path), progress=False, save_model=False, seed=5)
    runs = {
        'samples': dict(schedule='simultaneous'),                                     # decoded per sample
        'stream': dict(schedule='sequential', streaming=True, train_num_samples=8, save_model=True),
        'nan': dict(schedule='simultaneous', epochs=2),
    }
    script = tmp_path / 'ddp_worker.py'
    script.write_text(DDP_WORKER)
    env = dict(ENV, ACCELERATE_USE_CPU='1')   # torchrun launcher, gloo on CPU (see tests/test_train.py)
    proc = subprocess.run([sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', str(script),
                           json.dumps(base), json.dumps(runs)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f'rank{i}.json').read_text()) for i in range(2))

    assert (r0['samples']['val_kind'], r0['samples']['val_sharded']) == ('samples', False)
    assert (r0['stream']['val_kind'], r0['stream']['val_sharded']) == ('stream', True)
    assert r0['samples']['steps'] == 3 and r0['stream']['steps'] == 2   # 12 / (2 x 2) rounded up; 8 / (2 x 2)
    assert r0['stream']['epochs'] == 2                                 # sequential: one epoch per stage
    for name in ('samples', 'stream'):
        assert r0[name]['hash'] == r1[name]['hash'], name                # the same weights on both processes
        assert r0[name]['final'] == {**r1[name]['final'], **{k: v for k, v in r0[name]['final'].items()
                                                             if k.endswith(('_time_s', '_img_per_s'))}}
        assert r0[name]['final']['val_images'] == 9, name                # 9 images, none twice, none dropped

    # the stream run's reported accuracies, recomputed in this process from its saved weights, image by image
    model = timm_hff.create_model(f'local-dir:{tmp_path / "stream" / "model"}', pretrained=True).eval()
    val = load_image_dataset('imagefolder', root, 'test')
    loader = create_image_loader(val, r0['stream']['data_cfg'], False, 4, workers=0)
    correct, stage_correct, n = 0, torch.zeros(2), 0
    with torch.no_grad():
        for x, y in loader.loader:
            x = loader.transform(x)
            correct += (model(x).argmax(-1) == y).sum().item()
            stage_correct += torch.stack([(s.argmax(-1) == y).sum() for s in model.forward_stages(x)])
            n += len(y)
    final = r0['stream']['final']
    assert n == 9 and final['top1'] == pytest.approx(100 * correct / n)
    assert [final[f'top1_stage{k}'] for k in range(2)] == pytest.approx((100 * stage_correct / n).tolist())

    # a NaN on process 1 only: both processes stop at the same point with the same message
    assert r0['nan'] == r1['nan'] and set(r0['nan']) == {'error'}
    assert 'stage 1 loss is nan at epoch 2, step 2 of 3 on process 1' in r0['nan']['error']
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / 'nan'))] == ['epoch_0000']
    assert not (tmp_path / 'nan' / '.lock').exists()
