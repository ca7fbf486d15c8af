"""``cuda_graphs: true``: the whole training step (every stage's forward, local losses and backward, clipping, the
optimizer step) captured once as a CUDA graph and replayed for each batch.

Why: an HFF step on a GPU is short and bound by kernel launches. Each stage adds a head and (``memory_efficient``) a
backward of its own: many small kernels whose launch and Python cost exceed their arithmetic, which is why HFF steps
slower than backprop on a GPU at equal FLOPs. One graph replay launches them all at once. The benchmarks capture BP's
step the same way (``benchmarks/train_cost.py --cuda-graphs``), so the ratio compares like with like.

What a graph needs, and how it is met here:

- static memory: the batch is copied into buffers captured with the graph; the losses a step returns are the graph's
  own tensors, overwritten by the next replay (read them before that);
- nothing read on the host inside the step (``.item()``, ``if tensor``, boolean masks, ``nonzero``, copies between
  host and device): the first warm-up step is checked op by op (``host_syncs``), so a step that cannot be captured
  stops with one line naming the op and the source line rather than a CUDA capture error;
- an optimizer step on the device, learning rate included: torch's fused SGD / Adam / AdamW (Adam's also
  ``capturable``), each group's lr a device tensor while the graph runs, into which the scheduler's value is written
  before each replay (a float would be baked into the graph at capture);
- warm-up steps before capture (lazy initialisation, cuDNN's algorithm search, optimizer state), which are real
  training steps, on a side stream as torch's whole-network capture recipe does;
- a new capture when what the step does changes (``key``): another trained stage (``sequential``), other frozen
  parameters (``head_warmup_epochs``), other train / eval modes. A batch of another shape (an epoch's last, smaller
  batch) runs eagerly and keeps the graph.

Autocast's weight-cast cache is off under ``cuda_graphs`` (the trainer's ``AutocastKwargs``), as torch asks of
autocast inside graphed callables: a cached cast would outlive the region it was captured in. What refuses it (one
line each): no CUDA device, several processes (DDP), fp16's loss scaler (it reads an overflow flag on the host),
gradient accumulation, ``torchcompile``, gradient checkpointing, ``stage_parallel``, and optimizers without a
device-side step.
"""
import contextlib
import os
import traceback
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ..graph_settings import CAPTURABLE_OPTIMIZERS, check_settings, optimizer_kwargs

__all__ = ['CAPTURABLE_OPTIMIZERS', 'CapturedStep', 'CudaGraph', 'GraphCaptureError', 'check_device', 'check_settings',
           'host_syncs', 'optimizer_kwargs']

WARMUP_STEPS = 3   # eager steps before each capture (torch's recipe uses a few; DDP would need 11)


class GraphCaptureError(ValueError):
    """The training step does something a CUDA graph cannot replay (found before capture)."""


# ----- the run -----
def check_device(device: torch.device, num_processes: int) -> None:
    """Refusals only the run knows: the device, the process count."""
    if device.type != 'cuda':
        raise ValueError(f'cuda_graphs: true captures the training step as CUDA graphs, but this run is on '
                         f'{device.type}: drop cuda_graphs (or run on a CUDA device)')
    if num_processes > 1:
        raise ValueError(f'cuda_graphs captures one process\'s step; this run has {num_processes} processes (DDP), '
                         f'whose gradient all-reduce is not captured here: drop cuda_graphs or run one process')


# ----- what cannot be captured -----
def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or ()))


def _crosses_devices(func, args, kwargs) -> bool:
    name = func._schema.name
    if name == 'aten::_to_copy' and 'device' in kwargs and kwargs['device'] is not None:
        return torch.device(kwargs['device']).type != args[0].device.type
    if name == 'aten::copy_' and isinstance(args[1], torch.Tensor):
        return args[0].device.type != args[1].device.type
    return False


_SYNC_OPS = {
    'aten::_local_scalar_dense': 'reads a tensor value on the host (.item(), float(), bool(), an if on a tensor)',
    'aten::is_nonzero': 'reads a tensor value on the host (an if on a tensor)',
    'aten::equal': 'compares tensors on the host (torch.equal)',
    'aten::nonzero': 'sizes a tensor by its values (nonzero)',
    'aten::masked_select': 'sizes a tensor by its values (masked_select)',
    'aten::_unique2': 'sizes a tensor by its values (unique)',
    'aten::unique_dim': 'sizes a tensor by its values (unique)',
    'aten::unique_consecutive': 'sizes a tensor by its values (unique_consecutive)',
}


