"""Weights on the Hub: save/load round trips (local-dir:, hf-hub: from an offline cache), push against a local
Hub stand-in, model cards, export to plain timm, and every refused input.

The Hub is a small HTTP server on 127.0.0.1 (``FakeHub``) that speaks the endpoints huggingface_hub's real
``HfApi`` and ``hf_hub_download`` use (create repo, branch, pull request, preupload, commit, resolve), so the
cache, the upload payloads and the card front matter are huggingface_hub's own, not a mock's.
"""
import base64
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub import constants as hf_constants

import timm_hff
from timm_hff import _io
from timm_hff.hub import CARD_TEMPLATE, FORMAT_VERSION, ExportError, _load, _weights, export_timm, read_weights
from timm_hff.hub import (
    CheckpointFileNotFoundError, ConfigError, CorruptCheckpointError, FormatVersionError, ShapeMismatchError,
    UnknownArchitectureError, UnsafeCheckpointError, push_to_hub, save_pretrained)
from timm_hff.hub_cli import main as hff_push

REPO = Path(__file__).resolve().parents[1]
METRICS = {'top1': 91.2, 'stage_top1': [80.5, 91.2], 'dataset': 'fashion_mnist', 'train_time_s': 12.5}
TRAIN_ARGS = {'epochs': 2, 'lr': 0.05, 'batch_size': 8, 'img_size': 28, 'mean': [0.286], 'std': [0.353]}
LABELS = ['tee', 'trouser', 'pullover', 'dress']
REQUIRED_TAGS = {'image-classification', 'timm', 'timm_hff', 'local-learning'}


