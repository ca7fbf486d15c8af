"""A run's own state (optimizer, scheduler, grad scaler, RNG) in safetensors files, never a pickle.

A checkpoint folder is as untrusted as a model folder: a colleague's run, a shared disk, a download. Unpickling one
can run any code, so the state timm_hff writes itself is one safetensors file per object: its tensors, and the rest
of the object (numbers, strings, lists, tuples, dicts) as JSON in the file's metadata. Reading checks the file as a
saved model's weights are checked (``hub.read_weights``), rebuilds the object, and holds it against what this run
expects before anything uses it: another structure, dtype or shape, a number that is not finite or out of range, is a
one-line ``CorruptCheckpointError`` naming the file, not a failure many steps later.
"""
import json
import math
import os
import random
from typing import Any, Dict, List

import numpy as np
import torch

from .checkpoint import state_error

__all__ = ['check_accelerate_state', 'check_optimizer_state', 'check_torch_file', 'load_state_file',
           'load_tensors_file', 'match_state', 'save_state_file']

_META_KEY = 'timm_hff_state'
_MAX_DEPTH = 32
_MAX_NODES = 2_000_000
_MAX_INT = 2 ** 63   # what an int64 tensor or a C long holds; beyond it no state number of torch or numpy is sane


def save_state_file(obj: Any, path: str) -> None:
    """Write ``obj`` (tensors, numpy arrays, numbers, strings, None, lists, tuples, dicts) as one safetensors file."""
    from safetensors.torch import save_file
    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    save_file(tensors, path, metadata={'format': 'pt', _META_KEY: json.dumps(tree)})


def load_state_file(path: str, like: Any = None) -> Any:
    """The object a ``save_state_file`` wrote, read without unpickling and, with ``like``, matched against it
    (``match_state``). A pickle, a damaged file or a foreign structure raises one line naming the file."""
    tensors, meta = _read(path)
    if meta is None:
        raise state_error(path, 'is a safetensors file without timm_hff state in its metadata')
    try:
        tree = json.loads(meta)
    except (ValueError, RecursionError):
        raise state_error(path, 'holds metadata that is not valid JSON') from None
    obj = _decode(tree, tensors, path, 0, [0])
    if like is not None:
        match_state(obj, like, path)
    return obj


