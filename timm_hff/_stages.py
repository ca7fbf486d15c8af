"""Cutting a timm backbone into detached, locally trained stages.

The timm model stays the only owner of its parameters: a stage is not a module but a *tap*, a submodule named
by the backbone's ``feature_info`` whose output ends the stage. While ``run_stages`` runs the backbone's own
``forward_features`` + ``forward_head(pre_logits=True)``, a forward hook on each tap hands the stage output
(with its graph) to the caller and passes a detached copy downstream, so no gradient crosses a boundary. The
last stage runs through the backbone's own head path (pooling, head norm), which is what makes exporting to a
plain timm classifier exact. One mechanism covers sequential CNNs, NHWC models and token models alike.

At build time ``probe_split`` checks the cut on a batch of two: every tap must equal timm's own
``forward_intermediates`` (so the hooks sit on the right modules), and autograd's graph from each stage output
must reach a disjoint set of parameters (so the detach really cuts).

Over 400 lines because the cut is one mechanism: tap lookup, detach hooks, the small-input stem, the build-time
probe and the ownership check share private helpers over the same ``feature_info`` walk.
"""
import difflib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._config import HFFConfig


class SplitError(ValueError):
    """The backbone cannot be cut into HFF stages; the message names the timm family and why."""


class _StopForward(Exception):
    """Raised inside the last needed tap to end the backbone's forward early (early exit, greedy stage)."""


@dataclass
class StageSplit:
    """Where a backbone is cut, and what the build-time probe learned about each stage."""
    feature_indices: Tuple[Union[int, str], ...]   # feature_info index (or, for a finer cut, module name) per stage
    tap_names: Tuple[str, ...]                # modules whose output ends a stage (all but a full last stage)
    full_tail: bool                           # last stage runs through forward_head(pre_logits=True)
    layouts: List[str] = field(default_factory=list)      # 'NCHW' | 'NHWC' | 'NLC' | 'NC' per stage
    channels: List[int] = field(default_factory=list)
    reductions: List[int] = field(default_factory=list)
    num_prefix_tokens: int = 0
    stage_param_names: List[List[str]] = field(default_factory=list)
    unused_param_names: List[str] = field(default_factory=list)
    probe_img_size: int = 0                   # resolution the build-time probe ran at (known to work)
    state: Optional['_CutState'] = field(default=None, repr=False, compare=False)
    shrink_problem: Optional[str] = None      # why rows cannot leave mid-forward ('' once checked and fine)

    @property
    def num_stages(self) -> int:
        return len(self.feature_indices)


def family_of(backbone: nn.Module) -> str:
    """The timm module (family) a model comes from, for error messages."""
    return type(backbone).__module__.rsplit('.', 1)[-1]


def resolve_stage_indices(backbone: nn.Module, cfg: HFFConfig) -> Tuple[Union[int, str], ...]:
    """Turn ``cfg.stage_indices`` (or the default rule) into the cut points in forward order: ``feature_info``
    indices (int) and, for finer cuts, module names (str) of the backbone."""
    info = getattr(backbone, 'feature_info', None)
    if not info:
        raise SplitError(f"timm family '{family_of(backbone)}' ({type(backbone).__name__}) has no feature_info, "
                         f"so it has no stage boundaries to cut at")
    n = len(info)
    if cfg.stage_indices is not None:
        out: List[Union[int, str]] = []
        for i in cfg.stage_indices:
            if isinstance(i, str):
                out.append(_named_cut(backbone, i))
                continue
            if not -n <= i < n:
                raise ValueError(f'stage index {i} is out of range for {type(backbone).__name__}, which has {n} '
                                 f'feature_info taps (valid: 0..{n - 1} or -{n}..-1)')
            out.append(i % n)
        keys = [_cut_module(backbone, c) for c in out]
        if len(set(keys)) != len(keys):
            raise ValueError(f'stage_indices {tuple(cfg.stage_indices)} name the same tap twice')
        return tuple(c for _, c in sorted(zip(keys, out), key=lambda kc: _finish_order(backbone, kc[0])))
    reductions = [f['reduction'] for f in info]
    if len(set(reductions)) == 1:   # isotropic (ViT-style): evenly spaced blocks
        k = min(cfg.num_stages, n)
        return tuple(sorted({round((s + 1) * n / k) - 1 for s in range(k)}))
    last_per_level = [i for i in range(n) if i == n - 1 or reductions[i + 1] != reductions[i]]
    return tuple(last_per_level[-cfg.num_stages:])


