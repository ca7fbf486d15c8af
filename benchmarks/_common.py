"""Shared pieces of the benchmarks: model presets, the three methods' builders and train steps, timing on CPU
and CUDA, FLOP counts, Fashion-MNIST tensors, and atomic writing of the Markdown / JSON / PNG outputs.

Every benchmark takes the same runtime flags (``--quick``, ``--device``, ``--out``, ``--threads``, ``--seed``);
on CUDA the runtime defaults to bf16 autocast and channels_last, and times with CUDA events.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_hff
from timm_hff.baselines import FFConfig, accumulated_backward, create_bp_model, create_ff_model

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
ACCUM_DEFAULT = 4   # micro-batches of the plain 'bp_accum' row


def split_accum(method: str) -> Tuple[str, int]:
    """(method, micro-batches) of a row name: ``<method>_accum<N>`` steps once after N micro-batches of the batch,
    each backpropagated at once (so one micro-batch's activations are alive at a time); ``bp_accum`` is BP's 4."""
    row = ROWS.get(method)
    if row is not None and row.micro_batches > 1:
        return row.of, row.micro_batches
    head, sep, tail = method.rpartition('_accum')
    return (head, int(tail)) if sep and tail.isdigit() and int(tail) > 1 else (method, 1)


def method_label(method: str) -> str:
    base, k = split_accum(method)
    if method in METHOD_LABELS or base not in METHOD_LABELS:
        return METHOD_LABELS.get(method, method)
    return f'{METHOD_LABELS[base]} + accumulation ({k} micro-batches)'


@dataclass(frozen=True)
class ModelSpec:
    """One backbone at one input size, built identically for HFF, FF and BP."""
    arch: str
    img_size: int
    in_chans: int = 3
    small_input: bool = False
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)

    def hff_kwargs(self) -> Dict[str, Any]:
        return dict(small_input=self.small_input, check_img_size=self.img_size, **self.timm_kwargs)

    def describe(self) -> str:
        extra = ', '.join(f'{k}={v}' for k, v in self.timm_kwargs.items())
        stem = ', small-input stem' if self.small_input else ''
        return f'{self.arch} @ {self.img_size}px, {self.in_chans}ch{stem}' + (f' ({extra})' if extra else '')


# Presets: a narrow ResNet-18 for quick runs on 2 CPU cores, ResNet-18 at 28/32 px (and ResNet-18-D's deep stem at
# 32 px), ResNet-50 at 64/112/224 px.
PRESETS: Dict[str, ModelSpec] = {
    'tiny_resnet_28': ModelSpec('resnet18', 28, 1, True, dict(channels=(16, 32, 64, 128))),
    'resnet18_28': ModelSpec('resnet18', 28, 1, True),
    'resnet18_32': ModelSpec('resnet18', 32, 3, True),
    'resnet18d_32': ModelSpec('resnet18d', 32, 3, True),     # a deep 3-conv stem at full resolution (small_input)
    'resnet50_64': ModelSpec('resnet50', 64, 3, False),
    'resnet50_112': ModelSpec('resnet50', 112, 3, False),
    'resnet50_224': ModelSpec('resnet50', 224, 3, False),
}


def get_spec(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise ValueError(f'unknown model preset {name!r}; choose from {sorted(PRESETS)}')
    return PRESETS[name]


# ----- runtime: device, precision, layout, timing -----
@dataclass
class Runtime:
    """Where and how the benchmark runs; on CUDA: bf16 autocast, channels_last, CUDA-event timing."""
    device: torch.device
    amp: bool
    channels_last: bool
    autocast_cache: bool = True   # off for a step captured as a CUDA graph (a cached cast must not outlive it)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == 'cuda'

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=self.autocast_cache)

    def no_autocast(self):
        """For backward passes that run inside a forward (memory_efficient, accumulation): autocast off."""
        return torch.autocast(self.device.type, enabled=False) if self.amp else contextlib.nullcontext()

    def model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        return f"{self.device.type}{', bf16 autocast' if self.amp else ', fp32'}" \
               f"{', channels_last' if self.channels_last else ''}"


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument('--quick', action='store_true', help='small sizes: a few minutes on 2 CPU cores')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (GPU mode: bf16 autocast, channels_last)")
    parser.add_argument('--out', default=os.path.join(RESULTS_ROOT, name), help='output folder')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-amp', action='store_true', help='on CUDA, run in fp32 instead of bf16 autocast')
    parser.add_argument('--no-channels-last', action='store_true', help='on CUDA, keep NCHW')


def make_runtime(args: argparse.Namespace) -> Runtime:
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda was given but no CUDA device is available; use --device cpu')
    if device.type not in ('cpu', 'cuda'):
        raise SystemExit(f"--device must be 'cpu' or 'cuda', got {args.device!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, amp=cuda and not args.no_amp, channels_last=cuda and not args.no_channels_last)


def mode_of(args: argparse.Namespace) -> str:
    """Size table to use: 'quick', 'cuda' (full GPU set) or 'full' (CPU)."""
    if args.quick:
        return 'quick'
    return 'cuda' if torch.device(args.device).type == 'cuda' else 'full'


def time_calls(fn: Callable[[], Any], runtime: Runtime, warmup: int = 1, iters: int = 5,
               min_time: float = 0.0, max_iters: int = 1000) -> List[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then at least ``iters`` timed calls (more until
    ``min_time`` seconds have passed). CUDA calls are timed with CUDA events, CPU calls with perf_counter."""
    for _ in range(warmup):
        fn()
    runtime.sync()
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start_all < min_time and len(times) < max_iters):
        if runtime.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by PyTorch's FlopCounterMode (matmul/conv only, as usual)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


