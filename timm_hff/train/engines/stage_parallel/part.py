"""One stage of an HFF model run on its own, from the previous stage's output instead of the image.

A stage-parallel process holds the whole model but trains stage k only, and its input arrives from the process of
stage k-1. timm's ``forward_features`` / ``forward_head`` keep the control flow between blocks (and any functional
step between them), so the forward still runs them, but the modules of the earlier stages are replaced, on this
process's model only, by stubs: the module that ends stage k-1 returns the received tensors, every earlier module
that holds no tap returns zeros of the shape it returned in a probe run, and taps of earlier stages do the same
(their hooks still fire, so ``run_stages`` sees every stage in order). Nothing of an earlier stage is computed.

The plan is read from one probe forward (which module runs when, and what it returns) and checked on a probe batch:
stage k from the true stage k-1 output must equal the full forward. A model where skipping a module changes stage
k (a value computed before the cut and used after it) falls back to running the earlier stages on a zero image,
which is slower but exact; if that differs too, the cut cannot run apart and the error says so.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ....model import run_stages

__all__ = ['Layout', 'PROBE_BATCH', 'StagePart', 'TensorSpec', 'flatten', 'spec_of']

PROBE_BATCH = 3   # not 2: a batch of two is too easily mistaken for another dimension of size two


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a hand-off without its batch dimension: what a receiver allocates before the data arrives.

    The layout is not part of it: a stage output's strides depend on the data (a one-channel image batch may come out
    of the loader channels_last), so each message carries the sender's strides and the receiver rebuilds the tensor
    with exactly those (the next stage then runs the very kernels it runs in a single process).
    """
    shape: Tuple[int, ...]   # without the batch dimension
    dtype: torch.dtype

    def numel(self, batch: int) -> int:
        return batch * math.prod(self.shape)

    def wire(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(``t``'s memory as one flat tensor, its strides): no copy when ``t`` is dense, whatever its layout."""
        t = t.detach()
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
        if not _dense(t):
            t = t.contiguous()
        return t.as_strided((t.numel(),), (1,), t.storage_offset()), torch.tensor(t.stride(), dtype=torch.int64)

    def unwire(self, flat: torch.Tensor, strides: Sequence[int], batch: int) -> torch.Tensor:
        return flat.as_strided((batch,) + self.shape, tuple(int(s) for s in strides))


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill one block of memory (any order of dimensions): it can be sent as that block."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n > 1), key=lambda ns: ns[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def spec_of(t: torch.Tensor, batch: int) -> TensorSpec:
    if t.ndim == 0 or t.shape[0] != batch:
        raise ValueError(f'a stage hands on a tensor of shape {tuple(t.shape)}, which does not lead with the batch '
                         f'({batch}); stage_parallel cannot send it: use schedule simultaneous')
    return TensorSpec(tuple(t.shape[1:]), t.dtype)


# ----- structures: a tap returns a tensor or a tuple of tensors and constants -----
def flatten(value) -> List[torch.Tensor]:
    """The tensors of a tap output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten(v)]
    return []


class Layout:
    """The shape of a tap output (a tensor, or a tuple / list of tensors and constants) with one ``TensorSpec`` per
    tensor: rebuilds the structure from received tensors, or placeholders of any batch size."""

    def __init__(self, value, batch: int):
        self.specs: List[TensorSpec] = []
        self.tree = self._read(value, batch)

    def _read(self, value, batch: int):
        if isinstance(value, torch.Tensor):
            self.specs.append(spec_of(value, batch))
            return ('t', len(self.specs) - 1)
        if isinstance(value, (tuple, list)):
            return ('seq', type(value), [self._read(v, batch) for v in value])
        if value is None or isinstance(value, (int, float, bool, str)):
            return ('const', value)
        raise ValueError(f'a stage hands on a {type(value).__name__}, which stage_parallel cannot send; use schedule '
                         f'simultaneous')

    def build(self, tensors: Sequence[torch.Tensor]):
        return self._build(self.tree, tensors)

    def _build(self, node, tensors):
        if node[0] == 't':
            return tensors[node[1]]
        if node[0] == 'seq':
            return node[1](self._build(n, tensors) for n in node[2])
        return node[1]

    def zeros(self, batch: int, device) -> Any:
        return self.build([torch.zeros((batch,) + s.shape, dtype=s.dtype, device=device) for s in self.specs])


# ----- the probe: which module runs when -----
def _record_calls(backbone: nn.Module, split, x: torch.Tensor) -> Tuple[Dict[str, list], Dict[str, Any]]:
    """One full forward of the cut model: (module name -> [(start, end) event indices of each call], module name ->
    the ``Layout`` of its first call's output, or None)."""
    names = {m: n for n, m in backbone.named_modules() if n}
    calls: Dict[str, list] = {}
    outputs: Dict[str, Any] = {}
    clock, starts = [0], {}

    def pre(module, args):
        clock[0] += 1
        starts.setdefault(module, []).append(clock[0])

    def post(module, args, output):
        clock[0] += 1
        name = names[module]
        calls.setdefault(name, []).append((starts[module].pop(), clock[0]))
        if name not in outputs:
            try:
                outputs[name] = Layout(output, len(x))
            except ValueError:
                outputs[name] = None   # nothing a placeholder can stand in for: the module is never skipped

    handles = []
    for m in names:
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            run_stages(backbone, split, x)
    finally:
        for h in handles:
            h.remove()
    return calls, outputs


class _Stub:
    """A module's forward on a stage-parallel process: the received stage input, or placeholders."""

    def __init__(self, part: 'StagePart', layout: Optional[Layout]):
        self.part, self.layout = part, layout

    def __call__(self, *args, **kwargs):
        if self.layout is None:
            return self.part.input
        return self.part.placeholder(self.layout)


class StagePart:
    """Runs stage ``k`` of ``model`` from the previous stage's output (``k`` = 0: from images, unchanged).

    Call ``install()`` once; then ``run(inp, batch)`` returns (the stage output with its graph, what its tap handed
    downstream). ``input_layout`` describes what this stage receives, ``output_layout`` what it hands on.
    """

    def __init__(self, model: nn.Module, k: int, img_size: Tuple[int, int], device, autocast,
                 channels_last: bool = False):
        self.model, self.k, self.device, self.autocast = model, k, device, autocast
        self.channels_last = channels_last
        self.img_shape = (model.in_chans,) + tuple(img_size)
        self.input = None
        self.mode = 'full' if k == 0 else None
        self._zeros: Dict[Tuple[int, int], Any] = {}
        self._images: Dict[int, torch.Tensor] = {}
        self._installed: List[nn.Module] = []
        split = model.split
        gen = torch.Generator(device=device).manual_seed(0)   # the global RNG stays the data pipeline's
        x = torch.randn(PROBE_BATCH, *self.img_shape, device=device, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        was_training = model.training
        model.eval()
        try:
            with autocast():
                self.calls, self.layouts_by_module = _record_calls(model.backbone, split, x)
                raw: List[Any] = []
                with torch.no_grad():
                    self.ref = run_stages(model.backbone, split, x, raw=raw)
                    self.ref_logits = [model.heads[j](h) for j, h in enumerate(self.ref)]
        finally:
            model.train(was_training)
        self.ref_raw = raw
        self.layouts = [Layout(r, PROBE_BATCH) for r in raw]   # what each tap hands downstream
        self.logit_spec = [spec_of(lg, PROBE_BATCH) for lg in self.ref_logits]

    @property
    def input_layout(self) -> Optional[Layout]:
        return self.layouts[self.k - 1] if self.k else None

    @property
    def output_layout(self) -> Optional[Layout]:
        return self.layouts[self.k] if self.k < len(self.layouts) else None

    # ----- which modules a stage-k process does not run -----
    def skip_plan(self) -> Dict[str, Optional[Layout]]:
        """module name -> placeholder layout (None: returns the received input) for the modules stage k skips."""
        taps = list(self.model.split.tap_names[:self.k])
        end = self.calls[taps[-1]][0][1]
        plan: Dict[str, Optional[Layout]] = {taps[-1]: None}
        for t in taps[:-1]:
            plan[t] = self.layouts[taps.index(t)]
        skipped: List[str] = []
        for name, _ in self.model.backbone.named_modules():
            if not name or name in plan or any(name.startswith(s + '.') for s in skipped + taps):
                continue
            if any(t.startswith(name + '.') for t in taps):   # holds a tap: its children are looked at instead
                continue
            calls, layout = self.calls.get(name), self.layouts_by_module.get(name)
            if not calls or len(calls) != 1 or calls[0][1] > end or layout is None:
                continue   # runs after the cut too, or returns what a placeholder cannot stand in for
            plan[name] = layout
            skipped.append(name)
        return plan

    def install(self, check: bool = True) -> str:
        """Stub the earlier stages (``mode`` 'skip'; 'zeros' if skipping changes stage k); returns the mode."""
        if self.k == 0:
            return self.mode
        for mode in ('skip', 'zeros'):
            plan = self.skip_plan() if mode == 'skip' else {self.model.split.tap_names[self.k - 1]: None}
            self._stub(plan)
            self.mode = mode
            if not check or self._matches():
                return mode
            self.uninstall()
        raise ValueError(f'stage {self.k + 1} of {self.model.model_name or type(self.model.backbone).__name__} does '
                         f'not reproduce the full forward when it runs apart from the earlier stages (a value crosses '
                         f'the cut outside the stage output); cut elsewhere (hff.stage_indices) or use schedule '
                         f'simultaneous')

    def _stub(self, plan: Dict[str, Optional[Layout]]) -> None:
        for name, layout in plan.items():
            module = self.model.backbone.get_submodule(name)
            module.forward = _Stub(self, layout)
            self._installed.append(module)

    def uninstall(self) -> None:
        for module in self._installed:
            del module.forward
        self._installed.clear()
        self._zeros.clear()

    def _matches(self) -> bool:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                h, _ = self.run(self.ref_raw[self.k - 1], PROBE_BATCH)
        except Exception:   # a skipped module whose output something else needed in another form
            return False
        finally:
            self.model.train(was_training)
        ref = self.ref[self.k]
        return h.shape == ref.shape and torch.allclose(h.float(), ref.float(), rtol=1e-5, atol=1e-6)

    # ----- running -----
    def placeholder(self, layout: Layout):
        key = (id(layout), self.batch)
        if key not in self._zeros:
            self._zeros[key] = layout.zeros(self.batch, self.device)
        return self._zeros[key]

    def run(self, inp, batch: int):
        """(stage k's output with its graph, the structure its tap hands downstream or None for the last stage).
        ``inp`` is the image batch for stage 0, else what stage k-1 handed on."""
        self.batch = batch
        if self.k == 0:
            x = inp
        else:
            self.input = inp
            x = self._image(batch)
        raw: List[Any] = []
        last = self.k == self.model.num_stages - 1
        with self.autocast():
            outs = run_stages(self.model.backbone, self.model.split, x, stop_after=self.k, raw=None if last else raw)
        self.input = None
        return outs[self.k], (None if last else raw[self.k])

    def _image(self, batch: int) -> torch.Tensor:
        """A zero image batch for the backbone's forward to start from (its first modules are stubs, or, in 'zeros'
        mode, compute on it without consequence)."""
        if batch not in self._images:
            x = torch.zeros(batch, *self.img_shape, device=self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._images[batch] = x
        return self._images[batch]