# ----- a Hub stand-in on 127.0.0.1 -----
class FakeHub(ThreadingHTTPServer):
    """Just enough of the Hub's HTTP API for HfApi.create_repo/create_branch/upload_folder and hf_hub_download."""
    daemon_threads = True

    def __init__(self):
        super().__init__(('127.0.0.1', 0), _HubHandler)
        self.repos = {}       # repo_id -> revision -> {path: bytes}
        self.commits = []     # {repo_id, revision, files, summary}
        self.created = []     # create_repo payloads
        self.branches = []    # (repo_id, branch)
        self.prs = []         # pull requests opened
        self.url = f'http://127.0.0.1:{self.server_address[1]}'
        self._thread = threading.Thread(target=self.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    @staticmethod
    def commit_sha(files):
        h = hashlib.sha1()
        for k in sorted(files):
            h.update(k.encode() + hashlib.sha256(files[k]).digest())
        return h.hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, obj, status=200, headers=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _parts(self):
        return [unquote(p) for p in urlsplit(self.path).path.strip('/').split('/')]

    def do_POST(self):
        hub, parts = self.server, self._parts()
        data = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        if parts[:3] == ['api', 'repos', 'create']:
            payload = json.loads(data)
            hub.created.append(payload)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._json({'error': 'already exists', 'url': f'{hub.url}/{repo_id}'}, 409)
            hub.repos[repo_id] = {'main': {}}
            return self._json({'url': f'{hub.url}/{repo_id}'})
        if parts[:2] == ['api', 'validate-yaml']:
            return self._json({})
        if parts[:2] == ['api', 'models'] and len(parts) >= 5:
            repo_id, action, rev = f'{parts[2]}/{parts[3]}', parts[4], '/'.join(parts[5:])
            revs = hub.repos.get(repo_id)
            if revs is None:
                return self._json({'error': 'Repository not found'}, 404, {'X-Error-Code': 'RepositoryNotFound'})
            if action == 'branch':
                hub.branches.append((repo_id, rev))
                if rev in revs:
                    return self._json({'error': 'Reference already exists'}, 409)
                revs[rev] = dict(revs['main'])
                return self._json({})
            if action == 'discussions':
                hub.prs.append(dict(repo_id=repo_id, num=len(hub.prs) + 1, **json.loads(data)))
                revs[f'refs/pr/{len(hub.prs)}'] = dict(revs['main'])
                return self._json({'num': len(hub.prs)})
            if action == 'preupload':
                return self._json({'files': [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False}
                                             for f in json.loads(data)['files']]})
            if action == 'commit':
                if rev not in revs:
                    return self._json({'error': 'Revision not found'}, 404, {'X-Error-Code': 'RevisionNotFound'})
                lines = [json.loads(line) for line in data.splitlines() if line.strip()]
                files = {op['value']['path']: base64.b64decode(op['value']['content'])
                         for op in lines if op['key'] == 'file'}
                assert not [op for op in lines if op['key'] == 'lfsFile'], 'every upload is regular here'
                revs[rev] = {**revs[rev], **files}
                hub.commits.append(dict(repo_id=repo_id, revision=rev, files=files,
                                        summary=lines[0]['value']['summary']))
                sha = hub.commit_sha(revs[rev])
                return self._json({'commitUrl': f'{hub.url}/{repo_id}/commit/{sha}', 'commitOid': sha})
        return self._json({'error': f'not implemented: POST {self.path}'}, 501)

    def _get(self, send_body):
        hub, parts = self.server, self._parts()
        if parts[:2] == ['api', 'models'] and len(parts) == 6 and parts[4] == 'discussions':
            pr = hub.prs[int(parts[5]) - 1]
            return self._json({'title': pr['title'], 'num': pr['num'], 'author': {'name': 'me'},
                               'createdAt': '2026-01-01T00:00:00.000Z', 'status': 'draft',
                               'repo': {'name': pr['repo_id'], 'type': 'model'}, 'isPullRequest': True,
                               'events': [], 'changes': {'base': 'refs/heads/main'}, 'filesWithConflicts': []})
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._json({'error': f'not implemented: GET {self.path}'}, 501)
        repo_id, rev, filename = f'{parts[0]}/{parts[1]}', parts[3], '/'.join(parts[4:])
        revs = hub.repos.get(repo_id)
        if revs is None:
            return self._json({'error': 'Repository not found'}, 404, {'X-Error-Code': 'RepositoryNotFound'})
        if rev not in revs:
            return self._json({'error': 'Revision not found'}, 404, {'X-Error-Code': 'RevisionNotFound'})
        files = revs[rev]
        commit = {'X-Repo-Commit': hub.commit_sha(files)}
        if filename not in files:
            return self._json({'error': 'Entry not found'}, 404, {'X-Error-Code': 'EntryNotFound', **commit})
        body = files[filename]
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.send_header('ETag', f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header('X-Repo-Commit', commit['X-Repo-Commit'])
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_HEAD(self):
        self._get(False)

    def do_GET(self):
        self._get(True)


# ----- models -----
def _train_two_steps(model, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(2):
        x = torch.randn(8, *shape, generator=g)
        y = torch.randint(0, model.num_classes, (8,), generator=g)
        out = model(x, y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _fmnist_like(seed=0):
    """The Fashion-MNIST shape of model: 1 channel, 28 px, small_input stem, two stages."""
    torch.manual_seed(seed)
    m = timm_hff.create_model('test_resnet', num_classes=4, in_chans=1, num_stages=2, embed_dim=16, small_input=True)
    return _train_two_steps(m, (1, 28, 28), seed)


def _images(n=6, chans=1, size=28, seed=1):
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def trained():
    return _fmnist_like()


@pytest.fixture(scope='module')
def saved(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp('saved') / 'model'
    save_pretrained(trained, d, label_names=LABELS, metrics=METRICS, train_args=TRAIN_ARGS)
    return d


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setattr(hf_constants, 'ENDPOINT', server.url)   # HfApi() reads it when created
        yield server


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ----- save / load -----
def test_save_layout(trained, saved):
    assert sorted(p.name for p in saved.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in saved.iterdir()} == {oct(0o666 & ~mask)}
    assert not [p for p in saved.parent.iterdir() if p.name.startswith('.')], 'temporary folders left behind'
    cfg = json.loads((saved / 'config.json').read_text())
    assert cfg['architecture'] == 'hff_timm' and timm.is_model(cfg['architecture'])
    assert cfg['num_classes'] == 4 and cfg['label_names'] == LABELS
    assert cfg['model_args']['arch'] == 'test_resnet' and cfg['model_args']['in_chans'] == 1
    hff = cfg['hff']
    assert hff['format_version'] == FORMAT_VERSION and hff['arch'] == 'test_resnet' and hff['in_chans'] == 1
    assert timm_hff.HFFConfig.from_dict(hff['config']) == trained.hff_cfg
    assert hff['metrics'] == METRICS and hff['train_args'] == TRAIN_ARGS
    assert hff['weights_sha256'] == hashlib.sha256((saved / 'model.safetensors').read_bytes()).hexdigest()
    assert [s['channels'] for s in hff['stages']] == trained.split.channels
    tensors = safetensors.torch.load_file(str(saved / 'model.safetensors'))
    state = trained.state_dict()
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)
    # the preprocessing of the recipe, in timm's own pretrained_cfg, not the backbone's ImageNet defaults
    assert cfg['pretrained_cfg']['input_size'] == [1, 28, 28] and cfg['pretrained_cfg']['mean'] == [0.286]


def test_local_dir_round_trip_is_bit_identical(trained, saved):
    x = _images()
    want = _logits(trained, x)
    for model in (timm_hff.create_model(f'local-dir:{saved}', pretrained=True),
                  timm.create_model(f'local-dir:{saved}', pretrained=True)):    # timm alone, after import
        assert isinstance(model, timm_hff.HFFModel)
        assert torch.equal(_logits(model, x), want)
        with torch.no_grad():
            pairs = zip(model.forward_stages(x), trained.forward_stages(x), strict=True)
            assert all(torch.equal(a, b) for a, b in pairs)
        assert model.pretrained_cfg['label_names'] == LABELS
        data_cfg = timm.data.resolve_model_data_config(model)
        assert tuple(data_cfg['input_size']) == (1, 28, 28) and tuple(data_cfg['mean']) == (0.286,)
    fresh = timm_hff.create_model(f'local-dir:{saved}', pretrained=False)
    assert fresh.split.channels == trained.split.channels
    assert not torch.equal(_logits(fresh, x), want)


def test_hf_hub_from_offline_cache_with_revisions(trained, saved, tmp_path, monkeypatch):
    second = _train_two_steps(_fmnist_like(), (1, 28, 28), seed=5)      # another version of the weights
    v2 = tmp_path / 'v2'
    save_pretrained(second, v2, card=False)
    cache = tmp_path / 'hub-cache'
    with FakeHub() as server:
        server.repos['org/hff-fmnist'] = {
            'main': {p.name: p.read_bytes() for p in saved.iterdir()},
            'v2': {p.name: p.read_bytes() for p in v2.iterdir()},
        }
        for rev in ('main', 'v2'):     # fill the cache with huggingface_hub's own downloader and layout
            for name in ('config.json', 'model.safetensors'):
                hf_hub_download('org/hff-fmnist', name, revision=rev, endpoint=server.url, cache_dir=cache)
    assert (cache / 'models--org--hff-fmnist' / 'refs' / 'v2').is_file()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)     # the server is gone: only the cache can answer

    x = _images()
    want1, want2 = _logits(trained, x), _logits(second, x)
    assert not torch.equal(want1, want2)
    m = timm_hff.create_model('hf-hub:org/hff-fmnist', pretrained=True, cache_dir=str(cache))
    assert torch.equal(_logits(m, x), want1)
    assert m.pretrained_cfg['hf_hub_id'] == 'org/hff-fmnist' and m.pretrained_cfg['label_names'] == LABELS
    for m in (timm_hff.create_model('hf-hub:org/hff-fmnist@v2', pretrained=True, cache_dir=str(cache)),
              timm_hff.create_model('hf-hub:org/hff-fmnist', pretrained=True, revision='v2', cache_dir=str(cache)),
              timm.create_model('hf-hub:org/hff-fmnist@v2', pretrained=True, cache_dir=str(cache))):
        assert torch.equal(_logits(m, x), want2)
    m = timm.create_model('hf-hub:org/hff-fmnist', pretrained=True, cache_dir=str(cache))
    assert torch.equal(_logits(m, x), want1)
    with pytest.raises(CheckpointFileNotFoundError, match='not in the local Hub cache') as e:
        timm_hff.create_model('hf-hub:org/never-downloaded', pretrained=True, cache_dir=str(cache))
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='revision'):
        timm_hff.create_model('hf-hub:org/hff-fmnist@v2', revision='main', cache_dir=str(cache))


def test_new_num_classes_keeps_backbone_and_resets_prototypes(trained, saved):
    with pytest.warns(UserWarning, match='re-initialises the prototypes'):
        m = timm_hff.create_model(f'local-dir:{saved}', pretrained=True, num_classes=7)
    assert m.num_classes == 7 and m.heads[-1].prototypes.shape == (7, 16)
    assert 'label_names' not in m.pretrained_cfg
    old = trained.state_dict()
    for k, v in m.state_dict().items():
        if k.endswith('prototypes'):
            continue
        assert torch.equal(v, old[k]), k      # backbone, aux blocks and projections are kept
    assert _logits(m, _images()).shape == (6, 7)
    # a different channel count adapts the stem as timm does; shape-neutral settings may change
    m3 = timm_hff.create_model(f'local-dir:{saved}', pretrained=True, in_chans=3, predict_from='ensemble')
    assert _logits(m3, _images(chans=3)).shape == (6, 4) and m3.predict_from == 'ensemble'
    with pytest.raises(ValueError, match='embed_dim'):
        timm_hff.create_model(f'local-dir:{saved}', pretrained=True, embed_dim=8)
    assert timm_hff.create_model(f'local-dir:{saved}', embed_dim=8).heads[0].embed_dim == 8


# ----- atomic writes -----
@pytest.mark.parametrize('exchange', [True, False], ids=['renameat2', 'two-renames'])
def test_save_is_atomic_and_keeps_other_files(exchange, trained, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(_io, '_rename_exchange', lambda a, b: False)
    target = tmp_path / 'model'
    save_pretrained(trained, target, card=False)
    (target / 'notes.txt').write_text('kept')
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real_save = safetensors.torch.save_file

    def failing_save(tensors, path, metadata=None):
        Path(path).write_bytes(b'half a file')
        raise OSError('disk full')
    monkeypatch.setattr(_weights.safetensors.torch, 'save_file', failing_save)
    with pytest.raises(OSError, match='disk full'):
        save_pretrained(_fmnist_like(seed=3), target)
    monkeypatch.setattr(_weights.safetensors.torch, 'save_file', real_save)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['model']

    other = _fmnist_like(seed=3)
    save_pretrained(other, target)
    assert (target / 'notes.txt').read_text() == 'kept' and (target / 'README.md').is_file()
    assert (target / 'model.safetensors').read_bytes() != before['model.safetensors']
    assert torch.equal(_logits(timm_hff.create_model(f'local-dir:{target}', pretrained=True), _images()),
                       _logits(other, _images()))
    assert [p.name for p in tmp_path.iterdir()] == ['model']
    (target / 'sub').mkdir()
    with pytest.raises(ValueError, match='sub-folders'):
        save_pretrained(trained, target)
    with pytest.raises(ValueError, match="stage_top1"):
        save_pretrained(trained, tmp_path / 'bad', metrics={'stage_top1': [1.0]})


# ----- refused inputs: each a clear one-line error, raised before any module is built -----
def _edit_config(d, fn):
    cfg = json.loads((d / 'config.json').read_text())
    fn(cfg)
    (d / 'config.json').write_text(json.dumps(cfg))


def _pickle_instead(d):
    (d / 'model.safetensors').unlink()
    torch.save({'w': torch.zeros(2)}, d / 'pytorch_model.bin')


def _flip_tail(d):
    data = bytearray((d / 'model.safetensors').read_bytes())
    data[-5:] = bytes(b ^ 0xFF for b in data[-5:])
    (d / 'model.safetensors').write_bytes(bytes(data))


def _garbage_header(d):
    data = (d / 'model.safetensors').read_bytes()
    (d / 'model.safetensors').write_bytes(b'\x20\x00\x00\x00\x00\x00\x00\x00{"not": "a header' + data[30:])
    _edit_config(d, lambda c: c['hff'].pop('weights_sha256'))


def _smaller_embed(c):
    c['hff']['config']['embed_dim'] = 8
    c['model_args']['embed_dim'] = 8


ERROR_CASES = {
    'missing config': (lambda d: (d / 'config.json').unlink(), CheckpointFileNotFoundError, 'config.json'),
    'missing weights': (lambda d: (d / 'model.safetensors').unlink(), CheckpointFileNotFoundError,
                        'model.safetensors not found'),
    'pickle file': (_pickle_instead, UnsafeCheckpointError, r'pytorch_model\.bin.*safetensors'),
    'pickle named safetensors': (lambda d: torch.save({'w': torch.zeros(2)}, d / 'model.safetensors'),
                                 UnsafeCheckpointError, 'pickle'),
    'truncated weights': (lambda d: (d / 'model.safetensors').write_bytes((d / 'model.safetensors').read_bytes()[
        :(d / 'model.safetensors').stat().st_size // 2]), CorruptCheckpointError, 'truncated or corrupted'),
    'corrupted tensor data': (_flip_tail, CorruptCheckpointError, 'sha256'),
    'corrupted header': (_garbage_header, CorruptCheckpointError, 'truncated or corrupted'),
    'newer format version': (lambda d: _edit_config(d, lambda c: c['hff'].update(format_version=99)),
                             FormatVersionError, 'version 99.*upgrade'),
    'unknown timm architecture': (lambda d: _edit_config(d, lambda c: c['hff'].update(arch='no_such_net')),
                                  UnknownArchitectureError, 'no_such_net'),
    'unknown entrypoint': (lambda d: _edit_config(d, lambda c: c.update(architecture='resnet_foo')),
                           UnknownArchitectureError, 'resnet_foo'),
    'unknown setting': (lambda d: _edit_config(d, lambda c: c['hff']['config'].update(num_stagez=2)),
                        ConfigError, 'num_stagez'),
    'unknown key': (lambda d: _edit_config(d, lambda c: c['hff'].update(extra=1)), ConfigError, 'hff.extra'),
    'wrong type': (lambda d: _edit_config(d, lambda c: c.update(num_classes='4')), ConfigError, 'num_classes'),
    'out of range': (lambda d: _edit_config(d, lambda c: c['hff']['config'].update(margin=5)), ConfigError,
                     'margin'),
    'file-loading timm kwarg': (lambda d: _edit_config(d, lambda c: c['hff']['timm_kwargs'].update(
        checkpoint_path='/tmp/x.pth')), ConfigError, 'checkpoint_path'),
    'not json': (lambda d: (d / 'config.json').write_text('{"hff": '), ConfigError, 'not valid JSON'),
    'plain timm config': (lambda d: _edit_config(d, lambda c: c.pop('hff')), ConfigError, "no 'hff' section"),
}


@pytest.mark.parametrize('case', list(ERROR_CASES))
def test_refused_inputs(case, saved, tmp_path, monkeypatch):
    mutate, error, pattern = ERROR_CASES[case]
    d = tmp_path / 'model'
    shutil.copytree(saved, d)
    mutate(d)

    def no_build(*args, **kwargs):
        raise AssertionError('a module was built before the input was validated')

    def no_unpickle(*args, **kwargs):
        raise AssertionError('a pickle was opened')
    monkeypatch.setattr(_load, 'create_from_timm', no_build)
    monkeypatch.setattr(torch, 'load', no_unpickle)
    monkeypatch.setattr(pickle, 'load', no_unpickle)
    with pytest.raises(error, match=pattern) as e:
        timm_hff.create_model(f'local-dir:{d}', pretrained=True)
    assert '\n' not in str(e.value) and str(e.value).startswith(f'local-dir:{d}')


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_pickle_told_from_safetensors_by_structure(tmp_path, legacy):
    """A safetensors header length whose low byte is 0x80 must not be mistaken for a pickle's first byte."""
    from safetensors.torch import save_file
    path = tmp_path / 'model.safetensors'
    tensors = {'w': torch.arange(6.0)}
    for pad in range(300):   # grow the metadata until the 8-byte header length starts with 0x80
        save_file(tensors, str(path), metadata={'pad': 'x' * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    torch.testing.assert_close(read_weights(path)['w'], tensors['w'])
    torch.save(tensors, str(path), _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match='pickle'):
        read_weights(path)


def test_shape_mismatch(saved, tmp_path):
    d = tmp_path / 'model'
    shutil.copytree(saved, d)
    _edit_config(d, _smaller_embed)
    with pytest.raises(ShapeMismatchError, match=r"'heads\.0\.[a-z.]+' is \[.*16.*\] in model\.safetensors but") as e:
        timm_hff.create_model(f'local-dir:{d}', pretrained=True)
    assert '\n' not in str(e.value)


# ----- push and model cards -----
def _card(data: bytes):
    card = ModelCard(data.decode())
    results = {r.metric_name: r.metric_value for r in card.data.eval_results or []}
    return card, results


def test_push_model_uploads_files_and_card(trained, hub):
    info = push_to_hub(trained, 'org/hff-fmnist', token='hf_test', label_names=LABELS, metrics=METRICS,
                       train_args={**TRAIN_ARGS, 'pretrained': True})
    assert [(c['organization'], c['name'], c['visibility']) for c in hub.created] == [('org', 'hff-fmnist', 'public')]
    commit = hub.commits[-1]
    assert commit['revision'] == 'main' and set(commit['files']) == {'config.json', 'model.safetensors', 'README.md'}
    assert info.commit_url.startswith(hub.url)
    cfg = json.loads(commit['files']['config.json'])
    assert cfg['hff']['metrics'] == METRICS and cfg['label_names'] == LABELS
    weights = commit['files']['model.safetensors']
    assert hashlib.sha256(weights).hexdigest() == cfg['hff']['weights_sha256']
    uploaded = safetensors.torch.load(weights)
    assert all(torch.equal(uploaded[k], v) for k, v in trained.state_dict().items())

    card, results = _card(commit['files']['README.md'])
    assert card.data.library_name == 'timm' and REQUIRED_TAGS <= set(card.data.tags)
    assert card.data.datasets == ['zalando-datasets/fashion_mnist']
    assert card.data.base_model == 'timm/test_resnet.r160_in1k'       # fine-tuned from timm's checkpoint
    assert results == {'Top-1 (final)': 91.2, 'Top-1 (stage 1)': 80.5, 'Top-1 (stage 2)': 91.2}
    assert card.data.eval_results[0].dataset_type == 'zalando-datasets/fashion_mnist'
    assert card.data.model_name == 'org/hff-fmnist'
    usage = card.text.split('```python\n', 1)[1]
    assert usage.startswith('import timm_hff') and "create_model('hf-hub:org/hff-fmnist'" in usage
    assert '2605.00082' in card.text and '| Stage 2 | `backbone.layer4` |' in card.text
    assert 'lr: 0.05' in card.text and '| train_time_s | 12.5 |' in card.text


def test_push_folder_rebuilds_card_every_time(trained, saved, hub, tmp_path):
    local_card = (saved / 'README.md').read_text()
    assert 'local-dir:' in local_card and 'hf-hub:' not in local_card
    push_to_hub(str(saved), 'org/hff-fmnist', token='hf_test')
    first = hub.commits[-1]['files']
    assert first['config.json'] == (saved / 'config.json').read_bytes()
    assert first['model.safetensors'] == (saved / 'model.safetensors').read_bytes()
    card, results = _card(first['README.md'])
    assert "hf-hub:org/hff-fmnist" in card.text and card.data.base_model is None
    assert results['Top-1 (final)'] == 91.2

    better = tmp_path / 'better'
    save_pretrained(trained, better, metrics={**METRICS, 'top1': 92.4, 'stage_top1': [81.0, 92.4]})
    push_to_hub(str(better), 'org/hff-fmnist', token='hf_test', commit_message='new eval')
    second = hub.commits[-1]
    assert second['summary'] == 'new eval'
    _, results = _card(second['files']['README.md'])
    assert results == {'Top-1 (final)': 92.4, 'Top-1 (stage 1)': 81.0, 'Top-1 (stage 2)': 92.4}
    assert hub.repos['org/hff-fmnist']['main']['README.md'] == second['files']['README.md']

    push_to_hub(str(saved), 'org/hff-fmnist', token='hf_test', revision='dev')
    assert ('org/hff-fmnist', 'dev') in hub.branches and hub.commits[-1]['revision'] == 'dev'
    info = push_to_hub(str(saved), 'org/hff-private', token='hf_test', private=True, create_pr=True)
    assert hub.created[-1]['visibility'] == 'private'
    assert hub.commits[-1]['revision'] == 'refs/pr/1' and info.pr_url
    with pytest.raises(ValueError, match='create_pr'):
        push_to_hub(str(saved), 'org/hff-fmnist', revision='dev', create_pr=True)


def test_push_refuses_a_corrupt_folder_before_uploading(saved, hub, tmp_path):
    d = tmp_path / 'model'
    shutil.copytree(saved, d)
    _flip_tail(d)
    with pytest.raises(CorruptCheckpointError):
        push_to_hub(str(d), 'org/hff-fmnist', token='hf_test')
    assert not hub.created and not hub.commits


def test_cli(saved, hub, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copytree(saved, run / 'model')
    (run / 'metrics.csv').write_text('epoch,top1\n')
    card_out = tmp_path / 'cards' / 'hff-fmnist.md'
    assert hff_push([str(run), 'org/hff-cli', '--dry-run']) == 0
    assert not hub.commits and "hf-hub:org/hff-cli" in capsys.readouterr().out
    assert hff_push([str(run), 'org/hff-cli', '--token', 'hf_test', '--card-out', str(card_out)]) == 0
    commit = hub.commits[-1]
    assert commit['repo_id'] == 'org/hff-cli' and set(commit['files']) == {'config.json', 'model.safetensors',
                                                                          'README.md'}
    assert card_out.read_bytes().rstrip() == commit['files']['README.md'].rstrip()
    assert capsys.readouterr().out.strip().startswith(hub.url)
    shutil.copytree(saved, run / 'model2')
    assert hff_push([str(run), 'org/hff-cli']) == 2
    assert 'several saved models' in capsys.readouterr().err


def test_card_from_trainer_style_metrics(trained, tmp_path):
    """The training loop reports flat per-stage keys and names a local IDX folder; the card still finds them."""
    metrics = {'top1': 90.1, 'top5': 99.5, 'top1_stage0': 70.25, 'top1_stage1': 90.1, 'top5_stage0': 97.0,
               'top5_stage1': 99.5, 'train_img_per_s': 1234.5, 'eval_time_s': 3.25, 'train_loss': 0.31, 'epoch': 2}
    train_args = {'dataset': 'idx', 'dataset_name': '/usr/share/datasets/fashion-mnist', 'val_split': 'test',
                  'model': f'local-dir:{tmp_path}', 'pretrained': True, 'lr': 0.1}
    save_pretrained(trained, tmp_path / 'm', metrics=metrics, train_args=train_args)
    card, results = _card((tmp_path / 'm' / 'README.md').read_bytes())
    assert results == {'Top-1 (final)': 90.1, 'Top-1 (stage 1)': 70.25, 'Top-1 (stage 2)': 90.1,
                       'Top-5 (final)': 99.5, 'Top-5 (stage 1)': 97.0, 'Top-5 (stage 2)': 99.5}
    assert card.data.datasets == ['zalando-datasets/fashion_mnist'] and card.data.base_model is None
    assert {r.dataset_split for r in card.data.eval_results} == {'test'}
    cost = card.text.split('## Measured cost', 1)[1]
    assert '| train_img_per_s | 1,234.5 |' in cost and '| eval_time_s | 3.25 |' in cost and 'train_loss' not in cost
    assert '| train_loss | 0.31 |' in card.text and '| Stage 1 | `backbone.layer3` | 192 |' in card.text


def test_card_template_file_is_the_packaged_template():
    assert (REPO / 'model_cards' / 'TEMPLATE.md').read_text() == CARD_TEMPLATE


# ----- export to plain timm -----
def _exportable(arch='test_resnet', k=1, seed=0, **kwargs):
    torch.manual_seed(seed)
    m = timm_hff.create_model(arch, num_classes=5, in_chans=1, num_stages=2, embed_dim=16, prototypes_per_class=k,
                              **kwargs)
    return _train_two_steps(m, (1, 32, 32), seed)


@pytest.mark.parametrize('arch,kwargs', [('test_resnet', dict(check_img_size=32)), ('test_vit', dict(img_size=32))])
def test_export_argmax_matches(arch, kwargs, tmp_path):
    model = _exportable(arch, **kwargs)
    out = export_timm(model, tmp_path / 'plain', label_names=list('abcde'))
    cfg = json.loads((Path(out) / 'config.json').read_text())
    assert cfg['architecture'] == arch and 'hff' not in cfg and cfg['num_classes'] == 5
    plain = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert not isinstance(plain, timm_hff.HFFModel)
    x = _images(64, chans=1, size=32)
    assert torch.equal(_logits(plain, x).argmax(-1), _logits(model, x).argmax(-1))


def test_export_loads_with_timm_alone(tmp_path):
    model = _exportable(check_img_size=32)
    out = export_timm(model, tmp_path / 'plain')
    x = _images(32, chans=1, size=32)
    safetensors.torch.save_file({'x': x}, str(tmp_path / 'x.safetensors'))
    script = ("import json, sys, timm, torch, safetensors.torch as st\n"
              f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
              f"x = st.load_file('{tmp_path / 'x.safetensors'}')['x']\n"
              "with torch.no_grad():\n    pred = m(x).argmax(-1).tolist()\n"
              "assert not any(n.startswith('timm_hff') for n in sys.modules), 'timm_hff was imported'\n"
              "print(json.dumps(pred))\n")
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == _logits(model, x).argmax(-1).tolist()


def test_export_multi_prototype(tmp_path):
    model = _exportable(k=2, check_img_size=32)
    head = model.heads[-1]
    x = _images(64, chans=1, size=32)
    with torch.no_grad():   # the rule 'expand' implements: class of the nearest prototype (hard max)
        pooled = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
        nearest = (head.embed(pooled) @ head.unit_prototypes().t()).argmax(-1) // 2
    with pytest.warns(UserWarning, match='one per prototype'):
        out = export_timm(model, tmp_path / 'expand', label_names=list('abcde'), multi_prototype='expand')
    cfg = json.loads((Path(out) / 'config.json').read_text())
    assert cfg['num_classes'] == 10 and cfg['label_names'] == [c for c in 'abcde' for _ in range(2)]
    plain = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(_logits(plain, x).argmax(-1) // 2, nearest)

    with torch.no_grad():   # when a class's prototypes agree, the mean export is exact
        head.prototypes.copy_(head.prototypes.view(5, 2, -1)[:, :1].expand(5, 2, -1).reshape(10, -1))
    with pytest.warns(UserWarning, match='mean prototype'):
        out = export_timm(model, tmp_path / 'mean')
    plain = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(_logits(plain, x).argmax(-1), _logits(model, x).argmax(-1))


def test_export_refusals(trained, tmp_path):
    truncated = timm_hff.create_model('test_resnet', num_classes=3, stage_indices=(1, 2), check_img_size=32)
    with pytest.raises(ExportError, match='truncated'):
        export_timm(truncated, tmp_path / 'a')
    with pytest.raises(ExportError, match='small_input'):
        export_timm(trained, tmp_path / 'b')
    assert not list(tmp_path.iterdir())


def test_pretrained_backbone_is_honest_about_new_heads(tmp_path, caplog):
    """pretrained=True loads timm's backbone; the prototype heads are new, so it says so, and the model's
    pretrained_cfg does not claim timm's checkpoint (no hub id / tag / papers), only its preprocessing."""
    import logging
    torch.manual_seed(0)
    src = timm.create_model('resnet18', num_classes=0)
    path = tmp_path / 'r18.safetensors'
    safetensors.torch.save_file(src.state_dict(), str(path))
    with caplog.at_level(logging.WARNING):
        model = timm_hff.create_model('resnet18', pretrained=True, num_classes=10, check_img_size=64,
                                      pretrained_cfg_overlay=dict(file=str(path)))
    notes = [r.getMessage() for r in caplog.records if 'prototype heads' in r.getMessage()]
    assert len(notes) == 1 and 'new and untrained' in notes[0] and '\n' not in notes[0]
    pcfg = model.pretrained_cfg
    assert not {'hf_hub_id', 'tag', 'paper_ids', 'origin_url', 'license', 'file'} & set(pcfg)
    assert pcfg['num_classes'] == 10 and pcfg['classifier'] == 'heads' and pcfg['mean'] == src.pretrained_cfg['mean']
    assert pcfg['backbone_pretrained']['architecture'] == 'resnet18'
    assert 'backbone_pretrained' not in timm_hff.create_model('resnet18', num_classes=10).pretrained_cfg


def test_export_does_not_inherit_timms_checkpoint_and_cards_the_accuracy(tmp_path):
    model = _exportable(check_img_size=32)
    metrics = dict(top1=87.5, top1_stage0=80.0, top1_stage1=86.25, split='test',
                   dataset='zalando-datasets/fashion_mnist')
    out = export_timm(model, tmp_path / 'plain', metrics=metrics)
    cfg = json.loads((Path(out) / 'config.json').read_text())
    assert not {'tag', 'paper_ids', 'paper_name', 'origin_url', 'license', 'hf_hub_id'} & set(cfg['pretrained_cfg'])
    card = ModelCard.load(str(Path(out) / 'README.md'))
    assert 'top-1 86.25% on the test split' in card.text
    assert card.data.eval_results[0].metric_value == 86.25 and card.data.eval_results[0].dataset_split == 'test'