# ----- the methods on one backbone -----
def build_hff(spec: ModelSpec, num_classes: int, **hff_kwargs: Any) -> nn.Module:
    return timm_hff.create_model(spec.arch, num_classes=num_classes, in_chans=spec.in_chans,
                                 **{**spec.hff_kwargs(), **hff_kwargs})


def build_bp(spec: ModelSpec, num_classes: int, grad_checkpointing: bool = False, split=None) -> nn.Module:
    return create_bp_model(spec.arch, num_classes=num_classes, in_chans=spec.in_chans,
                           small_input=spec.small_input, grad_checkpointing=grad_checkpointing, split=split,
                           **spec.timm_kwargs)


def build_ff(spec: ModelSpec, num_classes: int, ff_cfg: Optional[FFConfig] = None) -> nn.Module:
    return create_ff_model(spec.arch, num_classes=num_classes, in_chans=spec.in_chans, ff_cfg=ff_cfg,
                           **spec.hff_kwargs())


# Stages of the 'balanced' rows: block-boundary cuts with equal saved activations (HFFConfig balance='memory').
BALANCED_STAGES = 6
# The cheap-head row: each head's aux block runs on the stage output average-pooled to 7x7 (HFFConfig aux_size),
# the setting the Fashion-MNIST greedy recipe chose on validation, instead of at the stage's full resolution.
CHEAP_AUX_SIZE = 7


def _build_hff(row: 'Row', spec: ModelSpec, num_classes: int, **kwargs: Any) -> nn.Module:
    model = build_hff(spec, num_classes, **dict(row.hff, **kwargs))
    if row.grad_checkpointing:   # checkpointing inside each stage; still freed one by one
        model.set_grad_checkpointing(True)
    if row.compiled:   # block by block, the cuts stay eager (timm_hff.compile_model)
        from timm_hff import compile_model
        compile_model(model)
    return model


def _hff_loss(row: 'Row', model: nn.Module, x: torch.Tensor, y: torch.Tensor, backward_fn) -> torch.Tensor:
    """memory_efficient calls ``backward_fn`` on each stage's loss inside the forward; simultaneous leaves it unused."""
    return model(x, y, mode=row.mode, backward_fn=backward_fn, stages=row.stages).loss


@dataclass(frozen=True)
class Family:
    """How a family of rows builds its model, computes its loss and (BP) accumulates micro-batches."""
    build: Callable[..., nn.Module]
    loss: Callable[..., torch.Tensor]
    accumulate: Optional[Callable[..., torch.Tensor]] = None


HFF = Family(_build_hff, _hff_loss)
BP = Family(lambda row, spec, n, **kw: build_bp(spec, n, grad_checkpointing=row.grad_checkpointing),
            lambda row, model, x, y, backward_fn: F.cross_entropy(model(x), y), accumulated_backward)
