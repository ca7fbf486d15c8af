"""Untrusted inputs, fuzzed: a saved model's ``config.json`` and ``model.safetensors`` header, recipes, ``hff-train``
arguments and Hub names, mutated by ``hypothesis`` from real ones (values swapped for junk of other types, huge or
negative numbers, keys dropped or added, bytes cut or flipped).

Each case must end in success or in one of the library's documented errors (``DOCUMENTED``, raised by timm_hff
itself, one line), within ``CASE_SECONDS``, without writing a file outside the case's temporary folder (an audit hook
sees every write). The run is derandomized (a fixed seed): ``python -m pytest tests/test_fuzz.py`` runs the CI budget
of a few hundred cases; ``HFF_FUZZ_EXAMPLES=10000`` runs 10,000 configs, 10,000 headers and 2,000 recipes (plus 500
argument lists and 500 names), and ``HFF_FUZZ_REPORT=<file.json>`` writes the figures (cases, outcomes, escapes, wall
time, peak memory) that ``docs/errors.md`` quotes.
"""
import contextlib
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from huggingface_hub import constants as hf_constants

import timm_hff
from timm_hff import SplitError
from timm_hff.hub import CheckpointError, save_pretrained
from timm_hff.train import TrainConfig

from conftest import REPO, reset_accelerate

PACKAGE = os.path.dirname(os.path.abspath(timm_hff.__file__))
DOCUMENTED = (CheckpointError, SplitError, ValueError, FileNotFoundError)   # all timm_hff raises for bad input
CASE_SECONDS = 30.0
N = int(os.environ.get('HFF_FUZZ_EXAMPLES') or 0)
BUDGET = {t: max(1, int(N * share)) if N else default for t, (default, share) in dict(
    config=(80, 1), header=(80, 1), recipe=(120, 0.2), cli=(40, 0.05), names=(40, 0.05)).items()}
LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
STATS = {}


def fuzz_settings(target):
    return settings(max_examples=BUDGET[target], derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


# ----- what a case may do: the audit hook, time, memory -----
class Watch:
    """Records writes outside ``root`` (from an audit hook: every open for writing, mkdir, rename, remove...)."""
    root = None
    outside = []
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    _PATH_EVENTS = {'os.mkdir': (0,), 'os.remove': (0,), 'os.rmdir': (0,), 'os.truncate': (0,), 'os.chmod': (0,),
                    'os.rename': (0, 1), 'os.replace': (0, 1), 'os.symlink': (1,), 'os.link': (1,),
                    'shutil.rmtree': (0,), 'shutil.move': (0, 1), 'shutil.copyfile': (1,)}

    @classmethod
    def audit(cls, event, args):
        if cls.root is None:
            return
        if event == 'open':
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
                isinstance(flags, int) and flags & cls._WRITE_FLAGS)
            paths = [path] if writes else []
        else:
            paths = [args[i] for i in cls._PATH_EVENTS.get(event, ()) if i < len(args)]
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                full = os.path.abspath(os.fsdecode(p))
                if not (full == cls.root or full.startswith(cls.root + os.sep) or full == os.devnull
                        or (os.sep + '__pycache__' + os.sep in full and full.endswith('.pyc'))):
                    cls.outside.append(f'{event} {full}')


sys.addaudithook(Watch.audit)


def _memory_kb(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _reset_peak():
    with contextlib.suppress(OSError):    # Linux: clear the process's peak resident set (VmHWM)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')


@contextlib.contextmanager
def case(target, root):
    """One fuzz case: writes outside ``root`` are recorded, its time and peak memory measured, its outcome counted."""
    stats = STATS.setdefault(target, dict(cases=0, outcomes=Counter(), escapes=0, max_seconds=0.0, max_case_mib=0.0,
                                          seconds=0.0))
    threads = torch.get_num_threads()
    _reset_peak()
    base = _memory_kb('VmRSS')
    Watch.root, Watch.outside = os.path.abspath(root), []
    outcome = ['escape']
    start = time.monotonic()
    try:
        yield outcome
    finally:
        seconds = time.monotonic() - start
        Watch.root = None
        torch.set_num_threads(threads)
        stats['cases'] += 1
        stats['seconds'] += seconds
        stats['outcomes'][outcome[0]] += 1
        stats['escapes'] += outcome[0] == 'escape'
        stats['max_seconds'] = max(stats['max_seconds'], seconds)
        stats['max_case_mib'] = max(stats['max_case_mib'], (_memory_kb('VmHWM') - base) / 1024)
    assert seconds <= CASE_SECONDS, f'{target}: a case took {seconds:.1f} s'
    assert not Watch.outside, f'{target}: wrote outside its folder: {Watch.outside[:3]}'


def outcome_of(fn, outcome):
    """Run ``fn``: 'ok', or the documented error's type name; anything else is an escape (the test fails)."""
    try:
        fn()
        outcome[0] = 'ok'
        return None
    except DOCUMENTED as e:
        message = str(e)
        frames = traceback.extract_tb(e.__traceback__)
        ours = bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE + os.sep)
        assert message and '\n' not in message.strip(), f'multi-line {type(e).__name__}: {message!r}'
        assert isinstance(e, CheckpointError) or ours, (
            f'{type(e).__name__} raised outside timm_hff: {"".join(traceback.format_exception(e)[-3:])}')
        outcome[0] = type(e).__name__
        return e


