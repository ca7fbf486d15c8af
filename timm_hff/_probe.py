"""The build-time check of a cut, on a probe batch: every tap must equal timm's own ``forward_intermediates`` (so
the hooks sit on the right modules, and the layout and reduction of each stage output are known), and autograd's
graph from each stage output must reach a disjoint set of parameters (so the detach really cuts)."""
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._cuts import run_stages
from ._stages import SplitError, StageSplit, family_of, resolve_name

__all__ = ['check_shrink', 'probe_split', 'stride_for']


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


def stride_for(img_size: int, spatial: int, nominal: int) -> int:
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
        level = resolve_name(backbone, f['module']) or f['module']
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
    x = torch.randn(2, in_chans, img_size, img_size)
    outs, refs = _probe_outputs(backbone, split, x, img_size, check)
    _learn_layouts(backbone, split, outs, refs, img_size)
    _learn_owners(backbone, split, outs, check)
    split.probe_img_size = img_size


def _probe_outputs(backbone: nn.Module, split: StageSplit, x: torch.Tensor, img_size: int, check: bool):
    """(every stage's output on the probe batch, timm's ``forward_intermediates`` at the taps, or None when not
    checked); a tuple-returning tap gets the element that equals timm's intermediate."""
    family = family_of(backbone)
    was_training = backbone.training
    backbone.eval()
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
        return outs, (refs if check else None)
    finally:
        backbone.train(was_training)


def _learn_layouts(backbone: nn.Module, split: StageSplit, outs, refs, img_size: int) -> None:
    """Each stage output's layout, width and reduction (checked against timm's intermediate where there is one)."""
    family = family_of(backbone)
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
        reductions.append(stride_for(img_size, spatial, nominal) if spatial else nominal)
        prefix_tokens = max(prefix_tokens, prefix)
    split.layouts, split.channels, split.reductions = layouts, channels, reductions
    split.num_prefix_tokens = prefix_tokens


def _learn_owners(backbone: nn.Module, split: StageSplit, outs, check: bool) -> None:
    """Which parameters each stage's graph reaches; with ``check``, none may be reached from two stages."""
    family = family_of(backbone)
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