FF = Family(lambda row, spec, n, **kw: build_ff(spec, n, **kw), lambda row, model, x, y, backward_fn: model.loss(x, y))


@dataclass(frozen=True)
class Row:
    """A benchmark row: what its name builds and how its step runs, read as attributes (no row name is compared)."""
    label: str
    family: Family
    mode: str = 'simultaneous'             # HFF's training mode
    hff: Dict[str, Any] = field(default_factory=dict)   # HFFConfig settings over the preset's
    grad_checkpointing: bool = False
    compiled: bool = False
    stages: Optional[Tuple[int, ...]] = None   # HFF: train only these stages (a memory diagnostic)
    micro_batches: int = 1                 # a fixed micro-batch count ('bp_accum'), over row ``of``
    of: str = ''
    graphed: str = ''                      # the eager row a CUDA-graph row captures (time only)


_ME, _BALANCED = dict(mode='memory_efficient'), dict(balance='memory', num_stages=BALANCED_STAGES)
ROWS = {
    'hff_simultaneous': Row('HFF simultaneous', HFF),
    'hff_memory_efficient': Row('HFF memory_efficient', HFF, **_ME),
    'hff_me_ckpt': Row('HFF memory_efficient + checkpointing', HFF, grad_checkpointing=True, **_ME),
    'hff_balanced': Row('HFF memory_efficient, balanced cut', HFF, hff=_BALANCED, **_ME),
    'hff_balanced_ckpt': Row('HFF memory_efficient, balanced cut + checkpointing', HFF, hff=_BALANCED,
                             grad_checkpointing=True, **_ME),
    'hff_balanced_cheap': Row('HFF memory_efficient, balanced cut, aux on a 7x7 map', HFF,
                              hff=dict(_BALANCED, aux_size=CHEAP_AUX_SIZE), **_ME),
    'hff_compiled': Row('HFF simultaneous, torch.compile', HFF, compiled=True),
    'bp': Row('BP', BP),
    'bp_ckpt': Row('BP + checkpointing', BP, grad_checkpointing=True),
    'bp_accum': Row('BP + accumulation', BP, micro_batches=ACCUM_DEFAULT, of='bp'),
    'ff': Row('FF', FF),
    # memory diagnostics (train_cost): HFF's stage 1 alone, the floor of memory_efficient; and without aux blocks
    'hff_stage1': Row('HFF stage 1 alone (floor of memory_efficient)', HFF, stages=(0,), **_ME),
    'hff_me_noaux': Row("HFF memory_efficient, aux='none'", HFF, hff=dict(aux='none'), **_ME),
}
# CUDA-graph rows (time only): their eager row, captured whole (train_cost --cuda-graphs)
ROWS.update({f'{eager}_graphed': dataclasses.replace(ROWS[eager], label=f'{ROWS[eager].label}, CUDA graph',
                                                     graphed=eager)
             for eager in ('hff_simultaneous', 'hff_balanced', 'bp')})
METHOD_LABELS = {name: row.label for name, row in ROWS.items()}


def _row(method: str) -> 'Row':
    row = ROWS.get(split_accum(method)[0])
    if row is None:
        raise ValueError(f'unknown method {method!r}; choose from {sorted(ROWS)}')
    return row


def build_for_method(method: str, spec: ModelSpec, num_classes: int, **kwargs: Any) -> nn.Module:
    row = _row(method)
    return row.family.build(row, spec, num_classes, **kwargs)