@contextlib.contextmanager
def folder(parent):
    path = tempfile.mkdtemp(dir=parent)
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----- junk -----
HUGE = [-1, 0, 1, 2, -2 ** 63, 2 ** 31 - 1, 2 ** 31, 2 ** 53 + 1, 2 ** 63, 10 ** 18, 50_000_000, 10 ** 100]
TEXT = ['', ' ', '..', '../../../../tmp/hff-escape', '/tmp/hff-escape', '/etc/passwd', 'C:\\Windows\\x', 'a\x00b',
        'two\nlines', '\r\n', '\t', '<script>alert(1)</script>', '| cell |', '```', '[x](http://x.invalid)',
        '# heading', 'NaN', 'Infinity', '1e9999', 'resnet18', 'test_resnet', 'hff_timm', 'hff_resnet18',
        'hf-hub:org/x', 'local-dir:/', 'conv3x3', 'NHWC', 'NLC', 'token', 'orthogonal', 'adaptive', 'ensemble',
        'patience', 'entropy', 'time', 'memory', 'bicubic', 'layer1.0', 'backbone.layer2', '%s%n', '{0}',
        '\u202e', 'ü' * 300, 'x' * 5000]
SCALAR = st.one_of(st.none(), st.booleans(), st.sampled_from(HUGE), st.integers(), st.floats(),
                   st.sampled_from(TEXT), st.text(max_size=8))
JUNK = st.recursive(SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(['a', 'num_classes', 'embed_dim', 'channels', '..', '', 'layers']) | st.text(max_size=6), c,
    max_size=3), max_leaves=6)
FACTOR = st.sampled_from([-1, 0, 2, 3, 10, 1000, 10 ** 6, 10 ** 9, 0.5, 1e-9, 1e300])
OPS = ('junk', 'junk', 'scale', 'drop', 'add', 'swap')