def _finish_order(backbone: nn.Module, name: str) -> int:
    """Where a module's forward ends among the backbone's modules: after its last descendant (a parent is registered
    before its children but returns after them). Registration order is timm's forward order; a cut set that runs
    otherwise is caught by the probe ("never ran")."""
    last = -1
    for j, (n, _) in enumerate(backbone.named_modules()):
        if n == name or n.startswith(name + '.'):
            last = j
    return last


def _named_cut(backbone: nn.Module, name: str) -> Union[int, str]:
    """A module name given as a cut: its feature_info index when it is one of timm's taps, else the name itself."""
    name = name.strip()
    if name.startswith('backbone.'):   # as HFFModel.feature_info spells it
        name = name[len('backbone.'):]
    modules = dict(backbone.named_modules())
    if name not in modules or not name:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        hint = f' (close: {close})' if close else ''
        raise ValueError(f"stage_indices names module '{name}', which {type(backbone).__name__} does not have{hint}; "
                         f"cut at block boundaries named as in model.backbone.named_modules(), e.g. 'layer1.0'")
    hooked = _hookable(backbone, name)
    for i, f in enumerate(backbone.feature_info):
        resolved = _resolve_name(backbone, f['module'])
        if resolved is not None and _hookable(backbone, resolved) == hooked:
            return i
    return name


def _cut_module(backbone: nn.Module, cut: Union[int, str]) -> str:
    """The module whose output a cut point is (what its tap hook sits on)."""
    if isinstance(cut, int):
        resolved = _resolve_name(backbone, backbone.feature_info[cut]['module'])
        return _hookable(backbone, resolved) if resolved is not None else backbone.feature_info[cut]['module']
    return _hookable(backbone, cut)


def cut_name(backbone: nn.Module, cut: Union[int, str]) -> str:
    """A cut point as a module name: timm's ``feature_info`` module for an index, the name itself otherwise."""
    return backbone.feature_info[cut]['module'] if isinstance(cut, int) else cut


def build_split(backbone: nn.Module, cfg: HFFConfig) -> StageSplit:
    indices = resolve_stage_indices(backbone, cfg)
    names = [cut_name(backbone, c) for c in indices]
    full_tail = indices[-1] == len(backbone.feature_info) - 1
    taps = tuple(names[:-1]) if full_tail else tuple(names)
    return StageSplit(feature_indices=indices, tap_names=tuple(_hookable(backbone, n) for n in taps),
                      full_tail=full_tail)


def stem_split(backbone: nn.Module, cfg: HFFConfig) -> StageSplit:
    """The split whose first tap bounds ``small_input``'s stem adaptation: the cut itself, or with ``balance`` the
    default cut at the default stage count (``HFFConfig().num_stages``). A balanced cut re-cuts that one network
    whatever ``num_stages`` it asks for, at build and at load: with the cut's own count, 6 balanced stages of a ResNet
    would start from a stem tap, keep the stem's max-pool and train a network with a quarter of the FLOPs."""
    if cfg.balance is not None:
        from dataclasses import replace
        return build_split(backbone, replace(cfg, stage_indices=None, balance=None, check_split=False,
                                             num_stages=HFFConfig().num_stages))
    return build_split(backbone, cfg)


def _resolve_name(backbone: nn.Module, name: str) -> Optional[str]:
    """A ``feature_info`` module name as the model spells it, looked up leniently (None if it is not there).

    Names that timm's ``feature_info`` gets slightly wrong (relative to a wrapper, or 'block.0' for 'blocks.0') are
    accepted: ``probe_split`` verifies whatever is found.
    """
    for cand in (name, '.'.join([name.split('.')[0] + 's'] + name.split('.')[1:])):
        try:
            backbone.get_submodule(cand)
            return cand
        except AttributeError:
            matches = [n for n, _ in backbone.named_modules() if n.endswith('.' + cand)]
            if len(matches) == 1:
                return matches[0]
    return None


