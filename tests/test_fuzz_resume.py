"""Checkpoint folders, fuzzed as model folders are: ``--resume`` of a folder that came from elsewhere.

For both engines a real run writes two epoch checkpoints; each case copies one and damages it in one way drawn by
``hypothesis``: a file truncated, bytes flipped, a file swapped with the other epoch's (or the other stage's), a file
replaced by a pickle whose unpickling would create a marker file, a tensor of another shape, ``trainer_state.json``
or a state file's JSON mutated (junk of other types, huge or negative numbers, keys dropped or added). Most damaged
cases also re-sign the checkpoint (its recorded sha256s updated, as someone editing it on purpose would) so the checks
behind the checksums are reached too.

Resume is then run as ``--resume`` runs it: ``read_state``, ``check_compatible``, ``check_files`` and the engine's own
``_load``. Each case must end in success or one documented one-line error, within ``CASE_SECONDS`` and
``CASE_MIB`` of new memory, without writing anywhere (the audit hook of ``test_fuzz``), with the marker never created
and the checkpoint folder byte for byte as it was. ``HFF_FUZZ_EXAMPLES=N`` runs N cases per engine and
``HFF_FUZZ_REPORT=<file.json>`` writes the figures ``docs/errors.md`` quotes (``benchmarks/results/fuzz/``).
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from timm_hff.train import TrainConfig, Trainer
from timm_hff.train.checkpoint import FILES_KEY, STATE_FILE, check_compatible, check_files, read_state
from timm_hff.train.optim import build_optimizer, build_scheduler
from timm_hff.train.registry import get_method, get_schedule
from timm_hff.train.engines.stage_parallel.state import StageEma, load_checkpoint, stage_dir

from conftest import Boom, cli_args, reset_accelerate, resign, tiny, tiny_settings
from test_fuzz import N, STATS, case, folder, mutate, outcome_of, report  # noqa: F401 (report: the fixture)
import test_fuzz

CASES = N or 60
CASE_MIB = 256
KINDS = ('truncate', 'flip', 'swap', 'pickle', 'shape', 'json', 'tree')
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob('*')):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def damage(data, ckpt: Path, other: Path, marker: str) -> str:
    """Damage ``ckpt`` in one drawn way (``other``: the other epoch's checkpoint); returns the kind."""
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob('*') if p.is_file())
    kind = data.draw(st.sampled_from(KINDS), label='kind')
    name = data.draw(st.sampled_from(files), label='file')
    path = ckpt / name
    raw = path.read_bytes()
    if kind == 'truncate':
        path.write_bytes(raw[:data.draw(st.integers(0, max(0, len(raw) - 1)), label='keep')])
    elif kind == 'flip':
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8), label='flips')):
            i = data.draw(st.integers(0, len(b) - 1), label='at')
            b[i] ^= data.draw(st.integers(1, 255), label='xor')
        path.write_bytes(bytes(b))
    elif kind == 'swap':
        stages = sorted(p.name for p in ckpt.glob('stage_*'))
        pool = [other / name] + [ckpt / s / Path(name).name for s in stages if s != Path(name).parent.name]
        source = data.draw(st.sampled_from([p for p in pool if p.is_file()] or [other / STATE_FILE]), label='from')
        shutil.copyfile(source, path)
    elif kind == 'pickle':
        payload = {'state': {0: Boom(marker)}, 'param_groups': []}
        if data.draw(st.booleans(), label='zip'):
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=data.draw(st.integers(2, 5), label='protocol')))
    elif kind == 'shape':
        tensor_files = [p for p in sorted(ckpt.rglob('*.safetensors')) if load_file(str(p))]
        path = data.draw(st.sampled_from(tensor_files), label='tensor file')
        _reshape(data, path)
    elif kind == 'json':
        path = ckpt / STATE_FILE
        state = json.loads(path.read_text())
        path.write_text(json.dumps(mutate(data, state, hot=(('epoch',), ('updates',), ('history',), (FILES_KEY,)))))
    else:   # tree: the JSON inside a stage-parallel state file, or a value of an Accelerate torch.save file
        _mutate_state(data, ckpt)
    if kind != 'pickle' and data.draw(st.integers(0, 9), label='resign') < 7:
        resign(ckpt)
    return kind


