"""Build what ``config.json`` describes without memory, and hold it against the weights header before building it.

``config.json`` decides what gets built, and anyone can write it: ``num_classes: 50000000`` asks for 25.6 GB of
prototypes, a huge ``check_img_size`` for a probe image of terabytes, a deep ``layers`` list for a million blocks.
The safetensors header already says how large every tensor is, and safetensors checks that the file holds exactly
those bytes. So before anything real is allocated:

1. the prototypes the config implies are compared with the header's (no build at all: the 50-million-class case);
2. the whole model is built on the meta device (shapes only), under a guard that stops it once it registers far
   more modules or tensors than the header has, or once the build-time probe would hold more activation memory
   than ``probe_budget`` allows;
3. its state_dict (names, shapes, dtype kinds) must be the header's, and its cut the saved one.

Only then is the model built for real, which allocates what the header implies plus the probe (bounded in 2.). A
library ``ValueError`` raised while building (a bad stage index, exit thresholds for another stage count) is passed
on unchanged; anything else that a bad value makes timm or torch raise becomes a one-line ``ConfigError``.
"""
import os
import traceback
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core import short_repr
from ..heads import HEADS
from ..model import HFFModel, MetaValues
from ._errors import ConfigError, ResourceLimitError, ShapeMismatchError, one_line
from ._format import CONFIG_NAME, WEIGHTS_NAME, SavedConfig
from ._weights import FLOAT_DTYPES, Header

__all__ = ['PACKAGE', 'PROBE_ENV', 'PROBE_FLOOR_MB', 'check_head_shapes', 'check_shapes', 'check_state', 'dry_build',
           'probe_budget', 'translate_errors']

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_FLOOR_MB = 512        # activation memory any model may use to probe its cut, on top of 8x its weights
PROBE_ENV = 'HFF_MAX_PROBE_MB'
_TORCH_DTYPES = {'BOOL': torch.bool, 'U8': torch.uint8, 'I8': torch.int8, 'I16': torch.int16, 'I32': torch.int32,
                 'I64': torch.int64}


def probe_budget(header: Header) -> int:
    """Bytes the meta build may hold at once: 512 MiB + 8x the weights, or ``HFF_MAX_PROBE_MB`` if set.

    The real build runs the same probe (a batch of two at ``check_img_size``), so its activations are bounded too.
    A model whose probe legitimately needs more (a heavy family at a high resolution) names the variable to raise.
    """
    env = os.environ.get(PROBE_ENV)
    if env:
        try:
            return int(float(env) * 2 ** 20)
        except ValueError:
            raise ValueError(f'{PROBE_ENV}={env!r} must be a number of MiB') from None
    return PROBE_FLOOR_MB * 2 ** 20 + 8 * header.data_bytes


def check_head_shapes(saved: SavedConfig, header: Header, where: str) -> None:
    """The head tensors whose shapes the settings and class count fix (``Head.class_tensor_shapes``: the prototype
    head's class count, prototypes per class and embedding width) against the header, before any build."""
    head = HEADS.get(saved.cfg.head)
    expected = head.class_tensor_shapes(saved.cfg, saved.num_classes) if head is not None else {}
    for name, (_, shape) in sorted(header.tensors.items()):
        parts = name.split('.')
        if parts[0] != 'heads' or parts[-1] not in expected or len(shape) != len(expected[parts[-1]][0]):
            continue
        want_shape, settings = expected[parts[-1]]
        want = [s if w is None else w for w, s in zip(want_shape, shape)]
        if list(shape) != want:
            raise ShapeMismatchError(
                f"{where}: tensor {short_repr(name, 120)} is {list(shape)} in {WEIGHTS_NAME} but {want} for the "
                f"{settings} of {CONFIG_NAME}; refused before building anything")


def dry_build(build: Callable[[], HFFModel], header: Header, where: str) -> HFFModel:
    """``build()`` on the meta device, within the guard; returns the meta model once it matches the header."""
    guard = _Guard(header, probe_budget(header))
    with translate_errors(where), guard.hooks(), torch.device('meta'), MetaValues(), guard:
        model = build()
    check_state(model, header, where)
    return model


def check_state(model: nn.Module, header: Header, where: str) -> None:
    """The model's state_dict against the header: the same names, shapes and kinds of dtype."""
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    check_shapes({k: s for k, (_, s) in expected.items()}, {k: s for k, (_, s) in header.tensors.items()}, where)
    for k, (dtype, _) in expected.items():
        saved = header.tensors[k][0]
        ok = saved in FLOAT_DTYPES if dtype.is_floating_point else _TORCH_DTYPES.get(saved) == dtype
        if not ok:
            raise ShapeMismatchError(f"{where}: tensor {short_repr(k, 120)} is {saved} in {WEIGHTS_NAME} but {dtype} "
                                     f"in the model built from {CONFIG_NAME}; the two files come from different models")