def _hookable(backbone: nn.Module, name: str) -> str:
    """The module to hook for a tap: the tap itself, or, for a container, its last block.

    timm's gradient checkpointing (``checkpoint_seq(..., flatten=True)``) calls a Sequential's blocks directly and
    never the container, and a ModuleList is never called at all, so a hook there would not fire; the last block's
    output is the same tensor.
    """
    resolved = _resolve_name(backbone, name)
    if resolved is None:
        raise SplitError(f"timm family '{family_of(backbone)}': feature_info names module '{name}', which "
                         f"is not in the model, so the stage cannot be tapped")
    name, module = resolved, backbone.get_submodule(resolved)
    while _plain_container(module) and len(module):
        child, module = list(module.named_children())[-1]
        name = f'{name}.{child}'
    return name


def _plain_container(module: nn.Module) -> bool:
    """A Sequential whose forward is Sequential's own (a subclass may concatenate, as densenets do), or a ModuleList."""
    if isinstance(module, nn.ModuleList):
        return True
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


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
        if isinstance(output, torch.Tensor):
            main, cut = output, output.detach()
        elif isinstance(output, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in output):
            cut = type(output)(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
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


def _params_reached(t: torch.Tensor) -> set:
    """ids of the leaf parameters that autograd would send gradient to from ``t``."""
    reached, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, 'variable', None)
        if var is not None:
            reached.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return reached


def _to_nchw(t: torch.Tensor, ref: torch.Tensor) -> Tuple[Optional[str], Optional[torch.Tensor], int]:
    """Match a tap output to timm's NCHW intermediate: (layout, tensor as NCHW, prefix tokens)."""
    if t.shape == ref.shape:
        return 'NCHW', t, 0
    if t.ndim == 4 and ref.ndim == 4 and t.permute(0, 3, 1, 2).shape == ref.shape:
        return 'NHWC', t.permute(0, 3, 1, 2), 0
    if t.ndim == 3 and ref.ndim == 4:
        b, c, h, w = ref.shape
        prefix = t.shape[1] - h * w
        if t.shape[0] == b and t.shape[2] == c and prefix >= 0:
            return 'NLC', t[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2), prefix
    return None, None, 0


def _reduction(img_size: int, spatial: int, nominal: int) -> int:
    """The stride that maps ``img_size`` to ``spatial``: timm's nominal one if it explains the size, else a power
    of two that does with padding (28 px -> 4 at stride 8), else the ratio."""
    for p in (nominal, *(2 ** i for i in range(8))):
        if math.ceil(img_size / p) == spatial:
            return p
    return max(1, round(img_size / spatial))   # e.g. patch 14


def _probe_run(backbone: nn.Module, split: StageSplit, x: torch.Tensor, img_size: int,
               raw: Optional[List[object]]) -> List[torch.Tensor]:
    """run_stages with grad on the probe batch; a model that rejects the batch size gets a one-line error."""
    try:
        with torch.enable_grad():
            return run_stages(backbone, split, x, raw=raw)
    except SplitError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{type(backbone).__name__} cannot run a {img_size}x{img_size} check image ({msg}); pass "
                         f"check_img_size (or timm's img_size) with a size this model accepts") from None


def _pick_element(output, ref: Optional[torch.Tensor]) -> int:
    """Index of the tensor in a tap's tuple output that equals timm's intermediate (else the first feature map)."""
    candidates = [i for i, o in enumerate(output) if isinstance(o, torch.Tensor) and o.ndim >= 3]
    if ref is not None:
        for i in candidates:
            layout, as_nchw, _ = _to_nchw(output[i].detach(), ref)
            if layout is not None and torch.allclose(as_nchw, ref, rtol=1e-4, atol=1e-4):
                return i
    return candidates[0] if candidates else 0