def _paths(obj, prefix=()):
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def _scaled(value, factor):
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, (int, float)):
        out = value * factor
        return int(out) if isinstance(value, int) and isinstance(out, float) and abs(out) < 1e18 else out
    if isinstance(value, str):
        return value * 3 if factor > 1 else value[: len(value) // 2]
    if isinstance(value, list):
        return [_scaled(v, factor) for v in value]
    return value


def mutate(data, obj, hot=(), rounds=(1, 3)):
    """Apply 1-3 drawn mutations to ``obj`` (a JSON-like dict) in place; ``hot`` paths are drawn half the time."""
    for _ in range(data.draw(st.integers(*rounds), label='rounds')):
        paths = [p for p in _paths(obj) if p]
        hot_paths = [p for p in paths if any(p[:len(h)] == h for h in hot)]
        pool = hot_paths if hot_paths and data.draw(st.booleans(), label='hot') else paths
        path = data.draw(st.sampled_from(pool), label='path')
        op = data.draw(st.sampled_from(OPS), label='op')
        parent, key = _parent(obj, path), path[-1]
        if op == 'junk':
            parent[key] = data.draw(JUNK, label='junk')
        elif op == 'scale':
            parent[key] = _scaled(parent[key], data.draw(FACTOR, label='factor'))
        elif op == 'drop':
            del parent[key]
        elif op == 'add':
            if isinstance(parent, dict):
                parent[data.draw(st.sampled_from(TEXT[:20]) | st.text(max_size=6), label='key')] = data.draw(JUNK)
            else:
                parent.append(data.draw(JUNK, label='junk'))
        else:   # swap: another real value of the same file, of another type or size
            other = data.draw(st.sampled_from(paths), label='other')
            parent[key] = json.loads(json.dumps(_parent(obj, other)[other[-1]]))
    return obj


# ----- the saved model (the quick recipe's backbone, untrained) -----
@pytest.fixture(scope='module')
def quick_model(tmp_path_factory):
    torch.manual_seed(0)
    model = timm_hff.create_model('resnet18', num_classes=10, in_chans=1, small_input=True, stage_indices=[0, 2, 3, 4],
                                  embed_dim=128, channels=[16, 32, 64, 128], stem_type='deep', stem_width=8,
                                  layers=[1, 1, 1, 1], check_img_size=28)
    d = tmp_path_factory.mktemp('quick') / 'model'
    save_pretrained(model, d, label_names=LABELS, metrics={'top1': 10.0, 'stage_top1': [10.0] * 4,
                                                           'dataset': 'fashion_mnist', 'train_time_s': 1.5},
                    train_args={'img_size': 28, 'mean': [0.286], 'std': [0.353], 'crop_pct': 1.0, 'epochs': 4})
    return d


@pytest.fixture(scope='module', autouse=True)
def report():
    """With ``HFF_FUZZ_REPORT``, the run's figures as JSON (``benchmarks/results/fuzz/``)."""
    start, load = time.monotonic(), os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: one thread is faster, and fair on a shared machine
    yield
    torch.set_num_threads(threads)
    path = os.environ.get('HFF_FUZZ_REPORT')
    if path and STATS:
        out = dict(examples_env=N or None, targets={t: dict(s, outcomes=dict(s['outcomes'].most_common()))
                                                    for t, s in STATS.items()},
                   cases=sum(s['cases'] for s in STATS.values()), escapes=sum(s['escapes'] for s in STATS.values()),
                   wall_seconds=round(time.monotonic() - start, 1),
                   peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   loadavg_start=load, loadavg_end=os.getloadavg(), cpus=os.cpu_count(),
                   machine=platform.processor() or platform.machine(), python=platform.python_version(),
                   torch=torch.__version__, command=' '.join(sys.argv))
        Path(path).write_text(json.dumps(out, indent=2) + '\n')


# ----- config.json -----
CONFIG_HOT = (('num_classes',), ('num_features',), ('label_names',), ('hff', 'config'), ('hff', 'timm_kwargs'),
              ('hff', 'in_chans'), ('hff', 'arch'), ('hff', 'stages'), ('hff', 'format_version'), ('pretrained_cfg',))


@fuzz_settings('config')
@given(data=st.data())
def test_fuzz_config(quick_model, tmp_path, data):
    config = mutate(data, json.loads((quick_model / 'config.json').read_text()), CONFIG_HOT)
    with folder(tmp_path) as d:
        os.link(quick_model / 'model.safetensors', d / 'model.safetensors')
        (d / 'config.json').write_text(json.dumps(config))   # NaN / Infinity literals included, as json allows
        with case('config', d) as outcome:
            outcome_of(lambda: timm_hff.create_model(f'local-dir:{d}', pretrained=True), outcome)


# ----- the model.safetensors header -----
DTYPES = ['F32', 'F16', 'BF16', 'F64', 'I64', 'I32', 'U8', 'BOOL', 'F8_E4M3', 'C64', 'F4', '', 'f32']


def _header_mutation(data, header, tensors):
    name = data.draw(st.sampled_from(tensors), label='tensor')
    other = data.draw(st.sampled_from(tensors), label='other')
    entry = header[name]
    op = data.draw(st.sampled_from(['dtype', 'shape', 'offsets', 'swap_shape', 'transpose', 'reshape', 'grow', 'drop',
                                    'rename', 'add', 'metadata', 'junk']), label='header op')
    if op == 'dtype':
        entry['dtype'] = data.draw(st.sampled_from(DTYPES) | JUNK)
    elif op == 'shape':
        entry['shape'] = data.draw(st.lists(st.sampled_from(HUGE) | st.integers(-3, 300), max_size=5) | JUNK)
    elif op == 'offsets':
        a, b = entry['data_offsets']
        entry['data_offsets'] = data.draw(st.sampled_from([[a, a], [b, a], [a - 4, b], [a, b + 4], [0, b], [a, 2 ** 63],
                                                           header[other]['data_offsets']]) | JUNK)
    elif op == 'swap_shape':   # consistent in bytes only when the two tensors happen to be of one size
        entry['shape'], header[other]['shape'] = header[other]['shape'], entry['shape']
    elif op == 'transpose':
        entry['shape'] = entry['shape'][::-1]
    elif op == 'reshape':   # the same bytes, another shape: only the cross-check with config.json can tell
        numel = 1
        for dim in entry['shape']:
            numel *= dim
        entry['shape'] = data.draw(st.sampled_from([[numel], [1, numel], [numel, 1], [2, numel // 2]]))
    elif op == 'grow':
        entry['shape'] = [d * data.draw(st.sampled_from([2, 3, 10, 50_000_000])) for d in entry['shape']]
    elif op == 'drop':
        del header[name]
    elif op == 'rename':
        header[data.draw(st.sampled_from(TEXT) | st.text(max_size=10))] = header.pop(name)
    elif op == 'add':
        header[data.draw(st.text(max_size=10))] = data.draw(JUNK)
    elif op == 'metadata':
        header['__metadata__'] = data.draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | JUNK)
    else:
        header[name] = data.draw(JUNK)


def _well_formed(header, tensors):
    def ints(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(type(d) is int for d in v)
    return isinstance(header, dict) and all(
        isinstance(header.get(t), dict) and isinstance(header[t].get('dtype'), str) and ints(header[t].get('shape'))
        and ints(header[t].get('data_offsets'), 2) for t in tensors)


SIZES = {'F32': 4, 'F16': 2, 'BF16': 2, 'F64': 8, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1, 'U8': 1, 'BOOL': 1,
         'F8_E4M3': 1}


def _retile(header, body, original):
    """New data offsets (and data, cut or repeated from the tensor's own bytes) for the mutated dtypes and shapes;
    None if an entry is malformed or asks for more than 64 MiB (then the header stays inconsistent)."""
    if not isinstance(header, dict):
        return None
    out, offset = [], 0
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get('shape'), list) and str(entry.get('dtype')) in SIZES
                and all(type(d) is int and 0 <= d < 2 ** 26 for d in entry['shape'])):
            return None
        size = SIZES[entry['dtype']]
        for d in entry['shape']:
            size *= d
        if size > 2 ** 26:
            return None
        src = original.get(name, {}).get('data_offsets', [0, 0])
        old = body[src[0]:src[1]] or b'\0'
        out.append((old * (size // len(old) + 1))[:size])
        entry['data_offsets'] = [offset, offset + size]
        offset += size
    return b''.join(out)


@fuzz_settings('header')
@given(data=st.data())
def test_fuzz_header(quick_model, tmp_path, data):
    raw = (quick_model / 'model.safetensors').read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    tensors = sorted(k for k in header if k != '__metadata__')
    for _ in range(data.draw(st.integers(1, 2), label='rounds')):
        if _well_formed(header, tensors):   # a second round mutates what the first left well-formed
            _header_mutation(data, header, tensors)
    if data.draw(st.integers(0, 3), label='retile') > 0:   # offsets that tile the file again: safetensors accepts it
        body = _retile(header, body, json.loads(raw[8:8 + n])) or body
    text = json.dumps(header, separators=(',', ':')).encode()
    if data.draw(st.booleans(), label='pad'):
        text += b' ' * data.draw(st.integers(0, 7))
    length = len(text) + data.draw(st.sampled_from([0] * 6 + [-1, 1, -len(text), 2 ** 40, 2 ** 64 - 1 - len(text)]),
                                   label='length')
    blob = (length % 2 ** 64).to_bytes(8, 'little') + text + body
    cut = data.draw(st.sampled_from([None] * 5 + [0, 4, 8, 9, len(blob) // 2, len(blob) - 1]), label='cut')
    blob = blob[:cut] if cut is not None else blob
    if data.draw(st.integers(0, 9), label='flip') == 0 and len(blob) > 16:
        i = data.draw(st.integers(8, min(len(blob), 8 + n) - 1))
        blob = blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]
    config = json.loads((quick_model / 'config.json').read_text())
    if data.draw(st.integers(0, 9), label='keep sha') > 0:   # whoever writes the header writes config.json too
        config['hff']['weights_sha256'] = hashlib.sha256(blob).hexdigest()
    with folder(tmp_path) as d:
        (d / 'model.safetensors').write_bytes(blob)
        (d / 'config.json').write_text(json.dumps(config))
        with case('header', d) as outcome:
            outcome_of(lambda: timm_hff.create_model(f'local-dir:{d}', pretrained=True), outcome)


# ----- recipes -----
RECIPE = Path(REPO) / 'recipes' / 'fashion_mnist_quick.yaml'
RECIPE_HOT = (('experiment',), ('output',), ('label_names',), ('data_dir',), ('resume',), ('model',), ('hff',),
              ('model_kwargs',), ('workers',), ('img_size',), ('batch_size',), ('seed',), ('lr',))
TEXT_EDITS = ['&a [1, 2]', '*a', '!!python/object:os.system', '{', ']', ': :', '\t', '---', '? [1]', '\x00', '%YAML 9',
              'experiment: ../../escape', 'output: "a\\nb"', 'label_names: [a, "b\\nc"]', '<<: *a', '~', '.nan',
              '1e999', "'", '"', '\n  - ', 'x: &a [*a]']


def _edit_text(data, text):
    if data.draw(st.integers(0, 2), label='text edit') == 0:
        at = data.draw(st.integers(0, len(text)), label='at')
        edit = data.draw(st.sampled_from(TEXT_EDITS) | st.text(max_size=6), label='edit')
        cut = data.draw(st.integers(0, 8), label='cut')
        text = text[:at] + edit + text[at + cut:]
    return text


@fuzz_settings('recipe')
@given(data=st.data())
def test_fuzz_recipe(tmp_path, data):
    recipe = mutate(data, yaml.safe_load(RECIPE.read_text()), RECIPE_HOT)
    text = _edit_text(data, yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    with folder(tmp_path) as d:
        (d / 'recipe.yaml').write_text(text, encoding='utf-8', errors='surrogatepass')
        with case('recipe', d) as outcome:
            cfg = []
            outcome_of(lambda: cfg.append(TrainConfig.from_yaml(str(d / 'recipe.yaml'))), outcome)
        if cfg:   # accepted: the run folder is inside the output folder, and every label is one line
            out, run = os.path.abspath(cfg[0].output), os.path.abspath(cfg[0].output_dir)
            assert os.path.commonpath([out, run]) == out and run != out, (cfg[0].output, cfg[0].experiment)
            assert all('\n' not in n and '\x00' not in n for n in cfg[0].label_names or ())


# ----- hff-train arguments -----
class _Reached(Exception):
    """The run got as far as reading data: its arguments were accepted (the data folder does not exist anyway)."""


FLAG_VALUES = ['null', '~', '0', '-1', '1', '2', '1e999', '.inf', '.nan', '99999999999999999999', '[1, 2]', '{a: 1}',
               '{num_stagez: 2}', '{embed_dim: 100000000}', '[0, 99]', 'yes', "''", '"a\\nb"', 'sgd', 'bp', 'hff',
               'stage_parallel', 'sequential', 'test_resnet', 'hf-hub:org/x@../../x', 'local-dir:/nonexistent',
               '../../escape', '/tmp/hff-escape', 'a/b', '.', '..', 'a\nb', 'a\x00b', 'ü', 'x' * 300]
OUTPUTS = ['out', 'out2', '.', '..', 'a b', 'ünï', 'out/sub', 'x\ny', 'x\x00y', '']


@pytest.fixture(scope='module')
def no_data():
    """``build_data`` raises ``_Reached``: arguments, settings and the run folder are checked, no data is read."""
    from timm_hff.train.engines.accelerate import trainer
    from timm_hff.train.engines.stage_parallel import trainer as stage_parallel

    def reached(*args, **kwargs):
        raise _Reached()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, 'build_data', reached)
        mp.setattr(stage_parallel, 'build_data', reached)
        mp.setenv('HF_HUB_OFFLINE', '1')
        mp.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
        yield


@fuzz_settings('cli')
@given(data=st.data())
def test_fuzz_cli(tmp_path, no_data, data):
    from timm_hff.train.cli import main
    flags = list(TrainConfig.__dataclass_fields__) + ['baseline', 'resume', 'torchcompile', 'learning-rate']
    with folder(tmp_path) as d:
        recipe = dict(dataset='idx', data_dir=str(d / 'no-data'), model='test_resnet', in_chans=1, img_size=28,
                      hff={'small_input': True}, epochs=1, workers=0, progress=False, output=str(d / 'out'))
        (d / 'recipe.yaml').write_text(yaml.safe_dump(recipe))
        argv = ['--config', str(d / 'recipe.yaml')] if data.draw(st.integers(0, 9), label='config') else []
        for _ in range(data.draw(st.integers(0, 4), label='flags')):
            flag = data.draw(st.sampled_from(flags), label='flag')
            values = OUTPUTS if flag == 'output' else FLAG_VALUES
            argv += [f'--{flag.replace("_", "-")}', data.draw(st.sampled_from(values) | st.text(max_size=6))]
        err, cwd = io.StringIO(), os.getcwd()
        reset_accelerate()
        with case('cli', tmp_path) as outcome:
            os.chdir(d)
            try:
                with contextlib.redirect_stderr(err):
                    rc = main(argv)
            except SystemExit as e:   # argparse: usage line + one error line, exit 2
                rc = e.code
            except _Reached:
                rc = 'reached'
            finally:
                os.chdir(cwd)
            lines = err.getvalue().strip().splitlines()
            if rc == 'reached':
                outcome[0] = 'ok'
            else:
                assert rc == 2 and lines and lines[-1].startswith('hff-train: error: '), (rc, lines[-3:])
                assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith('usage:')), lines
                outcome[0] = 'exit 2'


# ----- Hub names -----
@fuzz_settings('names')
@given(data=st.data())
def test_fuzz_names(tmp_path, no_data, data):
    parts = st.sampled_from(['org', 'org/name', 'a/b/c', '..', '../..', '/abs', 'a--b', 'x\ny', 'a\x00b', '', '@',
                             'refs/pr/1', 'main', '../../../tmp/hff-escape', 'v1..2', 'a b']) | st.text(max_size=8)
    name = data.draw(st.sampled_from(['hf-hub:', 'local-dir:', '']), label='prefix')
    name += data.draw(parts) + data.draw(st.sampled_from(['', '@']), label='at') + data.draw(parts)
    revision = data.draw(st.none() | parts, label='revision')
    with folder(tmp_path) as d:
        with case('names', d) as outcome:
            outcome_of(lambda: timm_hff.create_model(name, pretrained=True, revision=revision,
                                                     cache_dir=str(d / 'cache')), outcome)


# ----- the cases the issue names -----
def test_fifty_million_classes_refused_before_allocating(quick_model, tmp_path, monkeypatch):
    """num_classes: 50000000 (25.6 GB of prototypes) is refused from the header alone: no module built, no memory."""
    from timm_hff.hub import ShapeMismatchError, _load
    d = tmp_path / 'model'
    shutil.copytree(quick_model, d)
    config = json.loads((d / 'config.json').read_text())
    config['num_classes'] = config['pretrained_cfg']['num_classes'] = 50_000_000
    for section in (config, config['hff']):
        section.pop('label_names')
    (d / 'config.json').write_text(json.dumps(config))

    def no_build(*args, **kwargs):
        raise AssertionError('a module was built before the config was held against the weights header')
    monkeypatch.setattr(_load, 'create_from_timm', no_build)
    _reset_peak()
    before = _memory_kb('VmRSS')
    with pytest.raises(ShapeMismatchError, match=r"'heads\.0\.prototypes' is \[10, 128\] in model\.safetensors but "
                                                 r"\[50000000, 128\]"):
        timm_hff.create_model(f'local-dir:{d}', pretrained=True)
    assert (_memory_kb('VmHWM') - before) / 1024 < 100


def test_dry_build_stops_what_the_header_cannot_back(quick_model, tmp_path):
    """A huge probe image, a million blocks: stopped on the meta device, within seconds, in little memory."""
    from timm_hff.hub import ResourceLimitError
    for edit in (lambda c: c['hff']['config'].update(check_img_size=60000),
                 lambda c: c['hff']['timm_kwargs'].update(layers=[1, 1, 1, 1_000_000])):
        d = tmp_path / f'model{edit.__code__.co_firstlineno}-{id(edit)}'
        shutil.copytree(quick_model, d)
        config = json.loads((d / 'config.json').read_text())
        edit(config)
        (d / 'config.json').write_text(json.dumps(config))
        _reset_peak()
        before, start = _memory_kb('VmRSS'), time.monotonic()
        with pytest.raises(ResourceLimitError) as e:
            timm_hff.create_model(f'local-dir:{d}', pretrained=True)
        assert '\n' not in str(e.value) and time.monotonic() - start < CASE_SECONDS
        assert (_memory_kb('VmHWM') - before) / 1024 < 300, str(e.value)