def check_shapes(expected: Dict[str, Tuple[int, ...]], saved: Dict[str, Tuple[int, ...]], where: str) -> None:
    """Names and shapes of the model against those of the weights; one line naming the first that differs."""
    bad = [(k, saved[k], want) for k, want in expected.items() if k in saved and tuple(saved[k]) != tuple(want)]
    if bad:
        k, got, want = bad[0]
        more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
        raise ShapeMismatchError(f"{where}: tensor {short_repr(k, 120)} is {list(got)} in {WEIGHTS_NAME} but "
                                 f"{list(want)} in the model built from {CONFIG_NAME}{more}; the two files come from "
                                 f"different models")
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        what = f"lacks '{missing[0]}'" if missing else f"has an unexpected tensor '{unexpected[0][:80]}'"
        raise ShapeMismatchError(f'{where}: {WEIGHTS_NAME} {what} ({len(missing)} missing, {len(unexpected)} '
                                 f'unexpected); {CONFIG_NAME} and {WEIGHTS_NAME} come from different models')


@contextmanager
def translate_errors(where: str) -> Iterator[None]:
    """Library errors pass on; what a bad value makes timm or torch raise becomes one ``ConfigError`` line."""
    try:
        yield
    except _Stop as e:
        raise ResourceLimitError(f'{where}: {e.args[0]}') from None
    except ValueError as e:
        if _raised_here(e) and '\n' not in str(e).strip():
            raise
        raise ConfigError(f'{where}: {CONFIG_NAME} describes a model that cannot be built '
                          f'({type(e).__name__}: {one_line(e)[:200]})') from None
    except (ArithmeticError, AssertionError, AttributeError, IndexError, KeyError, LookupError, MemoryError,
            NotImplementedError, RecursionError, RuntimeError, TypeError) as e:
        raise ConfigError(f'{where}: {CONFIG_NAME} describes a model that cannot be built '
                          f'({type(e).__name__}: {one_line(e)[:200]})') from None


def _raised_here(e: BaseException) -> bool:
    """Whether timm_hff itself raised ``e`` (its last frame is in the package), so its message is the library's."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE + os.sep)


class _Stop(BaseException):
    """Ends a dry build that outgrows its header. A BaseException, so that no ``except Exception`` on the way
    (timm's, or the probe's own) turns it into another error."""


class _Guard(TorchDispatchMode):
    """Counts what a meta build registers and holds, and stops it beyond what the header could back.

    Modules and tensors registered are bounded by a multiple of the header's tensor count (a model twice the
    header's size is already wrong; this only stops the runaway ones early and keeps the build's time and Python
    objects small). Bytes held are the live outputs of every operation, so the probe's activations are measured
    as the real build will hold them (autograd keeps what backward needs; the rest is freed).
    """

    def __init__(self, header: Header, budget: int):
        super().__init__()
        n = len(header.tensors)
        self.max_modules, self.max_tensors, self.max_ops = 8 * n + 2000, 4 * n + 1000, 400 * n + 100_000
        self.modules = self.tensors = self.ops = self.live = self.peak = 0
        self.budget, self.header = budget, header

    @contextmanager
    def hooks(self) -> Iterator[None]:
        from torch.nn.modules import module as m
        handles = [m.register_module_module_registration_hook(self._on_module),
                   m.register_module_parameter_registration_hook(self._on_tensor),
                   m.register_module_buffer_registration_hook(self._on_tensor)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _on_module(self, *args) -> None:
        self.modules += 1
        if self.modules > self.max_modules:
            raise _Stop(f'{CONFIG_NAME} describes a model of more than {self.max_modules} modules, but '
                        f'{WEIGHTS_NAME} holds {len(self.header.tensors)} tensors; refused before allocating')

    def _on_tensor(self, *args) -> None:
        self.tensors += 1
        if self.tensors > self.max_tensors:
            raise _Stop(f'{CONFIG_NAME} describes a model of more than {self.max_tensors} tensors, but '
                        f'{WEIGHTS_NAME} holds {len(self.header.tensors)}; refused before allocating')

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if self.ops > self.max_ops:
            raise _Stop(f'building what {CONFIG_NAME} describes takes more than {self.max_ops} tensor operations '
                        f'for the {len(self.header.tensors)} tensors of {WEIGHTS_NAME}; refused')
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and not t._is_view():
                    n = t.numel() * t.element_size()
                    self.live += n
                    weakref.finalize(t, self._free, n)
                    if self.live > self.budget:
                        raise _Stop(f'building what {CONFIG_NAME} describes would hold over '
                                    f'{self.live / 2 ** 20:,.0f} MiB at once (its weights are '
                                    f'{self.header.data_bytes / 2 ** 20:,.1f} MiB; the limit is '
                                    f'{self.budget / 2 ** 20:,.0f} MiB, e.g. a huge check_img_size); if you trust '
                                    f'this model, raise {PROBE_ENV}')
        return out