def _same_tokens_any_order(t: torch.Tensor, ref: torch.Tensor) -> Tuple[Optional[str], int]:
    """Tokens that hold the intermediate's feature vectors in another order (hiera's unrolled blocks).

    Per-token aux blocks and average pooling do not depend on token order, so such a tap is a valid stage end.
    Evidence: the first two moments of every channel agree.
    """
    if t.ndim != 3 or ref.ndim != 4:
        return None, 0
    b, c, h, w = ref.shape
    if t.shape[0] != b or t.shape[2] != c or t.shape[1] != h * w:
        return None, 0
    t = t.detach()
    for p in (1, 2):
        if not torch.allclose(t.pow(p).mean(1), ref.pow(p).mean((2, 3)), rtol=1e-4, atol=1e-4):
            return None, 0
    return 'NLC', 0


def _layout_from_info(t: torch.Tensor, num_chs: int) -> Tuple[str, int]:
    if t.ndim == 4 and t.shape[1] == num_chs:
        return 'NCHW', 0
    if t.ndim == 4 and t.shape[-1] == num_chs:
        return 'NHWC', 0
    if t.ndim == 3 and t.shape[-1] == num_chs:
        return 'NLC', 0
    if t.ndim == 2:
        return 'NC', 0
    raise SplitError(f'a stage output of shape {tuple(t.shape)} matches no known layout for {num_chs} channels')


def _level_of(backbone: nn.Module, name: str) -> Optional[Dict]:
    """The ``feature_info`` level a named module sits in (the level whose module is a prefix of its name)."""
    best = None
    for f in backbone.feature_info:
        level = _resolve_name(backbone, f['module']) or f['module']
        if (name == level or name.startswith(level + '.')) and (best is None or len(level) > len(best[0])):
            best = (level, f)
    return best[1] if best else None


def _nominal_reduction(backbone: nn.Module, cut: Union[int, str]) -> Optional[int]:
    if isinstance(cut, int):
        return backbone.feature_info[cut]['reduction']
    level = _level_of(backbone, cut)
    return level['reduction'] if level else None


def _cut_layout(backbone: nn.Module, cut: Union[int, str], t: torch.Tensor) -> Tuple[str, int]:
    """Layout of a tap output without a timm intermediate to compare with (checks off, or a named cut)."""
    if isinstance(cut, int):
        return _layout_from_info(t, backbone.feature_info[cut]['num_chs'])
    level = _level_of(backbone, cut)
    if level is not None:
        try:
            return _layout_from_info(t, level['num_chs'])
        except SplitError:
            pass   # a block inside the level with another width: decide from the model's format
    if t.ndim == 4:
        return ('NHWC' if getattr(backbone, 'output_fmt', 'NCHW') == 'NHWC' else 'NCHW'), 0
    if t.ndim == 3:
        return 'NLC', int(getattr(backbone, 'num_prefix_tokens', 0) or 0)
    if t.ndim == 2:
        return 'NC', 0
    raise SplitError(f"the output of '{cut}' has shape {tuple(t.shape)}, which is no feature map or token sequence; "
                     f"cut at a block boundary instead")


