"""The cut's mechanism: forward hooks on the taps that hand each stage output on and send a detached copy downstream,
and ``run_stages``, one forward of the backbone's own ``forward_features`` + ``forward_head(pre_logits=True)`` with
them active, so no gradient crosses a stage boundary. One mechanism for sequential CNNs, NHWC models and token models.
"""
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from ._stages import SplitError, StageSplit, family_of

__all__ = ['install_cuts', 'run_stages', 'run_stages_checked', 'take_rows']


class _StopForward(Exception):
    """Raised inside the last needed tap to end the backbone's forward early (early exit, greedy stage)."""


class _CutState:
    """What the tap hooks do right now: only cut (default), or also hand stage outputs to ``run_stages``.

    ``elements[k]`` says which tensor of a tuple-returning tap (pit, efficientvim, crossvit) is the stage output
    the head sees; the probe picks it by matching ``forward_intermediates``. Every tensor of the tuple is cut.
    """

    def __init__(self, num_taps: int = 0):
        self.outputs: Optional[List[torch.Tensor]] = None
        self.raw: Optional[List[object]] = None   # the probe's view of what each tap returned
        self.on_stage: Optional[Callable[[int, torch.Tensor], None]] = None
        self.route: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None
        self.drained = False   # every row left the batch (adaptive exit): the forward ended early on purpose
        self.hff_forward = True   # the last forward was HFF's own (run_stages), not a plain timm forward
        self.keep = True          # run_stages returns the stage outputs (else each is dropped once handled)
        self.last = -1
        self.elements: List[int] = [0] * num_taps


_TENSOR = (torch.Tensor, torch.fx.Proxy)   # a Proxy while torch.fx traces the model (timm's fx feature extraction)


class _TapHook:
    """Forward hook ending stage k: inside HFF's forward the downstream model sees a detached copy of the stage output.

    It stays installed for the model's life, so gradient checkpointing's recompute (which runs after the forward,
    during backward) sees the same cut graph as the forward did. Outside HFF's forward it passes the output through
    untouched: ``model.backbone`` handed back to timm trains end to end (a recompute during backward repeats what the
    last forward did). A callable object rather than a closure, so ``copy.deepcopy`` of the model (EMA) rebinds it
    to the copy's state.
    """

    def __init__(self, state: _CutState, k: int, name: str, family: str):
        self.state, self.k, self.name, self.family = state, k, name, family

    def __call__(self, module, args, output):
        st = self.state
        if st.outputs is None:
            if torch._C._current_graph_task_id() == -1:   # a plain forward of the backbone, not during a backward
                st.hff_forward = False
            if not st.hff_forward:
                return output
        else:
            st.hff_forward = True
        if isinstance(output, _TENSOR):
            main, cut = output, output.detach()
        elif isinstance(output, (tuple, list)) and any(isinstance(o, _TENSOR) for o in output):
            cut = type(output)(o.detach() if isinstance(o, _TENSOR) else o for o in output)
            main = output[self.state.elements[self.k]]
        else:
            raise SplitError(f"timm family '{self.family}': tap '{self.name}' returns {type(output).__name__}, "
                             f"not a tensor, so it cannot end a stage")
        if st.outputs is not None and len(st.outputs) == self.k:   # first run in a capture (not a recompute)
            if st.raw is not None:
                st.raw.append(output)
            st.outputs.append(main)
            if st.on_stage is not None:
                st.on_stage(self.k, main)
            if st.route is not None and self.k < st.last:
                rows = st.route(self.k, main)
                if rows is not None:
                    if rows.numel() == 0:
                        st.drained = True
                        raise _StopForward
                    cut = take_rows(cut, rows, main.shape[0])
            if not st.keep:
                st.outputs[self.k] = None   # handled: the next stages must not carry it
            if self.k >= st.last:
                raise _StopForward
        return cut


def take_rows(output, rows: torch.Tensor, batch: int):
    """The rows of a tap output that go on: every tensor whose first dim is the batch (all of a tuple's, as they
    all flow downstream), in the tensor's own memory format (a channels_last model stays channels_last)."""
    if isinstance(output, torch.Tensor):
        if output.ndim == 0 or output.shape[0] != batch:
            return output
        return output[rows]   # advanced indexing keeps channels_last (index_select would return NCHW)
    if isinstance(output, (tuple, list)):
        return type(output)(take_rows(o, rows, batch) for o in output)
    return output