def _reshape(data, path: Path) -> None:
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = data.draw(st.sampled_from(sorted(tensors)), label='tensor')
    t = tensors[key]
    how = data.draw(st.sampled_from(['transpose', 'grow', 'shrink', 'extra_dim', 'scalar', 'dtype', 'nan']),
                    label='how')
    if how == 'transpose' and t.dim() >= 2 and t.shape[0] != t.shape[1]:
        t = t.transpose(0, 1).contiguous()
    elif how in ('grow', 'transpose'):
        t = torch.cat([t.reshape(-1), t.reshape(-1)]) if t.numel() else torch.zeros(3)
    elif how == 'shrink':
        t = t.reshape(-1)[: max(0, t.numel() // 2)].contiguous()
    elif how == 'extra_dim':
        t = t.unsqueeze(0).repeat(2, *([1] * t.dim())).contiguous()
    elif how == 'scalar':
        t = torch.tensor(7.0)
    elif how == 'dtype':
        t = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
    elif t.is_floating_point() and t.numel():
        t = t.clone()
        t.reshape(-1)[0] = float('nan')
    tensors[key] = t
    save_file(tensors, str(path), metadata=meta)


def _mutate_state(data, ckpt: Path) -> None:
    states = [p for p in ckpt.rglob('*.safetensors') if _meta(p)]
    if states:   # stage-parallel: safetensors files with their JSON tree in the metadata
        path = data.draw(st.sampled_from(states), label='state file')
        meta = _meta(path)
        tree = mutate(data, {'tree': json.loads(meta['timm_hff_state'])}, hot=(('tree',),))
        save_file(load_file(str(path)), str(path), metadata={**meta, 'timm_hff_state': json.dumps(tree.get('tree'))})
        return
    path = data.draw(st.sampled_from(sorted(ckpt.glob('*.bin')) + sorted(ckpt.glob('*.pkl'))), label='torch file')
    obj = torch.load(path, weights_only=False)   # the test's own file, written by this run
    junk = data.draw(st.sampled_from(test_fuzz.HUGE + [None, 'x', 1e300, float('nan'), [1, 2], {'a': 1}]),
                     label='junk')
    if isinstance(obj, dict) and obj:
        key = data.draw(st.sampled_from(sorted(obj, key=str)), label='key')
        if key == 'param_groups' and obj[key]:
            group = obj[key][0]
            group[data.draw(st.sampled_from(sorted(group)), label='group key')] = junk
        elif key == 'state' and obj[key]:
            entry = obj[key][sorted(obj[key])[0]]
            entry[data.draw(st.sampled_from(sorted(entry)), label='state key')] = junk
        else:
            obj[key] = junk
    torch.save(obj, path)


def _meta(path: Path):
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    return meta if 'timm_hff_state' in meta else None


def run_case(data, target, good: Path, resume, tmp_path):
    with folder(tmp_path) as root:
        epochs = sorted(p.name for p in good.iterdir())
        pick = data.draw(st.sampled_from(epochs), label='epoch')
        ckpt = root / pick
        shutil.copytree(good / pick, ckpt)
        other = good / next(e for e in epochs if e != pick)
        marker = str(tmp_path.parent / f'side-effect-{target}')
        kind = damage(data, ckpt, other, marker)
        before = tree_hash(ckpt)
        with case(f'{target}:{kind}', root) as outcome:
            outcome_of(lambda: resume(str(ckpt)), outcome)
        assert not os.path.exists(marker), f'{target}: unpickling ran (the marker {marker} exists)'
        assert tree_hash(ckpt) == before, f'{target}: resume changed the checkpoint folder'
        stats = STATS[f'{target}:{kind}']
        assert stats['max_case_mib'] <= CASE_MIB, f'{target}:{kind}: a case took {stats["max_case_mib"]:.0f} MiB'


# ----- the Accelerate engine -----
@pytest.fixture(scope='module')
def accelerate_run(idx_root, tmp_path_factory):
    """(two checkpoints of a real run, a Trainer of the same settings to resume into)."""
    out = tmp_path_factory.mktemp('acc')
    kw = dict(epochs=2, checkpoint_hist=2, model_ema=True, opt='adamw', save_model=False, threads=1)
    reset_accelerate()
    trainer = Trainer(tiny(idx_root, out / 'good', **kw))
    trainer.fit()
    reset_accelerate()
    host = Trainer(tiny(idx_root, out / 'host', **kw))
    return out / 'good' / 'run' / 'checkpoints', host


@given(data=st.data())
@settings(max_examples=CASES, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz_resume_accelerate(accelerate_run, tmp_path_factory, data):
    good, host = accelerate_run

    def resume(ckpt):
        state = read_state(ckpt)
        check_compatible(state, host.identity, ckpt)
        check_files(ckpt, state)
        host._load(ckpt)

    run_case(data, 'resume_accelerate', good, resume, tmp_path_factory.mktemp('case'))


# ----- the stage-parallel engine -----
class _Ctl:
    def all_gather(self, value, what):
        return [value]


class _Stage:
    """One stage process's resume (``state.load_checkpoint``) without its process group: what ``--resume`` runs on each
    rank, over that rank's model, optimizer, scheduler and EMA."""
    ctl, is_main, scaler = _Ctl(), True, None

    def __init__(self, cfg: TrainConfig, k: int, keys, num_classes: int, updates_per_epoch: int):
        method, schedule = get_method(cfg.method), get_schedule(cfg.schedule)
        self.k, self.cfg, self.keys = k, cfg, keys
        model = method.build_model(cfg, num_classes)
        owned = {id(p) for p in model.stage_parameters(k)}
        for p in model.parameters():
            p.requires_grad_(id(p) in owned)
        self.model = model
        self.ema = StageEma(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        if self.ema is not None:
            self.ema.keys = keys
        self.optimizer = build_optimizer(cfg, model, method.head_parameter_names(model))
        self.scheduler = build_scheduler(cfg, self.optimizer, updates_per_epoch,
                                         *schedule.lr_cycles(cfg.epochs, model.num_stages))

    def print(self, text):
        pass


@pytest.fixture(scope='module')
def stage_parallel_run(idx_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('sp')
    settings = tiny_settings(idx_root, out, hff=dict(small_input=True, num_stages=2), train_num_samples=16,
                             batch_size=4, epochs=2, threads=1, schedule='stage_parallel', stage_parallel_timeout=120,
                             checkpoint_hist=2, model_ema=True, opt='adamw', save_model=False)
    done = subprocess.run([sys.executable, '-m', 'timm_hff.train'] + cli_args(settings), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    good = out / 'run' / 'checkpoints'
    cfg = TrainConfig.from_dict(settings)
    last = sorted(good.iterdir())[-1]
    stages = [_Stage(cfg, k, sorted(load_file(str(stage_dir(str(last), k)) + '/model.safetensors')), 10, 4)
              for k in range(2)]
    identity = json.loads((last / STATE_FILE).read_text())['identity']
    return good, stages, identity


@pytest.mark.slow
@given(data=st.data())
@settings(max_examples=CASES, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz_resume_stage_parallel(stage_parallel_run, tmp_path_factory, data):
    good, stages, identity = stage_parallel_run

    def resume(ckpt):
        state = read_state(ckpt)
        check_compatible(state, identity, ckpt)
        check_files(ckpt, state)
        for stage in stages:   # rank by rank, as each process loads its own part
            load_checkpoint(stage, ckpt)

    run_case(data, 'resume_stage_parallel', good, resume, tmp_path_factory.mktemp('case'))


def test_an_undamaged_checkpoint_resumes_in_both_harnesses(accelerate_run):
    """The harness can succeed: an untouched copy loads (so the fuzz's refusals are the damage's, not the set-up's)."""
    good, host = accelerate_run
    ckpt = str(sorted(good.iterdir())[-1])
    state = read_state(ckpt)
    check_compatible(state, host.identity, ckpt)
    check_files(ckpt, state)
    host._load(ckpt)
    assert host.start_epoch == 2


def test_a_checkpoint_written_before_the_checksums_still_resumes(accelerate_run, tmp_path):
    """timm_hff 0.1's Accelerate checkpoints have no sha256 record: they resume, each file still checked as read."""
    good, host = accelerate_run
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(sorted(good.iterdir())[-1], ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text())
    del state[FILES_KEY]
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    check_files(str(ckpt), read_state(str(ckpt)))
    host._load(str(ckpt))
    assert host.start_epoch == 2
    (ckpt / 'model.safetensors').write_bytes((ckpt / 'model.safetensors').read_bytes()[:-100])   # still checked
    with pytest.raises(Exception, match=r'model\.safetensors is truncated or corrupted'):
        host._load(str(ckpt))


def test_a_pickle_in_an_accelerate_checkpoint_never_runs(accelerate_run, tmp_path):
    good, host = accelerate_run
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(sorted(good.iterdir())[-1], ckpt)
    marker = tmp_path / 'ran'
    torch.save({'state': {0: Boom(str(marker))}, 'param_groups': []}, ckpt / 'optimizer.bin')
    resign(ckpt)
    with pytest.raises(Exception, match=r'optimizer\.bin cannot be loaded without unpickling code'):
        host._load(str(ckpt))
    assert not marker.exists()


@pytest.mark.parametrize('damage_kind', ['pickle', 'swap', 'epoch'])
def test_hff_train_refuses_a_damaged_resume_in_one_line_and_leaves_the_run_folder(idx_root, tmp_path, capsys,
                                                                                  damage_kind):
    """The whole CLI path: ``hff-train ... --resume`` on the damaged run's own folder exits with one line naming the
    file, and the run folder (checkpoints, config, logs) is byte for byte as it was."""
    from timm_hff.train.cli import main
    settings = tiny_settings(idx_root, tmp_path, epochs=2, checkpoint_hist=2, threads=1)
    reset_accelerate()
    assert main(cli_args(settings)) == 0
    capsys.readouterr()
    run = tmp_path / 'run'
    last, first = sorted((run / 'checkpoints').iterdir())[::-1]
    if damage_kind == 'pickle':
        torch.save({'state': {0: Boom(str(tmp_path / 'ran'))}, 'param_groups': []}, last / 'optimizer.bin')
        resign(last)
        named = 'optimizer.bin'
    elif damage_kind == 'swap':
        shutil.copyfile(first / 'model.safetensors', last / 'model.safetensors')
        named = 'model.safetensors'
    else:
        state = json.loads((last / STATE_FILE).read_text())
        (last / STATE_FILE).write_text(json.dumps({**state, 'epoch': -3}))
        named = STATE_FILE
    before = tree_hash(run)
    reset_accelerate()
    rc = main(cli_args(settings) + ['--resume'])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and '\n' not in err and err.startswith('hff-train: error: --resume: ') and named in err, err
    assert tree_hash(run) == before
    assert not (tmp_path / 'ran').exists()


def test_a_stage_parallel_checkpoint_of_pickles_is_refused_unopened(tmp_path):
    """timm_hff 0.1 wrote a stage's optimizer, scheduler and RNG state with torch.save: refused by name, unopened."""
    from timm_hff.hub import CorruptCheckpointError
    from timm_hff.train.engines.stage_parallel.state import load_stage
    stage = tmp_path / 'epoch_0000' / 'stage_0'
    stage.mkdir(parents=True)
    marker = tmp_path / 'ran'
    torch.save({'state': {0: Boom(str(marker))}}, stage / 'optimizer.bin')
    with pytest.raises(CorruptCheckpointError, match=r'stage_0/optimizer\.bin is a pickle written by timm_hff 0\.1, '
                                                     r'which is never opened'):
        load_stage(str(stage), SimpleNamespace())
    assert not marker.exists()


def test_resume_code_never_unpickles():
    """No load path of the package unpickles data read from disk: no ``weights_only=False``, no ``pickle.load``,
    no ``yaml.load`` without a safe loader (the stage-parallel hand-off between a run's own processes pickles over
    torch.distributed, documented as trusted peers, and is the one ``pickle.loads`` allowed)."""
    import re
    import timm_hff
    root = Path(timm_hff.__file__).parent
    allowed = {'train/engines/stage_parallel/handoff.py'}
    found = []
    for path in root.rglob('*.py'):
        rel = str(path.relative_to(root))
        text = path.read_text()
        for pattern in (r'weights_only\s*=\s*False', r'\bpickle\.loads?\(', r'\byaml\.load\(', r'\byaml\.unsafe_load',
                        r'\bmarshal\.loads?\(', r'\bdill\b', r'\bjoblib\.load'):
            for m in re.finditer(pattern, text):
                if rel not in allowed:
                    found.append(f'{rel}: {m.group(0)}')
    assert not found, found
    assert re.search(r'\bpickle\.loads?\(', (root / 'train/engines/stage_parallel/handoff.py').read_text())


@pytest.mark.parametrize('opt', ['adamw', 'sgd', 'lamb', 'adafactor', 'lion', 'adan', 'rmsprop'])
def test_an_optimizer_state_round_trips_through_safetensors(tmp_path, opt):
    """timm's optimizers' states (moments, step counts, Adafactor's factored statistics) written without a pickle come
    back exact: the restored optimizer's next step equals the original's, bit for bit."""
    from timm.optim import create_optimizer_v2
    from timm_hff.train.state_files import check_optimizer_state, load_state_file, save_state_file
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    a = create_optimizer_v2(model, opt, lr=1e-2)
    for _ in range(2):
        a.zero_grad()
        model(x).square().mean().backward()
        a.step()
    save_state_file(a.state_dict(), str(tmp_path / 'optimizer.safetensors'))
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    twin.load_state_dict(model.state_dict())
    b = create_optimizer_v2(twin, opt, lr=1e-2)
    state = load_state_file(str(tmp_path / 'optimizer.safetensors'))
    check_optimizer_state(state, b, 'optimizer.safetensors')
    b.load_state_dict(state)
    for m, o in ((model, a), (twin, b)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