def load_tensors_file(path: str, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A safetensors file of named tensors (weights, an EMA) holding exactly ``like``'s names, dtypes and shapes."""
    tensors, _ = _read(path)
    match_state(tensors, like, path, 'its tensors')
    return tensors


def _read(path: str):
    """(tensors, timm_hff state metadata or None) of a safetensors file, checked as a saved model's weights are."""
    import safetensors
    from ..hub import CheckpointError, UnsafeCheckpointError, read_weights
    if not os.path.isfile(path):
        raise state_error(path, 'is missing')
    try:
        tensors = read_weights(path, where=path)
        with safetensors.safe_open(path, framework='pt') as f:
            return tensors, (f.metadata() or {}).get(_META_KEY)
    except UnsafeCheckpointError:
        raise state_error(path, 'is a pickle, which timm_hff never opens (unpickling can run any code)') from None
    except CheckpointError:
        raise state_error(path, 'is truncated or corrupted (not a whole safetensors file)') from None
    except Exception as e:   # safetensors' own error type for a header it cannot parse
        raise state_error(path, f'cannot be read ({type(e).__name__})') from None


def _encode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f't{len(tensors)}'
        tensors[key] = obj.detach().to('cpu', copy=True).contiguous()
        return {'T': key}
    if isinstance(obj, np.ndarray):
        key = f't{len(tensors)}'
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {'N': key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {'U': [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return {'L': [_encode(v, tensors) for v in obj]}
    if isinstance(obj, dict):
        for k in obj:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f'state dict key {k!r} is not a JSON scalar')
        return {'D': [[k, _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f'cannot write {type(obj).__name__} as run state (tensors, arrays, numbers, strings and '
                    f'containers only)')


def _decode(node: Any, tensors: Dict[str, torch.Tensor], path: str, depth: int, nodes: List[int]) -> Any:
    nodes[0] += 1
    if depth > _MAX_DEPTH or nodes[0] > _MAX_NODES:
        raise state_error(path, 'nests its state deeper or wider than any run state')
    if node is None or isinstance(node, (bool, str)):
        return node
    if isinstance(node, (int, float)):
        return _number(node, path)
    if not (isinstance(node, dict) and len(node) == 1):
        raise state_error(path, f'holds a {type(node).__name__} where its state format has a tagged node')
    (tag, value), = node.items()
    if tag in ('T', 'N'):
        if not isinstance(value, str) or value not in tensors:
            raise state_error(path, f'names a tensor {str(value)[:40]!r} it does not hold')
        t = tensors[value]
        return t.numpy() if tag == 'N' else t
    if tag in ('U', 'L') and isinstance(value, list):
        items = [_decode(v, tensors, path, depth + 1, nodes) for v in value]
        return tuple(items) if tag == 'U' else items
    if tag == 'D' and isinstance(value, list):
        out = {}
        for item in value:
            if not (isinstance(item, list) and len(item) == 2 and (item[0] is None or isinstance(
                    item[0], (bool, int, float, str)))):
                raise state_error(path, 'holds a dict entry that is not a [key, value] pair')
            out[item[0]] = _decode(item[1], tensors, path, depth + 1, nodes)
        return out
    raise state_error(path, f'holds an unknown node {str(tag)[:20]!r}')


def _number(x, path: str):
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= _MAX_INT:
        raise state_error(path, f'holds the number {str(x)[:30]}..., beyond what any run state holds')
    return x


def _kind(v) -> str:
    """The type that must agree between a saved value and this run's (an int may stand where a float is)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return 'bool'
    if isinstance(v, (int, float)):
        return 'number'
    if isinstance(v, torch.Tensor):
        return 'tensor'
    if isinstance(v, np.ndarray):
        return 'array'
    if isinstance(v, dict):   # an OrderedDict state_dict is read back as a dict
        return 'dict'
    return type(v).__name__


def match_state(got: Any, like: Any, path: str, at: str = 'state') -> None:
    """``got`` has ``like``'s structure: the same types, dict keys and lengths, tensors of the same dtype and shape,
    finite numbers where ``like``'s are finite."""
    if _kind(got) != _kind(like):
        raise state_error(path, f'holds a {_kind(got)} at {at} where this run has a {_kind(like)}')
    if isinstance(like, (torch.Tensor, np.ndarray)):
        if got.dtype != like.dtype or tuple(got.shape) != tuple(like.shape):
            raise state_error(path, f'holds {at} as {got.dtype} {list(got.shape)} where this run has {like.dtype} '
                                    f'{list(like.shape)}')
        return
    if isinstance(like, dict):
        if set(got) != set(like):
            other = sorted(map(str, set(got) ^ set(like)))[:3]
            raise state_error(path, f'holds other entries at {at} than this run ({", ".join(other)})')
        for k in like:
            match_state(got[k], like[k], path, f'{at}.{k}')
    elif isinstance(like, (list, tuple)):
        if len(got) != len(like):
            raise state_error(path, f'holds {len(got)} items at {at} where this run has {len(like)}')
        for i, (g, v) in enumerate(zip(got, like)):
            match_state(g, v, path, f'{at}[{i}]')
    elif _kind(like) == 'number' and math.isfinite(float(like)) and not math.isfinite(float(got)):
        raise state_error(path, f'holds {got} at {at}, where this run has a finite number')


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, path: str) -> None:
    """A saved optimizer state that fits ``optimizer``: its parameter groups (this run's entries, the same
    parameters), and per parameter, finite numbers and tensors shaped from the parameter's own dimensions (the
    parameter's shape, a scalar, Adafactor's row / column statistics, Kron's preconditioners). torch checks only the
    group sizes; a moment of another shape would fail, or broadcast, steps later."""
    mine = optimizer.state_dict()
    if not (isinstance(state, dict) and set(mine) <= set(state) <= set(mine) | {'state', 'param_groups'}):
        raise state_error(path, 'is not an optimizer state (state / param_groups)')
    match_state({k: v for k, v in state.items() if k not in ('state', 'param_groups')},
                {k: v for k, v in mine.items() if k not in ('state', 'param_groups')}, path)
    groups, per_param = state['param_groups'], state['state']
    if not isinstance(groups, list) or len(groups) != len(mine['param_groups']):
        raise state_error(path, f'holds {len(groups) if isinstance(groups, list) else "no"} parameter groups where '
                                f'this run has {len(mine["param_groups"])}')
    shapes: Dict[int, torch.Size] = {}
    for i, (g, m) in enumerate(zip(groups, mine['param_groups'])):
        # a step may add an entry (Lamb's and Adan's group 'step'), never remove one
        if not isinstance(g, dict) or not set(m) <= set(g) or len(g) > len(m) + 4 or g.get('params') != m['params']:
            raise state_error(path, f'holds a parameter group {i} with other entries or parameters than this run\'s')
        for key, value in g.items():
            if key != 'params':
                _check_value(value, None, path, f'param_groups[{i}].{key}')
        shapes.update({pid: p.shape for pid, p in zip(m['params'], optimizer.param_groups[i]['params'])})
    if not isinstance(per_param, dict) or not set(per_param) <= set(shapes):
        raise state_error(path, 'holds state for parameters this run does not have')
    for pid, entry in per_param.items():
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise state_error(path, f'holds a state of parameter {pid} that is not a dict of named values')
        for key, value in entry.items():
            _check_value(value, shapes[pid], path, f'state[{pid}].{key}')


def _check_value(v: Any, shape, path: str, at: str, depth: int = 0) -> None:
    """An optimizer value: None, a bool, a string, a finite number, a tensor (with ``shape``: one shaped from the
    parameter's dimensions; without: a single number), or a short list / tuple of those."""
    if isinstance(v, (list, tuple)):
        if len(v) > 8 or depth > 2:
            raise state_error(path, f'holds {at} as a list of {len(v)} values where an optimizer keeps a few')
        for x in v:
            _check_value(x, shape, path, at, depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        raise state_error(path, f'holds {at} = {v}, which is not finite')
    elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= _MAX_INT:
        raise state_error(path, f'holds {at} = {str(v)[:30]}..., beyond what an optimizer counts')
    elif isinstance(v, torch.Tensor):
        _check_tensor(v, shape, path, at)
    elif not (v is None or isinstance(v, (bool, int, float, str))):
        raise state_error(path, f'holds {at} of type {type(v).__name__}')


def _check_tensor(t: torch.Tensor, shape, path: str, at: str) -> None:
    if shape is None:
        ok = t.numel() == 1
    elif t.dim() == len(shape) and t.numel() == math.prod(shape):
        ok = tuple(t.shape) == tuple(shape)   # the parameter's size but another layout: transposed or permuted
    else:
        ok = t.dim() <= max(len(shape), 2) and all(d == 1 or d in shape for d in t.shape)
    if not ok:
        raise state_error(path, f'holds {at} of shape {list(t.shape)} for a parameter of shape '
                                f'{list(shape) if shape is not None else "()"}')
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise state_error(path, f'holds {at} with values that are not finite')


def check_torch_file(path: str) -> Any:
    """A file Accelerate wrote with ``torch.save``, loaded as Accelerate loads it (``weights_only=True``: tensors,
    numbers, containers and numpy arrays, no other class) after checking it is a zip whose entries are stored, not
    compressed, and no larger than the file (a compressed entry could expand beyond any memory)."""
    import zipfile
    from accelerate.utils import load
    if not os.path.isfile(path):
        raise state_error(path, 'is missing')
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise state_error(path, 'is not a torch.save file (not a whole zip; a bare pickle is never opened)') from None
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos) or sum(i.file_size for i in infos) > \
            os.path.getsize(path):
        raise state_error(path, 'holds compressed or oversized entries, which torch.save never writes')
    try:
        return load(path, map_location='cpu', weights_only=True)
    except Exception as e:   # UnpicklingError for a class outside the allow-list; RuntimeError for a damaged zip
        raise state_error(path, f'cannot be loaded without unpickling code or is damaged ({type(e).__name__})') \
            from None


def check_accelerate_state(ckpt: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           num_processes: int) -> None:
    """The files ``accelerator.save_state`` wrote, checked before ``accelerator.load_state`` reads them, so each
    problem is one line naming its file: the model's weights as safetensors with this model's tensors (``model``: the
    prepared one, whose names Accelerate saves), the optimizer state fitting this optimizer, one RNG state per
    process."""
    weights = os.path.join(ckpt, 'model.safetensors')
    if not os.path.isfile(weights):
        raise state_error(weights, 'is missing (timm_hff checkpoints hold the weights as safetensors only)')
    from accelerate.utils.other import clean_state_dict_for_safetensors   # as save_state drops tied copies
    load_tensors_file(weights, clean_state_dict_for_safetensors(model.state_dict()))
    path = os.path.join(ckpt, 'optimizer.bin')
    check_optimizer_state(check_torch_file(path), optimizer, path)
    like = dict(random_state=random.getstate(), numpy_random_seed=np.random.get_state(),
                torch_manual_seed=torch.get_rng_state())
    for i in range(num_processes):
        path = os.path.join(ckpt, f'random_states_{i}.pkl')
        got = check_torch_file(path)
        if not isinstance(got, dict) or not set(like) <= set(got):
            raise state_error(path, 'is not an RNG state of Accelerate (random / numpy / torch)')
        match_state({k: got[k] for k in like}, like, path)