def _sync_reason(func, args, kwargs) -> Optional[str]:
    name = func._schema.name
    if name in _SYNC_OPS:
        return _SYNC_OPS[name]
    if name in ('aten::index', 'aten::index_put', 'aten::index_put_') and _bool_index(args):
        return 'indexes with a boolean mask (its size depends on the values)'
    if (name == 'aten::repeat_interleave' and kwargs.get('output_size') is None
            and func._overloadname in ('Tensor', 'self_Tensor')):
        return 'sizes a tensor by its values (repeat_interleave without output_size)'
    if _crosses_devices(func, args, kwargs):
        return 'copies between host and device'
    if _mixes_devices(args):
        return 'mixes host and device tensors (a hidden copy, e.g. an index tensor on the CPU)'
    return None


def _mixes_devices(args) -> bool:
    """A device tensor beside a CPU tensor that is more than a scalar (0-d CPU tensors pass as numbers, uncopied)."""
    flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    return (any(t.device.type not in ('cpu', 'meta') for t in flat)
            and any(t.device.type == 'cpu' and t.ndim > 0 for t in flat))


def _where() -> str:
    """The innermost frame outside torch and this file: the line that asked for the op."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(torch_dir) and frame.filename != __file__:
            return f'{os.path.relpath(frame.filename) if not frame.filename.startswith("<") else frame.filename}' \
                   f':{frame.lineno} in {frame.name}'
    return 'inside torch'


def host_syncs(fn: Callable[[], Any]) -> Tuple[Any, List[Tuple[str, str, str]]]:
    """Run ``fn`` once, noting every op that would make the host wait for the device (or size a tensor by its
    values): (its result, [(op, why, where)]). Found on any device, so a CPU run tells whether a step can be
    captured on a GPU (copies between host and device show only where there is a device). Not seen: tensors made
    from Python data (``torch.tensor(..., device='cuda')`` dispatches no op) and reads inside a kernel; a capture then
    fails with torch's own error."""
    from torch.utils._python_dispatch import TorchDispatchMode
    found: List[Tuple[str, str, str]] = []

    class Finder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            why = _sync_reason(func, args, kwargs)
            if why is not None:
                found.append((func._schema.name, why, _where()))
            return func(*args, **kwargs)

    with Finder():
        out = fn()
    return out, found


