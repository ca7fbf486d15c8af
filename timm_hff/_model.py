"""HFFModel: a timm backbone cut into stages, each with a prototype head that it learns from alone.

    x -> stage 1 -> h1 ---------> head 1 -> logits 1, loss 1
           (detach) -> stage 2 -> h2 -> head 2 -> logits 2, loss 2
                          ...            (the last stage runs through the backbone's own pooling/head norm)

``model(x)`` predicts in one pass (``predict_from='adaptive'``: each image leaves at the first stage that is sure
enough, see ``forward_adaptive``). ``model(x, target)`` returns every stage's local loss:

- ``mode='simultaneous'``: the summed loss, for one ``backward()`` by the caller. Each stage's graph stays alive
  until then, so this costs as much activation memory as backprop.
- ``mode='memory_efficient'``: each stage's loss is backpropagated (through ``backward_fn``, e.g.
  ``accelerator.backward``) as soon as the stage has run, freeing its graph before the next stage runs, as
  InfoPro does. Gradients are the same as in simultaneous mode.

Over 400 lines because ``HFFModel`` is one class: its forward modes, stage freezing, input checks and timm's
model surface (``reset_classifier``, ``group_matcher``, ``forward_features`` / ``forward_head`` /
``forward_intermediates``); the adaptive exit already lives apart (``_adaptive``).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Union

import torch
import torch.nn as nn

from ._config import HFFConfig
from ._adaptive import AdaptiveExit
from ._exit_rule import replay_exits
from ._heads import PrototypeHead, log_probs_mean
from ._stages import StageSplit, cut_name, run_stages, stage_modules
from ._stem_ckpt import set_stem_checkpointing, stem_containers

MODES = ('simultaneous', 'memory_efficient')


def _pass_through(t: torch.Tensor) -> torch.Tensor:
    return t


# pretrained_cfg keys that say whose weights these are: timm's classifier checkpoint, not an HFF model's. They are
# dropped (create_model records the backbone's source as 'backbone_pretrained' when it loads timm's weights), so
# nothing claims timm's classifier for the HFF heads.
_WEIGHT_IDENTITY = ('hf_hub_id', 'hf_hub_filename', 'url', 'file', 'tag', 'paper_ids', 'paper_name', 'origin_url',
                    'notes', 'license', 'source', 'state_dict', 'custom_load', 'architecture', 'label_names')


def hff_pretrained_cfg(backbone_cfg: Optional[Dict], num_classes: int) -> Dict:
    """timm's ``pretrained_cfg`` for an HFF model: the backbone's preprocessing (so
    ``timm.data.resolve_model_data_config`` works) and this model's classes and heads, without timm's checkpoint
    identity (hub id, tag, papers, licence of weights these heads are not)."""
    cfg = {k: v for k, v in (backbone_cfg or {}).items() if k not in _WEIGHT_IDENTITY}
    cfg.update(num_classes=num_classes, classifier='heads')
    return cfg


def _prefix_regex(regex: str) -> str:
    """``'^conv1|bn1'`` -> ``'^backbone\\.(?:conv1|bn1)'``: every alternative re-rooted, group numbers unchanged."""
    return r'^backbone\.(?:' + (regex[1:] if regex.startswith('^') else regex) + ')'


def _prefix_spec(spec):
    if isinstance(spec, str):
        return _prefix_regex(spec)
    return [(_prefix_regex(r), suffix) for r, suffix in spec]


@dataclass
class HFFOutput:
    """What one training forward returns.

    Attributes:
        logits: The model's prediction (``predict_from``) for this batch, detached.
        stage_logits: Each stage's class logits, detached.
        stage_losses: Each stage's local loss, detached (for logging).
        loss: Sum of the stage losses. In simultaneous mode it carries the graph (call backward on it); in
            memory_efficient mode the backward has already run and it is detached.
        backward_done: True when the model already ran the backward (memory_efficient mode).
    """
    logits: torch.Tensor
    stage_logits: List[torch.Tensor]
    stage_losses: List[torch.Tensor]
    loss: torch.Tensor
    backward_done: bool


class HFFModel(AdaptiveExit, nn.Module):
    """A timm backbone trained greedily, stage by stage, against unit-norm class prototypes.

    The backbone is a plain timm model (built with ``num_classes=0``) registered as ``self.backbone``, so its
    ``state_dict`` keys are timm's own under a ``backbone.`` prefix, and ``self.heads[k]`` is stage k's
    prototype head. Use ``timm_hff.create_model`` rather than this constructor.
    """

    def __init__(self, backbone: nn.Module, split: StageSplit, num_classes: int, cfg: HFFConfig,
                 in_chans: int, model_name: str = ''):
        super().__init__()
        self.backbone = backbone
        self.split = split
        self.hff_cfg = cfg
        self.model_name = model_name
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = getattr(backbone, 'num_features', split.channels[-1])
        self.head_hidden_size = split.channels[-1]   # width the last prototype head sees (timm's pre-logits)
        self.heads = nn.ModuleList([
            PrototypeHead(split.channels[k], split.layouts[k], num_classes, cfg, split.num_prefix_tokens)
            for k in range(split.num_stages)
        ])
        self.predict_from = cfg.predict_from
        self._check_exit_settings(cfg)
        self._frozen: Set[int] = set()
        self._frozen_backbone: Set[int] = set()
        self._exit_flops: Dict[tuple, torch.Tensor] = {}   # (H, W) -> FLOPs per image of leaving after stage k
        self.feature_info = [
            dict(num_chs=split.channels[k], reduction=split.reductions[k],
                 module=f'backbone.{cut_name(backbone, split.feature_indices[k])}', stage=k)
            for k in range(split.num_stages)
        ]
        self.pretrained_cfg = hff_pretrained_cfg(getattr(backbone, 'pretrained_cfg', None), num_classes)

    # ----- timm-compatible surface -----
    @property
    def num_stages(self) -> int:
        return self.split.num_stages

    @property
    def default_cfg(self) -> Dict:
        return self.pretrained_cfg

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class set: fresh prototypes in every head; the backbone and aux blocks are kept."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
        self.num_classes = num_classes
        self.pretrained_cfg['num_classes'] = num_classes
        for head in self.heads:
            head.reset_prototypes(num_classes)
        self._exit_flops.clear()   # the heads' cost depends on the class count

    def get_classifier(self) -> nn.Module:
        return self.heads[self.num_stages - 1]

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Prototypes live on the sphere: weight decay would only fight the normalisation."""
        nwd = {f'heads.{k}.prototypes' for k in range(self.num_stages)}
        if hasattr(self.backbone, 'no_weight_decay'):
            nwd |= {f'backbone.{n}' for n in self.backbone.no_weight_decay()}
        return nwd

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not hasattr(self.backbone, 'set_grad_checkpointing'):
            raise ValueError(f'{type(self.backbone).__name__} does not support gradient checkpointing')
        self.backbone.set_grad_checkpointing(enable)
        if self.hff_cfg.small_input:   # a full-resolution stem: checkpoint it too (timm leaves stems out)
            set_stem_checkpointing(self.backbone, stem_containers(self.backbone, self.split.tap_names), enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        """The backbone's layer groups, with its regexes re-rooted under ``backbone.`` (so timm's layer decay sees
        this model's parameter names). The prototype heads match no group, so timm puts them last, with the head."""
        if not hasattr(self.backbone, 'group_matcher'):
            return {}
        return {name: _prefix_spec(spec) for name, spec in self.backbone.group_matcher(coarse).items()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's own unpooled features (the whole backbone, as in timm)."""
        self._check_input(x)
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Backbone head path (pooling, head norm) then the last stage's prototype head."""
        x = self.backbone.forward_head(x, pre_logits=True)
        return x if pre_logits else self.heads[-1](x)

    def forward_intermediates(self, x: torch.Tensor, **kwargs):
        """timm's ``forward_intermediates`` of the backbone, unchanged."""
        return self.backbone.forward_intermediates(x, **kwargs)

    # ----- stages -----
    def stage_parameters(self, k: int, include_head: bool = True) -> List[nn.Parameter]:
        """Parameters that stage k's local loss trains: its slice of the backbone, and its head."""
        k = self._stage_index(k)
        params = dict(self.backbone.named_parameters())
        out = [params[n] for n in self.split.stage_param_names[k]]
        if include_head:
            out += list(self.heads[k].parameters())
        return out

    def freeze_stages(self, stages: Sequence[int], freeze: bool = True, heads: bool = True) -> None:
        """Freeze (or unfreeze) stages: no gradient, and their norm layers keep their running statistics.

        With ``heads=False`` only the stages' backbone slices freeze and their prototype heads keep training on their
        frozen features: what transfer to a new label set needs, since a frozen stage's fresh prototypes would
        otherwise stay random (at chance) and drag its exit and the stage ensemble down. Used by greedy sequential
        schedules (whole stages) and by transfer.
        """
        for k in stages:
            k = self._stage_index(k)
            for p in self.stage_parameters(k, include_head=heads or not freeze):
                p.requires_grad_(not freeze)
            whole = freeze and heads
            (self._frozen.add if whole else self._frozen.discard)(k)
            (self._frozen_backbone.add if freeze and not heads else self._frozen_backbone.discard)(k)
        self.train(self.training)

    def unfreeze_stages(self, stages: Sequence[int]) -> None:
        self.freeze_stages(stages, freeze=False)

    @property
    def frozen_stages(self) -> List[int]:
        """Stages frozen whole (backbone slice and head): they compute no loss."""
        return sorted(self._frozen)

    @property
    def frozen_backbone_stages(self) -> List[int]:
        """Stages whose backbone slice is frozen while their head trains."""
        return sorted(self._frozen_backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for k in self._frozen | self._frozen_backbone:
                for m in stage_modules(self.backbone, self.split.stage_param_names[k]):
                    m.eval()
            for k in self._frozen:
                self.heads[k].eval()
        return self

    # ----- forward -----
    def forward_stages(self, x: torch.Tensor, stop_after: Optional[int] = None) -> List[torch.Tensor]:
        """Every stage's class logits (up to ``stop_after``) from one pass."""
        self._check_input(x)
        logits: List[torch.Tensor] = []
        self._run(x, on_stage=lambda k, h: logits.append(self.heads[k](h)), stop_after=stop_after, keep=False)
        return logits

    def forward(
            self,
            x: torch.Tensor,
            target: Optional[torch.Tensor] = None,
            mode: str = 'simultaneous',
            backward_fn: Optional[Callable[[torch.Tensor], None]] = None,
            stages: Optional[Sequence[int]] = None,
    ) -> Union[torch.Tensor, HFFOutput]:
        """Predict (no target) or compute the local losses (with target).

        Args:
            x: Images (B, in_chans, H, W).
            target: Class indices (B,) or soft targets (B, C). Without it, returns logits (B, C).
            mode: 'simultaneous' or 'memory_efficient' (see the module docstring).
            backward_fn: How memory_efficient mode backpropagates a loss; default ``loss.backward()``. Pass
                ``accelerator.backward`` so mixed-precision scaling applies.
            stages: Train only these stages (a greedy schedule); the forward stops after the last of them.
        """
        if target is None:
            return self._predict(x)
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self._check_input(x, target)
        active = sorted({self._stage_index(k) for k in stages}) if stages is not None else list(range(self.num_stages))
        active = [k for k in active if k not in self._frozen]
        if not active:
            raise ValueError('no stage left to train: all requested stages are frozen')
        stage_logits: List[torch.Tensor] = []
        losses: List[torch.Tensor] = []
        memory_efficient = mode == 'memory_efficient'
        backward_fn = backward_fn or (lambda loss: loss.backward())

        def on_stage(k: int, h: torch.Tensor) -> None:
            if not memory_efficient:
                logits = self.heads[k](h)
                if k in active:
                    losses.append(self.heads[k].loss(logits, target))
            elif k not in active:
                with torch.no_grad():
                    logits = self.heads[k](h)
            else:
                # With grad checkpointing this runs inside a checkpointed block's forward: the pass-through
                # saved-tensor hooks keep the head's tensors out of the checkpoint, and the backward recomputes
                # the stage's checkpointed blocks as any checkpoint backward would (the tap returns the same
                # detached tensor in the recompute, so the graphs match). The backward consumes the head's
                # graph at once, so the hooks' strong references to saved outputs cannot leak.
                with torch.autograd.graph.saved_tensors_hooks(_pass_through, _pass_through):
                    logits = self.heads[k](h)
                    loss = self.heads[k].loss(logits, target)
                    backward_fn(loss)
                losses.append(loss.detach())
            stage_logits.append(logits.detach())

        self._check_checkpoint_mode(mode)
        if memory_efficient:
            self._run(x, on_stage=on_stage, stop_after=active[-1], keep=False)
        else:   # heads run after the forward, outside any checkpointed region of the backbone
            for k, h in enumerate(self._run(x, stop_after=active[-1])):
                on_stage(k, h)
        total = torch.stack(losses).sum()
        return HFFOutput(
            logits=self.predict_from_stages(stage_logits),
            stage_logits=stage_logits,
            stage_losses=[l.detach() for l in losses],
            loss=total,
            backward_done=memory_efficient,
        )

    def _check_checkpoint_mode(self, mode: str) -> None:
        """Training with grad checkpointing needs timm's non-reentrant checkpoint: a reentrant one runs its block
        without grad and gives no gradient when the block's input requires none, which a stage's detached input never
        does (and memory_efficient mode runs each head's backward inside the checkpointed block, where reentrant
        checkpointing would show the head a tensor with no graph)."""
        if getattr(self.backbone, 'grad_checkpointing', False) and torch.is_grad_enabled():
            from timm.layers import use_reentrant_ckpt
            if use_reentrant_ckpt():
                raise ValueError(f'{mode} training with grad checkpointing needs non-reentrant checkpoints (a stage '
                                 f'starts from a detached input); unset TIMM_REENTRANT_CKPT or call '
                                 f'timm.layers.set_reentrant_ckpt(False)')

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        pf = self.predict_from
        if pf == 'adaptive':
            return self.forward_adaptive(x)[0]
        self._check_input(x)
        if pf == 'last':
            stop = None
        elif isinstance(pf, int):
            stop = self._stage_index(pf)
        elif isinstance(pf, tuple):
            stop = max(self._stage_index(k) for k in pf)
        else:
            stop = None
        outs = self._run(x, stop_after=stop)
        if pf == 'last' or isinstance(pf, int):
            return self.heads[len(outs) - 1](outs[-1])
        return self.predict_from_stages([self.heads[k](h) for k, h in enumerate(outs)])

    def predict_from_stages(self, stage_logits: List[torch.Tensor]) -> torch.Tensor:
        """The model's prediction (``predict_from``) from every stage's logits of one full forward."""
        pf = self.predict_from
        if pf == 'adaptive':   # the exits replayed on a full forward: the same prediction as forward_adaptive
            return replay_exits(self._exit_rule(), stage_logits)[0]
        if pf == 'ensemble':
            return log_probs_mean(stage_logits)
        if isinstance(pf, tuple):
            picked = [stage_logits[self._stage_index(k)] for k in pf if self._stage_index(k) < len(stage_logits)]
            return log_probs_mean(picked) if picked else stage_logits[-1]
        if isinstance(pf, int) and self._stage_index(pf) < len(stage_logits):
            return stage_logits[self._stage_index(pf)]
        return stage_logits[-1]

    def set_predict_from(self, predict_from) -> None:
        cfg = HFFConfig(**{**self.hff_cfg.to_dict(), 'predict_from': predict_from, 'check_split': False})
        if cfg.predict_from == 'adaptive':
            self._exit_rule()   # refuse now, not at the first forward, if there is nothing to exit on
        self.predict_from = cfg.predict_from
        if not isinstance(self.predict_from, str):
            for k in (self.predict_from if isinstance(self.predict_from, tuple) else (self.predict_from,)):
                self._stage_index(k)
        self.hff_cfg.predict_from = self.predict_from

    def _stage_index(self, k: int) -> int:
        n = self.num_stages
        if isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n:
            raise ValueError(f'stage index {k!r} is out of range: this model has {n} stages (0..{n - 1})')
        return k % n

    def _run(self, x: torch.Tensor, on_stage: Optional[Callable[[int, torch.Tensor], None]] = None,
             stop_after: Optional[int] = None,
             route: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None,
             keep: bool = True) -> List[torch.Tensor]:
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

        try:
            return run_stages(self.backbone, self.split, x, on_stage=guard(on_stage), stop_after=stop_after,
                              route=guard(route), keep=keep)
        except (RuntimeError, AssertionError) as e:
            checked = self.split.probe_img_size
            if failed_in_callback or isinstance(e, torch.OutOfMemoryError) or tuple(x.shape[-2:]) == (checked,) * 2:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.model_name or type(self.backbone).__name__} cannot take a "
                             f"{x.shape[-2]}x{x.shape[-1]} input ({msg}); it was built and checked at "
                             f"{checked}x{checked}: resize the images, or build the model for this size "
                             f"(img_size / check_img_size)") from None

    def _check_input(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> None:
        """The model's input boundary: image layout, channels and dtype; with ``target``, its shape and range.

        Checks read metadata only, except the label range on CPU (where ``F.one_hot`` would read the labels
        anyway); labels on an accelerator were checked by the data loaders before the transfer.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'expected images of shape (B, {self.in_chans}, H, W), got {shape}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); '
                             f'create the model with in_chans={x.shape[1]} or convert the images')
        if not x.is_floating_point():
            raise ValueError(f'expected floating-point images, got {x.dtype}; convert and normalise them first '
                             f'(e.g. timm_hff.data.BatchTransform, or x.float() / 255 then mean / std)')
        if target is not None:
            self._check_target(target, x.shape[0])

    def _check_target(self, target: torch.Tensor, batch: int) -> None:
        n = self.num_classes
        if not isinstance(target, torch.Tensor) or target.ndim not in (1, 2):
            shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f'target must be class indices of shape ({batch},) or soft targets of shape '
                             f'({batch}, {n}), got {shape}')
        want = (batch,) if target.ndim == 1 else (batch, n)
        if tuple(target.shape) != want:
            raise ValueError(f'target has shape {tuple(target.shape)} but the batch needs {want} '
                             f'({batch} images, {n} classes)')
        if target.ndim == 2:
            if not target.is_floating_point():
                raise ValueError(f'soft targets must be floating point, got {target.dtype}')
            return
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f'class-index targets must be integers, got {target.dtype}; use target.long()')
        if target.device.type == 'cpu' and target.numel():
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= n:
                raise ValueError(f'target holds class {lo if lo < 0 else hi}, outside [0, {n}) for this model\'s {n} '
                                 f'classes; fix the labels or build the model with num_classes >= {max(hi + 1, n)}')
