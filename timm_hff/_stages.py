"""Cutting a timm backbone into detached, locally trained stages.

The timm model stays the only owner of its parameters: a stage is not a module but a *tap*, a submodule named
by the backbone's ``feature_info`` whose output ends the stage. While ``run_stages`` runs the backbone's own
``forward_features`` + ``forward_head(pre_logits=True)``, a forward hook on each tap hands the stage output
(with its graph) to the caller and passes a detached copy downstream, so no gradient crosses a boundary. The
last stage runs through the backbone's own head path (pooling, head norm), which is what makes exporting to a
plain timm classifier exact. One mechanism covers sequential CNNs, NHWC models and token models alike.

This module says where the cut is (``StageSplit``: the taps, from ``feature_info`` or block names); the cut's
mechanism lives beside it:

    _cuts         the detach hooks on the taps and the staged forward, ``run_stages``
    _probe        the build-time check: taps equal ``forward_intermediates``, stages own disjoint parameters
    _small_input  the 28-32 px stem adaptation (strides and pooling before the first tap removed)
"""
import difflib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ._config import HFFConfig

__all__ = ['DEFAULT_STAGES', 'SplitError', 'StageSplit', 'build_split', 'cut_name', 'family_of', 'finish_order',
           'hookable', 'plain_container', 'resolve_name', 'resolve_stage_indices', 'stage_modules', 'stem_split']


DEFAULT_STAGES = HFFConfig().num_stages   # 'up to this many' when left at the default; any other count is a request


class SplitError(ValueError):
    """The backbone cannot be cut into HFF stages; the message names the timm family and why."""


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
    state: Optional[object] = field(default=None, repr=False, compare=False)
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
        return tuple(c for _, c in sorted(zip(keys, out), key=lambda kc: finish_order(backbone, kc[0])))
    reductions = [f['reduction'] for f in info]
    if len(set(reductions)) == 1:   # isotropic (ViT-style): evenly spaced blocks
        if cfg.num_stages > n and cfg.num_stages != DEFAULT_STAGES:
            raise ValueError(f'num_stages={cfg.num_stages}, but {type(backbone).__name__} has {n} blocks to cut '
                             f'after; ask for at most {n}')
        k = min(cfg.num_stages, n)
        return tuple(sorted({round((s + 1) * n / k) - 1 for s in range(k)}))
    last_per_level = [i for i in range(n) if i == n - 1 or reductions[i + 1] != reductions[i]]
    if cfg.num_stages > len(last_per_level) and cfg.num_stages != DEFAULT_STAGES:   # the default: at most 4
        raise ValueError(f'num_stages={cfg.num_stages}, but {type(backbone).__name__} has {len(last_per_level)} '
                         f'reduction levels (one stage each); ask for at most {len(last_per_level)}, or cut finer at '
                         f"block boundaries with stage_indices (e.g. 'layer1.0') or balance")
    return tuple(last_per_level[-cfg.num_stages:])


def finish_order(backbone: nn.Module, name: str) -> int:
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
    hooked = hookable(backbone, name)
    for i, f in enumerate(backbone.feature_info):
        resolved = resolve_name(backbone, f['module'])
        if resolved is not None and hookable(backbone, resolved) == hooked:
            return i
    return name


def _cut_module(backbone: nn.Module, cut: Union[int, str]) -> str:
    """The module whose output a cut point is (what its tap hook sits on)."""
    if isinstance(cut, int):
        resolved = resolve_name(backbone, backbone.feature_info[cut]['module'])
        return hookable(backbone, resolved) if resolved is not None else backbone.feature_info[cut]['module']
    return hookable(backbone, cut)


def cut_name(backbone: nn.Module, cut: Union[int, str]) -> str:
    """A cut point as a module name: timm's ``feature_info`` module for an index, the name itself otherwise."""
    return backbone.feature_info[cut]['module'] if isinstance(cut, int) else cut


def build_split(backbone: nn.Module, cfg: HFFConfig) -> StageSplit:
    indices = resolve_stage_indices(backbone, cfg)
    names = [cut_name(backbone, c) for c in indices]
    full_tail = indices[-1] == len(backbone.feature_info) - 1
    taps = tuple(names[:-1]) if full_tail else tuple(names)
    return StageSplit(feature_indices=indices, tap_names=tuple(hookable(backbone, n) for n in taps),
                      full_tail=full_tail)


def stem_split(backbone: nn.Module, cfg: HFFConfig) -> StageSplit:
    """The split whose first tap bounds ``small_input``'s stem adaptation: the cut itself, or with ``balance`` the
    default cut at the default stage count (``HFFConfig().num_stages``). A balanced cut re-cuts that one network
    whatever ``num_stages`` it asks for, at build and at load: with the cut's own count, 6 balanced stages of a ResNet
    would start from a stem tap, keep the stem's max-pool and train a network with a quarter of the FLOPs."""
    if cfg.balance is not None:
        from dataclasses import replace
        info = getattr(backbone, 'feature_info', None) or [{}]
        reductions = {f.get('reduction') for f in info}
        levels = len(reductions) if len(reductions) > 1 else len(info)   # hierarchical levels, or isotropic blocks
        return build_split(backbone, replace(cfg, stage_indices=None, balance=None, check_split=False,
                                             num_stages=min(HFFConfig().num_stages, levels)))
    return build_split(backbone, cfg)


def resolve_name(backbone: nn.Module, name: str) -> Optional[str]:
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


def hookable(backbone: nn.Module, name: str) -> str:
    """The module to hook for a tap: the tap itself, or, for a container, its last block.

    timm's gradient checkpointing (``checkpoint_seq(..., flatten=True)``) calls a Sequential's blocks directly and
    never the container, and a ModuleList is never called at all, so a hook there would not fire; the last block's
    output is the same tensor.
    """
    resolved = resolve_name(backbone, name)
    if resolved is None:
        raise SplitError(f"timm family '{family_of(backbone)}': feature_info names module '{name}', which "
                         f"is not in the model, so the stage cannot be tapped")
    name, module = resolved, backbone.get_submodule(resolved)
    while plain_container(module) and len(module):
        child, module = list(module.named_children())[-1]
        name = f'{name}.{child}'
    return name


def plain_container(module: nn.Module) -> bool:
    """A Sequential whose forward is Sequential's own (a subclass may concatenate, as densenets do), or a ModuleList."""
    if isinstance(module, nn.ModuleList):
        return True
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def stage_modules(backbone: nn.Module, param_names: Sequence[str]) -> List[nn.Module]:
    """Every submodule wholly inside the stage that owns ``param_names`` (to put a frozen stage wholly in eval mode):
    those whose parameters all belong to it, and the parameterless ones (Dropout, DropPath, activations) inside such
    a module. A parameterless module of a shared parent (a ViT's ``pos_drop`` beside ``blocks``) goes with the module
    defined just before it, as timm defines modules in forward order. A module shared with another stage stays out."""
    mine = set(param_names)
    owners = {}   # module name -> whether every parameter under it is the stage's
    for pname, _ in backbone.named_parameters():
        parts = pname.split('.')[:-1]
        for i in range(len(parts) + 1):
            name = '.'.join(parts[:i])
            owners[name] = owners.get(name, True) and pname in mine
    out, previous = [], False
    for name, mod in backbone.named_modules():
        probe = name
        while probe and probe not in owners:
            probe = probe.rpartition('.')[0]
        if name in owners:
            inside = previous = owners[name]
        elif owners.get(probe):
            inside = True
        else:   # parameterless, under a parent shared between stages: the module defined before it decides
            inside = previous
        if inside:
            out.append(mod)
    return out