# ----- the graph -----
class CudaGraph:
    """The device side: warm-up on a side stream, capture (``torch.cuda.graph``), replay. Each method also gets the
    ``CapturedStep`` (unused here), so a stand-in backend (tests) can act on its buffers as a graph would."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def warm(self, fn: Callable[[], Any], step: 'CapturedStep') -> Any:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], Any], step: 'CapturedStep') -> Any:
        """Record ``fn`` on the warm-up stream (as torch's own graphed callables do) and run it once (capture alone
        runs nothing)."""
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may call CUDA while the step is being captured
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode='thread_local'):
            out = fn()
        self.graph.replay()
        return out

    def replay(self, step: 'CapturedStep') -> None:
        self.graph.replay()


def _momentum_buffers(optimizer, params) -> None:
    """Zero momentum buffers for trainable parameters that have none yet. Fused SGD takes every buffer or none: a
    parameter that starts getting gradients later (the backbone after ``head_warmup_epochs``) beside others that
    have one fails in its kernel. With no dampening a zero buffer gives the unfused first step (buffer = gradient)."""
    inner = getattr(optimizer, 'optimizer', optimizer)   # Accelerate's wrapper
    trainable = {id(p) for p in params if p.requires_grad}
    for group in inner.param_groups:
        if not group.get('fused') or not group.get('momentum') or group.get('dampening', 0) != 0:
            continue
        for p in group['params']:
            if id(p) in trainable and inner.state[p].get('momentum_buffer') is None:
                inner.state[p]['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)


class CapturedStep:
    """A training step as a replayed CUDA graph.

    ``step(fn, inputs, key)``: ``fn(*inputs)`` does one whole training step (forward, backward, optimizer step) and
    returns its losses (tensors, possibly nested in tuples / lists). The first ``WARMUP_STEPS`` calls of a ``key`` run
    it eagerly; the next captures it on static copies of ``inputs``; later calls of that key and input shape copy
    their batch into the copies and replay. Gradients are not zeroed between replays: they were None when the step was
    captured, so each replay writes them afresh, as torch's whole-network recipe relies on.

    ``counts``: how many calls warmed up, captured, replayed, or ran eagerly beside a graph (another batch shape).
    """

    def __init__(self, optimizer, params: Sequence[torch.nn.Parameter], device: torch.device,
                 backend: Optional[Callable[[torch.device], Any]] = None, warmup: Optional[int] = None):
        self.optimizer, self.params, self.device = optimizer, list(params), torch.device(device)
        self.make_backend = backend or CudaGraph
        self.warmup = WARMUP_STEPS if warmup is None else warmup
        if self.warmup < 1:   # the optimizer's lazy state (Adam's moments, SGD's buffers) must exist before capture
            raise ValueError(f'CapturedStep needs at least one warm-up step before capture, got warmup={self.warmup}')
        self.counts = dict(warmup=0, capture=0, replay=0, eager=0)
        self.lrs: List[torch.Tensor] = []   # each group's lr on the device, kept for every graph of the run
        self._reset(None)

    def _reset(self, key) -> None:
        self.key, self.shapes, self.warmed = key, None, 0
        self.backend = None          # set by the capture: a graph exists
        self._warming = None         # the backend (its side stream) of the warm-up steps
        self.static_inputs: List[torch.Tensor] = []
        self.static_outputs: Any = None
        self.grads: List[Optional[torch.Tensor]] = []

    @staticmethod
    def _shapes(inputs) -> Tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)

    def __call__(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor], key: Any = ()) -> Any:
        shapes = self._shapes(inputs)
        key = (key, len(self.optimizer.param_groups))   # a new group would read no lr tensor of the graph
        if key != self.key:   # the step itself changed: drop the graph (and its memory pool), warm up again
            self._reset(key)
        if self.shapes is None:   # the graph is for the shape of the key's first batch (an epoch's full one)
            self.shapes = shapes
        if shapes != self.shapes:
            return self._eager(fn, inputs)
        if self.warmed < self.warmup:
            return self._warm(fn, inputs)
        if self.backend is None:
            return self._capture(fn, inputs, shapes)
        for static, t in zip(self.static_inputs, inputs):
            static.copy_(t, non_blocking=True)
        self._write_lrs()
        self.backend.replay(self)
        self.counts['replay'] += 1
        return self.static_outputs

    # ----- the three ways a step runs -----
    def _warm(self, fn, inputs):
        self.optimizer.zero_grad(set_to_none=True)
        _momentum_buffers(self.optimizer, self.params)
        if self._warming is None:
            self._warming = self.make_backend(self.device)
        backend, first = self._warming, self.warmed == 0
        with self._device_lrs():
            if first:   # what cannot be captured is found here, before the capture fails on it
                out, found = host_syncs(lambda: backend.warm(lambda: fn(*inputs), self))
                if found:
                    op, why, where = found[0]
                    more = f' (and {len(found) - 1} more)' if len(found) > 1 else ''
                    raise GraphCaptureError(f'cuda_graphs: the training step {why}: {op} at {where}{more}, which a '
                                            f'CUDA graph cannot replay; drop cuda_graphs or remove the host read')
            else:
                out = backend.warm(lambda: fn(*inputs), self)
        self.warmed += 1
        self.counts['warmup'] += 1
        return out

    def _capture(self, fn, inputs, shapes):
        backend = self._warming or self.make_backend(self.device)
        self.static_inputs = [t.clone() for t in inputs]
        self.optimizer.zero_grad(set_to_none=True)   # the captured backward then writes, not accumulates
        _momentum_buffers(self.optimizer, self.params)
        with self._device_lrs():
            self.static_outputs = backend.capture(lambda: fn(*self.static_inputs), self)
        self.grads = [p.grad for p in self.params]
        self.backend, self.shapes = backend, shapes
        self.counts['capture'] += 1
        return self.static_outputs

    def _eager(self, fn, inputs):
        """A batch of another shape than the graph's (before or after its capture): an ordinary step, then the
        graph's gradient tensors back where there is a graph."""
        self.optimizer.zero_grad(set_to_none=True)
        _momentum_buffers(self.optimizer, self.params)
        with self._device_lrs():
            out = fn(*inputs)
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.counts['eager'] += 1
        return out

    # ----- the learning rate as device tensors -----
    @contextlib.contextmanager
    def _device_lrs(self):
        """Each group's lr a device tensor while the step runs: captured, the kernels read it from memory. Eager
        steps (warm-up, another batch shape) take it so too, so that every step of a run has the same arithmetic
        (the fused kernels round a tensor lr otherwise than a float one)."""
        groups = self.optimizer.param_groups
        floats = [g['lr'] for g in groups]
        if len(self.lrs) != len(groups):
            self.lrs = [torch.tensor(float(v), dtype=torch.float32, device=self.device) for v in floats]
        else:
            self._write_lrs()
        for g, t in zip(groups, self.lrs):
            g['lr'] = t
        try:
            yield
        finally:   # outside the graph the lr stays the float the scheduler and the logs know
            for g, v in zip(groups, floats):
                g['lr'] = v

    def _write_lrs(self) -> None:
        """The scheduler's current lr into the tensors the graph reads (one fill per group, ordered before the
        replay on the stream; no host sync)."""
        for t, g in zip(self.lrs, self.optimizer.param_groups):
            t.fill_(float(g['lr']))