def probe_split(backbone: nn.Module, split: StageSplit, in_chans: int, img_size: int,
                check: bool = True) -> None:
    """Run a batch of two through the cut; learn each stage's layout, width, reduction and parameters.

    With ``check``, also assert that each tap equals ``forward_intermediates`` and that no parameter is
    reached from two stages. Raises SplitError naming the family when either fails.
    """
    family = family_of(backbone)
    was_training = backbone.training
    backbone.eval()
    x = torch.randn(2, in_chans, img_size, img_size)
    n_taps = len(split.tap_names)
    try:
        raw: List[object] = []
        outs = _probe_run(backbone, split, x, img_size, raw)
        tuple_taps = [k for k, r in enumerate(raw) if not isinstance(r, torch.Tensor)]
        refs: Optional[List[torch.Tensor]] = None
        info_taps = [k for k in range(n_taps) if isinstance(split.feature_indices[k], int)]
        if (check or tuple_taps) and info_taps and hasattr(backbone, 'forward_intermediates'):
            with torch.no_grad():
                try:
                    found = backbone.forward_intermediates(
                        x, indices=[split.feature_indices[k] for k in info_taps], intermediates_only=True)
                except Exception as e:  # a family whose forward_intermediates has other index semantics
                    raise SplitError(f"timm family '{family}': forward_intermediates failed on the stage taps "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            refs = [None] * n_taps   # named (finer) cuts have no timm intermediate to compare with
            for k, ref in zip(info_taps, found):
                refs[k] = ref
        if tuple_taps:   # pick the tensor of each tuple that is the stage output, then run again with it
            for k in tuple_taps:
                split.state.elements[k] = _pick_element(raw[k], refs[k] if refs is not None else None)
            outs = _probe_run(backbone, split, x, img_size, None)
        if not check:
            refs = None
    finally:
        backbone.train(was_training)

    info = backbone.feature_info
    layouts, channels, reductions, prefix_tokens = [], [], [], 0
    for k, t in enumerate(outs):
        if k == len(outs) - 1 and split.full_tail:
            layouts.append('NC')
            channels.append(t.shape[-1])
            # scale timm's nominal reduction by what the probe measured (small_input changes the stem)
            prev = _nominal_reduction(backbone, split.feature_indices[k - 1]) if k else None
            factor = reductions[-1] / prev if prev else 1
            reductions.append(max(1, round(info[split.feature_indices[k]]['reduction'] * factor)))
            continue
        if refs is not None and refs[k] is not None:
            layout, as_nchw, prefix = _to_nchw(t, refs[k])
            if layout is None or not torch.allclose(as_nchw, refs[k], rtol=1e-4, atol=1e-4):
                layout, prefix = _same_tokens_any_order(t, refs[k])
            if layout is None:
                raise SplitError(f"timm family '{family}': the output of tap '{split.tap_names[k]}' does not equal "
                                 f"forward_intermediates index {split.feature_indices[k]}, so the cut would be "
                                 f"wrong; this family is not supported")
            spatial = refs[k].shape[-1]
            chs = refs[k].shape[1]
        else:
            layout, prefix = _cut_layout(backbone, split.feature_indices[k], t)
            chs = t.shape[1] if layout == 'NCHW' else t.shape[-1]
            spatial = t.shape[-1] if layout == 'NCHW' else (t.shape[2] if layout == 'NHWC' else 0)
        layouts.append(layout)
        channels.append(int(chs))
        nominal = _nominal_reduction(backbone, split.feature_indices[k]) or 1
        reductions.append(_reduction(img_size, spatial, nominal) if spatial else nominal)
        prefix_tokens = max(prefix_tokens, prefix)

    names = {id(p): n for n, p in backbone.named_parameters()}
    owner: Dict[int, int] = {}
    stage_params: List[List[str]] = []
    for k, t in enumerate(outs):
        reached = _params_reached(t) & names.keys()
        if check:
            shared = [i for i in reached if i in owner]
            if shared:
                named = [c for c in split.feature_indices[:k + 1] if isinstance(c, str)]
                hint = (f" (a named cut must end a block, e.g. 'layer1.0', not sit inside one whose skip path "
                        f"bypasses it: check {named})" if named else '')
                raise SplitError(f"timm family '{family}': parameter '{names[shared[0]]}' gets gradient from "
                                 f"stages {owner[shared[0]]} and {k}; the detach at the stage boundary does not "
                                 f"cut this model's graph{hint}")
        for i in reached:
            owner.setdefault(i, k)
        stage_params.append(sorted(names[i] for i in reached))
    split.layouts, split.channels, split.reductions = layouts, channels, reductions
    split.num_prefix_tokens = prefix_tokens
    split.probe_img_size = img_size
    split.stage_param_names = stage_params
    split.unused_param_names = sorted(n for i, n in names.items() if i not in owner)


def check_shrink(backbone: nn.Module, split: StageSplit, in_chans: int) -> str:
    """Whether rows can leave the batch between stages (adaptive exit); '' if so, else why not (cached on the split).

    A backbone that keeps something batch-sized across a stage boundary (twins reshapes with the ``B`` it read at
    the start) fails or mixes images when the batch shrinks mid-forward. Checked once by running two images, one
    of which leaves after stage 1, against the full forward: the other's later stage outputs must be unchanged.
    """
    if split.shrink_problem is not None:
        return split.shrink_problem
    p = next(backbone.parameters(), None)
    size = split.probe_img_size or 32
    x = torch.randn(2, in_chans, size, size, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else None)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            full = run_stages(backbone, split, x)
            part = run_stages(backbone, split, x, route=lambda k, h: (
                torch.ones(1, dtype=torch.long, device=h.device) if h.shape[0] == 2 else None))
        problem = ''
        for k in range(1, split.num_stages):
            if part[k].shape != full[k][1:].shape or not torch.allclose(part[k], full[k][1:], rtol=1e-3, atol=1e-4):
                problem = f'stage {k + 1} output changes when another image leaves the batch'
                break
    except Exception as e:   # the backbone's own error: it cannot run on a shrunken batch
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        backbone.train(was_training)
    split.shrink_problem = problem
    return problem


def adapt_small_input(backbone: nn.Module, split: StageSplit, in_chans: int) -> List[str]:
    """Make a conv stem keep resolution for 28-32 px inputs; returns the names of what changed.

    Every conv before the first tap loses its stride and every pooling layer there becomes an identity, so
    a 28 px image reaches stage 1 at 28 px instead of 7 px. Strides inside the feature level that ends stage 1
    are that level's own downsampling and are kept (with ``stage_indices=[2, 4]`` on a ResNet, layer2 still
    halves the map). Token models are sized by timm's own ``img_size`` / ``patch_size`` kwargs instead.
    """
    if hasattr(backbone, 'patch_embed'):
        raise ValueError(f"small_input adapts conv stems; '{type(backbone).__name__}' embeds patches, so pass "
                         f"timm's img_size=32, patch_size=4 (or similar) instead")
    first = split.tap_names[0] if split.tap_names else None
    first_level = _resolve_name(backbone, cut_name(backbone, split.feature_indices[0]))
    order: List[str] = []
    module_names = {m: n for n, m in backbone.named_modules()}

    def record(module, args, output):
        order.append(module_names[module])
        if module_names[module] == first:
            raise _StopForward

    handles = [m.register_forward_hook(record) for n, m in backbone.named_modules() if n]
    try:
        with torch.no_grad():
            backbone.eval()
            backbone.forward_features(torch.zeros(1, in_chans, 64, 64))
    except _StopForward:
        pass
    finally:
        backbone.train()
        for h in handles:
            h.remove()
    if first is None or first not in order:
        raise ValueError('small_input needs at least two stages (a first tap to stop at)')
    changed = []
    for name in order[:order.index(first)]:
        if first.startswith(name + '.') or name == first or name.startswith(first_level + '.'):
            continue
        m = backbone.get_submodule(name)
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            m.stride = (1, 1)
            changed.append(name)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and _stride_of(m) > 1:
            parent, _, child = name.rpartition('.')
            setattr(backbone.get_submodule(parent) if parent else backbone, child, nn.Identity())
            changed.append(name)
    if not changed:
        raise ValueError(f"small_input found no strided conv or pooling before '{first}' in "
                         f"{type(backbone).__name__}; nothing to adapt")
    return changed


def _stride_of(m: nn.Module) -> int:
    s = m.stride if m.stride is not None else m.kernel_size
    return max(s) if isinstance(s, (tuple, list)) else int(s)


def stage_modules(backbone: nn.Module, param_names: Sequence[str]) -> List[nn.Module]:
    """The submodules that directly hold any of ``param_names`` (to put a frozen stage's norms in eval)."""
    mods = {}
    for pname in param_names:
        mod_name = pname.rpartition('.')[0]
        mods[mod_name] = backbone.get_submodule(mod_name) if mod_name else backbone
    return list(mods.values())