def make_train_step(method: str, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime,
                    accum_steps: int = 4) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimisation step of ``method`` on a batch; returns the detached loss.

    Autocast covers forward passes only; backward passes that run inside a forward (HFF memory_efficient,
    accumulation) switch it off, as a loss computed under autocast is meant to be backpropagated outside it.
    """
    def backward(loss: torch.Tensor) -> None:
        with runtime.no_autocast():
            loss.backward()

    row, micro = _row(method), split_accum(method)[1]
    if method in ROWS and ROWS[method].micro_batches > 1:   # 'bp_accum': the caller's count
        micro = accum_steps

    def losses(x: torch.Tensor, y: torch.Tensor, backward_fn) -> torch.Tensor:
        """The row's loss on (x, y); a loss that still requires grad is backpropagated by the caller."""
        return row.family.loss(row, model, x, y, backward_fn)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            if micro > 1 and row.family.accumulate is not None:
                loss = row.family.accumulate(model, x, y, micro, backward_fn=backward)
            elif micro > 1:   # each micro-batch's backward (scaled by its share) before the next one's forward
                total = 0.0
                for xs, ys in zip(x.tensor_split(micro), y.tensor_split(micro)):
                    share = xs.shape[0] / x.shape[0]
                    part = losses(xs, ys, lambda l, share=share: backward(l * share))
                    if part.requires_grad:
                        backward(part * share)
                    total = total + part.detach() * share
                loss = total
            else:
                loss = losses(x, y, backward)
        if loss.requires_grad:
            loss.backward()
        optimizer.step()
        return loss.detach()
    return step


# ----- data -----
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def load_fashion_mnist(train_subset: Optional[int] = None, test_subset: Optional[int] = None, seed: int = 0,
                       root: Optional[str] = None):
    """Fashion-MNIST as normalised float tensors (N, 1, 28, 28) and int64 labels, optionally a random subset.

    The whole set is 47 MB as uint8, so it is held in memory (and on the GPU) instead of going through a
    DataLoader: the benchmark then measures the methods, not the input pipeline.
    """
    from timm_hff.data import FASHION_MNIST_DIR, load_idx_arrays
    root = root or FASHION_MNIST_DIR
    out = []
    g = torch.Generator().manual_seed(seed)
    for split, subset in (('train', train_subset), ('test', test_subset)):
        images, labels = load_idx_arrays(root, split)
        x = torch.from_numpy(images.copy())
        y = torch.from_numpy(labels.copy())
        if subset is not None and subset < len(y):
            idx = torch.randperm(len(y), generator=g)[:subset]
            x, y = x[idx], y[idx]
        out += [x, y]
    return tuple(out)


def normalize_images(x_uint8: torch.Tensor) -> torch.Tensor:
    return ((x_uint8.float() / 255.) - FMNIST_MEAN).div_(FMNIST_STD).unsqueeze(1)


# ----- outputs -----
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f'{v:.3g}' if abs(v) < 100 else f'{v:,.0f}'
        return str(v)
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def machine_info(runtime: Runtime) -> Dict[str, Any]:
    import timm
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                timm=timm.__version__, timm_hff=timm_hff.__version__, cpu=cpu_name(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), runtime=runtime.describe())
    if runtime.is_cuda:
        info['gpu'] = torch.cuda.get_device_name(runtime.device)
    return info


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def machine_line(info: Dict[str, Any]) -> str:
    where = info.get('gpu') or f"{info['cpu']} ({info['torch_threads']} torch threads of {info['cpu_count']} cores)"
    return f"{where}; {info['runtime']}; torch {info['torch']}, timm {info['timm']}"


def _atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path), suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_outputs(out_dir: str, markdown: str, payload: Dict[str, Any], figure=None) -> Dict[str, str]:
    """Write results.md, results.json and (if a matplotlib figure is given) plot.png, each atomically."""
    paths = dict(markdown=os.path.join(out_dir, 'results.md'), json=os.path.join(out_dir, 'results.json'))
    _atomic_write_bytes(paths['markdown'], (markdown.rstrip() + '\n').encode())
    _atomic_write_bytes(paths['json'], (json.dumps(payload, indent=2, default=_json_default) + '\n').encode())
    if figure is not None:
        buf = io.BytesIO()
        figure.savefig(buf, format='png', dpi=120, bbox_inches='tight')
        paths['plot'] = os.path.join(out_dir, 'plot.png')
        _atomic_write_bytes(paths['plot'], buf.getvalue())
        import matplotlib.pyplot as plt
        plt.close(figure)
    return paths


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.device, torch.dtype)):
        return str(o)
    if hasattr(o, '__dataclass_fields__'):
        return asdict(o)
    return str(o)


def new_figure(ncols: int = 1, width: float = 5.5, height: float = 4.0):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def verdict(ok: bool) -> str:
    return 'met' if ok else 'MISSED'