def install_cuts(backbone: nn.Module, split: StageSplit) -> None:
    """Hook every tap so that no gradient crosses a stage boundary (idempotent)."""
    if split.state is not None:
        return
    split.state = _CutState(len(split.tap_names))
    family = family_of(backbone)
    for k, name in enumerate(split.tap_names):
        backbone.get_submodule(name).register_forward_hook(_TapHook(split.state, k, name, family))


def run_stages(
        backbone: nn.Module,
        split: StageSplit,
        x: torch.Tensor,
        on_stage: Optional[Callable[[int, torch.Tensor], None]] = None,
        stop_after: Optional[int] = None,
        raw: Optional[List[object]] = None,
        route: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None,
        keep: bool = True,
) -> List[Optional[torch.Tensor]]:
    """One forward pass of the backbone, cut into stages.

    Args:
        on_stage: Called as ``on_stage(k, h_k)`` as soon as stage k's output exists, before stage k+1 runs
            (``memory_efficient`` training runs stage k's backward there, freeing its graph).
        stop_after: Stop the forward after this stage (early exit, or a greedy schedule's active stage).
        raw: If given, collects what each tap returned (a tensor or a tuple), for the build-time probe.
        route: Adaptive exit. Called as ``route(k, h_k)`` after ``on_stage`` at every stage but the last; returns
            the rows of the current batch that go on (a 1-D index tensor) or None for all. Only those rows run
            the later stages, so the batch shrinks and the forward ends once no row is left. Later outputs hold
            only the surviving rows.
        keep: Return the stage outputs. False drops each one as soon as ``on_stage`` (and ``route``) are done with
            it, so a later stage never carries an earlier stage's output (memory_efficient training, scoring).

    Returns:
        The stage outputs h_k, each still attached to its own stage's graph (the next stage saw a detached copy);
        fewer than asked for when ``route`` let every row leave.
    """
    install_cuts(backbone, split)
    st = split.state
    if st.outputs is not None:
        raise RuntimeError('run_stages is not re-entrant: a forward of this model is already running')
    last = split.num_stages - 1 if stop_after is None else stop_after
    outputs: List[torch.Tensor] = []
    st.outputs, st.on_stage, st.last, st.raw, st.route, st.drained = outputs, on_stage, last, raw, route, False
    st.keep = keep
    try:
        feats = backbone.forward_features(x)
        if split.full_tail:
            pooled = backbone.forward_head(feats, pre_logits=True)
            outputs.append(pooled)
            if on_stage is not None:
                on_stage(split.num_stages - 1, pooled)
            if not keep:
                outputs[-1] = None
    except _StopForward:
        pass
    finally:
        drained = st.drained
        st.outputs, st.on_stage, st.last, st.raw, st.route, st.drained = None, None, -1, None, None, False
    if len(outputs) != last + 1 and not drained:
        missing = split.tap_names[len(outputs)] if len(outputs) < len(split.tap_names) else 'forward_head'
        raise SplitError(f"timm family '{family_of(backbone)}': stage {len(outputs)} (tap '{missing}') never ran "
                         f"in forward_features, so the model cannot be cut there")
    return outputs


def run_stages_checked(backbone: nn.Module, split: StageSplit, x: torch.Tensor, model_name: str = '',
                       **kwargs) -> List[torch.Tensor]:
    """``run_stages``, with a one-line ValueError when the backbone cannot take this input size.

    Which sizes a backbone accepts (a fixed-size patch embedding, a stem larger than a tiny image) is only
    known by running it, so the backbone's own error is translated here, at the model's input boundary,
    instead of being predicted up front. Only failures of the backbone at a size other than the one the build
    checked are translated; errors raised by ``on_stage`` (a head, a backward) and out-of-memory pass as is.
    """
    failed_in_callback = []

    def guard(fn):
        def guarded(k: int, h: torch.Tensor):
            try:
                return fn(k, h)
            except BaseException:
                failed_in_callback.append(k)
                raise
        return guarded if fn is not None else None

    for key in ('on_stage', 'route'):
        kwargs[key] = guard(kwargs.get(key))
    try:
        return run_stages(backbone, split, x, **kwargs)
    except (RuntimeError, AssertionError) as e:
        checked = split.probe_img_size
        if failed_in_callback or isinstance(e, torch.OutOfMemoryError) or tuple(x.shape[-2:]) == (checked,) * 2:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{model_name or type(backbone).__name__} cannot take a "
                         f"{x.shape[-2]}x{x.shape[-1]} input ({msg}); it was built and checked at "
                         f"{checked}x{checked}: resize the images, or build the model for this size "
                         f"(img_size / check_img_size)") from None
