"""HFFModel: a timm backbone cut into stages, each with a prototype head that it learns from alone.

    x -> stage 1 -> h1 ---------> head 1 -> logits 1, loss 1
           (detach) -> stage 2 -> h2 -> head 2 -> logits 2, loss 2
                          ...            (the last stage runs through the backbone's own pooling/head norm)

``model(x)`` predicts in one pass (``_prediction``; ``predict_from='adaptive'``: ``forward_adaptive``).
``model(x, target)`` returns every stage's local loss (``_local_losses``), with one summed backward
(``mode='simultaneous'``) or each stage's backward as soon as it has run (``'memory_efficient'``). The model owns
a private copy of its ``HFFConfig`` (``hff_cfg``), so what ``save_pretrained`` writes is what it does.
"""
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Set, Union

import torch
import torch.nn as nn

from ._config import HFFConfig
from ._adaptive import AdaptiveExit
from .heads import create_head, pool_stage
from ._local_losses import MODES, HFFOutput, check_checkpoint_mode, local_losses
from ._prediction import predict, predict_from_stages
from ._cuts import run_stages_checked
from ._stages import StageSplit, cut_name, stage_modules
from ._stem_ckpt import set_stem_checkpointing, stem_containers
from ._inputs import check_images, check_target, is_fx_symbolic_tracing
from ._timm_cfg import first_convs, hff_pretrained_cfg, pool_type, prefix_spec, settle_cfg

__all__ = ['HFFModel']


class HFFModel(nn.Module):
    """A timm backbone trained greedily, stage by stage, against unit-norm class prototypes.

    The backbone is a plain timm model (built with ``num_classes=0``) registered as ``self.backbone``, so its
    ``state_dict`` keys are timm's own under a ``backbone.`` prefix, and ``self.heads[k]`` is stage k's
    prototype head. Use ``timm_hff.create_model`` rather than this constructor.

    The training forward (``_local_losses``) and the adaptive one (``_adaptive.AdaptiveExit``, owned as ``_exits``)
    live in modules of their own and reach the model only through its public surface: ``run_stages``, ``heads``
    (``heads.Head``'s contract), ``check_input``, ``stage_index``.
    """

    def __init__(self, backbone: nn.Module, split: StageSplit, num_classes: int, cfg: HFFConfig,
                 in_chans: int, model_name: str = ''):
        super().__init__()
        self.backbone = backbone
        self.split = split
        self.hff_cfg = cfg = dataclasses.replace(cfg)   # its own copy: set_predict_from / set_exits change only it
        self.model_name = model_name
        self.in_chans = in_chans
        self.num_classes = num_classes
        # timm's widths: what forward_features gives, and what the last prototype head sees and num_classes=0 returns
        # (a cut that ends before the last level: the last trained stage's, not those of layers it never trains)
        self.num_features = getattr(backbone, 'num_features', split.channels[-1]) if split.full_tail \
            else split.channels[-1]
        self.head_hidden_size = (getattr(backbone, 'head_hidden_size', None) if split.full_tail else None) or \
            split.channels[-1]
        self.heads = self._new_heads(num_classes)
        AdaptiveExit.check_settings(cfg, split.num_stages)
        self._exits = AdaptiveExit()
        self._frozen: Set[int] = set()
        self._frozen_backbone: Set[int] = set()
        self._pruned = False   # prune_intermediate_layers cut the backbone: a feature extractor from then on
        self._heads_pool = pool_type(backbone)   # the backbone's pooling, which the last stage's head reads
        # timm's feature_info is the backbone's (what forward_intermediates and features_only return); the HFF stages,
        # which may cut finer or coarser, are stage_info
        self.feature_info = [dict(f, module=f"backbone.{f['module']}") for f in backbone.feature_info]
        self.stage_info = [
            dict(num_chs=split.channels[k], reduction=split.reductions[k],
                 module=f'backbone.{cut_name(backbone, split.feature_indices[k])}', stage=k)
            for k in range(split.num_stages)
        ]
        backbone_cfg = getattr(backbone, 'pretrained_cfg', None) or {}
        size = split.probe_img_size if cfg.small_input else int(tuple(backbone_cfg.get('input_size', (3, 224)))[-1])
        self.pretrained_cfg = hff_pretrained_cfg(backbone_cfg, num_classes, in_chans=in_chans, img_size=size,
                                                 reduction=self.output_reduction,
                                                 first_conv=first_convs(backbone, in_chans))

    def _new_heads(self, num_classes: int) -> nn.ModuleList:
        """One fresh prototype head per stage, on the backbone's device and dtype; none for ``num_classes=0`` (a
        feature extractor, timm's convention)."""
        split, ref = self.split, next(self.backbone.parameters(), None)
        heads = nn.ModuleList([create_head(self.hff_cfg, split.channels[k], split.layouts[k], num_classes,
                                           split.num_prefix_tokens) for k in range(split.num_stages)]
                              if num_classes else [])
        if ref is not None:
            heads.to(device=ref.device, dtype=ref.dtype)
        return heads.train(self.training)

    # ----- timm-compatible surface -----
    @property
    def num_stages(self) -> int:
        return self.split.num_stages

    @property
    def default_cfg(self) -> Dict:
        return self.pretrained_cfg

    @property
    def output_reduction(self) -> Optional[int]:
        """The backbone's last feature map's stride (what ``pool_size`` follows from the input size)."""
        return self.backbone.feature_info[-1].get('reduction')

    def settle_pretrained_cfg(self) -> Dict:
        """Make ``pretrained_cfg`` tell this model's truth after its fields were replaced (a saved config.json's,
        written before they were kept true, or with lists for tuples): ``_timm_cfg.settle_cfg``."""
        return settle_cfg(self.pretrained_cfg, reduction=self.output_reduction, in_chans=self.in_chans,
                          first_conv=first_convs(self.backbone, self.in_chans))

    @property
    def output_fmt(self) -> str:
        """The layout of ``forward_features`` (the backbone's: 'NHWC' for Swin, 'NCHW' for most CNNs)."""
        return getattr(self.backbone, 'output_fmt', 'NCHW')

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class set: fresh prototypes in every head, the backbone and aux blocks kept. ``num_classes=0`` removes
        the heads (timm's convention: the model then returns the backbone's pooled features, or with
        ``global_pool=''`` its unpooled ones); a class count after that builds new heads, and gives the backbone back
        the pooling the cut was probed with (the last stage's head reads it)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'num_classes must be an integer >= 0 (0 removes the heads), got {num_classes!r}')
        if num_classes and self._pruned:
            raise ValueError('this model was pruned to a feature extractor (prune_intermediate_layers): its later '
                             'stages are gone, so it cannot get prototype heads again; build a new model')
        if global_pool is not None and (not num_classes or global_pool == self._heads_pool):
            self.backbone.reset_classifier(0, global_pool)
        elif global_pool is not None:
            raise ValueError(f"global_pool={global_pool!r} with num_classes={num_classes}: the last stage's head reads "
                             f"the backbone's pooled features ({self._heads_pool!r} pooling), so other pooling is only "
                             f"for num_classes=0 (the heads removed)")
        if num_classes and pool_type(self.backbone) != self._heads_pool:   # heads read the pooling they were cut at
            self.backbone.reset_classifier(0, self._heads_pool)
        self.pretrained_cfg['num_classes'] = num_classes
        for key in ('label_names', 'label_descriptions'):   # the names of the old classes, whatever the count
            self.pretrained_cfg.pop(key, None)
        if num_classes and self.num_classes:
            for head in self.heads:
                head.reset_prototypes(num_classes)
        else:
            self.heads = self._new_heads(num_classes)
            self._frozen.clear()
        self.num_classes = num_classes
        self._exits.clear()   # the heads' cost depends on the class count

    def get_classifier(self) -> nn.Module:
        return self.heads[-1] if len(self.heads) else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The heads' own (``Head.no_weight_decay``: prototypes live on the sphere) and the backbone's."""
        nwd = {f'heads.{k}.{n}' for k, head in enumerate(self.heads) for n in head.no_weight_decay()}
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
        return {name: prefix_spec(spec) for name, spec in self.backbone.group_matcher(coarse).items()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's own unpooled features (the whole backbone, as in timm); for a cut that ends before the
        backbone's last level, the last trained stage's output (the layers after it are never trained)."""
        self.check_input(x)
        if not self.split.full_tail:
            return self.run_stages(x)[-1]
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Backbone head path (pooling, head norm) then the last stage's prototype head; after a truncated cut's
        ``forward_features``, that stage's head (``pre_logits``: the stage output average-pooled)."""
        if not self.split.full_tail:
            return pool_stage(x, self.split.layouts[-1], self.split.num_prefix_tokens) \
                if pre_logits or not len(self.heads) else self.heads[-1](x)
        x = self.backbone.forward_head(x, pre_logits=True)
        return x if pre_logits or not len(self.heads) else self.heads[-1](x)

    def forward_intermediates(self, x: torch.Tensor, **kwargs):
        """timm's ``forward_intermediates`` of the backbone, unchanged (its levels are ``feature_info``'s)."""
        return self.backbone.forward_intermediates(x, **kwargs)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """timm's pruning of the backbone to the levels ``forward_intermediates`` will return (``features_only``).
        The HFF stages past them are gone, so the prototype heads go too: the model is a feature extractor from
        then on (a prediction or a training step is refused). Kept whole when nothing is pruned (the last level
        kept with its norm and head: timm's ``prune_head=False`` leaves the output as it was)."""
        take = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if not prune_head and not prune_norm and max(take, default=-1) == len(self.feature_info) - 1:
            return take
        self.heads = self._new_heads(0)
        self.num_classes = 0
        self.pretrained_cfg['num_classes'] = 0
        self._pruned = True
        self._frozen.clear()
        return take

    # ----- stages -----
    def stage_parameters(self, k: int, include_head: bool = True) -> List[nn.Parameter]:
        """Parameters that stage k's local loss trains: its slice of the backbone, and its head."""
        k = self.stage_index(k)
        if self._pruned:
            self._need_heads('stage_parameters')
        params = dict(self.backbone.named_parameters())
        out = [params[n] for n in self.split.stage_param_names[k]]
        if include_head and len(self.heads):
            out += list(self.heads[k].parameters())
        return out

    def freeze_stages(self, stages: Sequence[int], freeze: bool = True, heads: bool = True) -> None:
        """Freeze (or unfreeze) stages: no gradient, and their norm layers keep their running statistics.

        With ``heads=False`` only the stages' backbone slices freeze and their prototype heads keep training on their
        frozen features: what transfer to a new label set needs, since a frozen stage's fresh prototypes would
        otherwise stay random (at chance) and drag its exit and the stage ensemble down. Used by greedy sequential
        schedules (whole stages) and by transfer.
        """
        self._need_heads('freeze_stages')
        for k in stages:
            k = self.stage_index(k)
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
        self._need_heads('forward_stages')
        self.check_input(x)
        logits: List[torch.Tensor] = []
        self.run_stages(x, on_stage=lambda k, h: logits.append(self.heads[k](h)), stop_after=stop_after, keep=False)
        return logits

    def forward(
            self,
            x: torch.Tensor,
            target: Optional[torch.Tensor] = None,
            mode: str = 'simultaneous',
            backward_fn: Optional[Callable[..., None]] = None,   # no [args] list: torch.fx writes annotations out
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
        if is_fx_symbolic_tracing():   # torch.fx makes every argument a Proxy: trace the prediction (timm's forward(x))
            target = None
        if not len(self.heads):
            if target is not None:
                self._need_heads('a training step (model(x, target))')
            if not self.split.full_tail:   # the last trained stage's pooled features, not untrained layers'
                return self.forward_head(self.forward_features(x), pre_logits=True)
            self.check_input(x)
            return self.backbone(x)   # timm's num_classes=0: the backbone's pooled (or unpooled) features
        if target is None:
            return predict(self, x)
        return self.local_losses(x, target, mode, backward_fn, stages)

    def _need_heads(self, what: str) -> None:
        if not len(self.heads):
            how = ('it was pruned to a feature extractor (prune_intermediate_layers / features_only)' if self._pruned
                   else 'it was built with num_classes=0; reset_classifier(num_classes) adds fresh heads')
            raise ValueError(f'{what} needs the prototype heads, but this model has none: {how}')

    def local_losses(self, x: torch.Tensor, target: torch.Tensor, mode: str = 'simultaneous',
                     backward_fn: Optional[Callable[[torch.Tensor], None]] = None,
                     stages: Optional[Sequence[int]] = None) -> HFFOutput:
        """``forward(x, target, ...)``: the arguments checked, then ``_local_losses.local_losses``."""
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self.check_input(x, target)
        active = sorted({self.stage_index(k) for k in stages}) if stages is not None else list(range(self.num_stages))
        active = [k for k in active if k not in self._frozen]
        if not active:
            raise ValueError('no stage left to train: all requested stages are frozen')
        check_checkpoint_mode(self.backbone, mode)
        stage_logits, loss_vec = local_losses(lambda **kw: self.run_stages(x, **kw), self.heads, target, active, mode,
                                              backward_fn)
        return HFFOutput(logits=self.predict_from_stages(stage_logits), stage_logits=stage_logits,
                         stage_losses=list(loss_vec.detach().unbind(0)), loss=loss_vec.sum(),
                         backward_done=mode == 'memory_efficient', loss_vector=loss_vec)

    def forward_adaptive(self, x: torch.Tensor, return_flops: bool = False):
        """Predict with early exit: each image leaves at the first stage whose confidence passes that stage's
        threshold (``exit_rule``, ``exit_thresholds``), with that stage's logits.

        The batch runs stage by stage through the backbone's own forward; after each stage the images that left are
        dropped, so the later stages run only on the rest and the forward ends once every image has left. For
        inference: call it in eval mode (in train mode the norm layers would see a different batch at every stage).

        Returns:
            ``(logits, exit_stage)``: logits (B, num_classes) and each image's 0-based exit stage (B,); with
            ``return_flops``, also the FLOPs spent on each image (B,), from ``torch.utils.flop_counter`` counts of
            one image (the backbone stages and the heads it went through; a stage whose threshold is 1 runs no
            head, as nobody may leave there).
        """
        self._need_heads('adaptive exit')
        self.check_input(x)
        return self._exits.forward(self, x, return_flops)

    def set_exits(self, thresholds: Optional[Sequence[float]] = None, rule: Optional[str] = None,
                  patience: Optional[int] = None) -> None:
        """Set the adaptive-exit settings (saved with the model); arguments left None keep their value."""
        new = dict(self.hff_cfg.to_dict(), check_split=False)
        for key, value in (('exit_thresholds', thresholds), ('exit_rule', rule), ('exit_patience', patience)):
            if value is not None:
                new[key] = value
        cfg = HFFConfig(**new)
        AdaptiveExit.check_settings(cfg, self.num_stages)
        self.hff_cfg.exit_thresholds, self.hff_cfg.exit_rule = cfg.exit_thresholds, cfg.exit_rule
        self.hff_cfg.exit_patience = cfg.exit_patience

    @property
    def predict_from(self):
        """Which stages the prediction comes from (``HFFConfig.predict_from``; change it with ``set_predict_from``)."""
        return self.hff_cfg.predict_from

    def predict_from_stages(self, stage_logits: List[torch.Tensor]) -> torch.Tensor:
        """The model's prediction (``predict_from``) from the stages' logits of one forward (all, or the first ones
        of a greedy forward that stopped early)."""
        return predict_from_stages(self, stage_logits)

    def set_predict_from(self, predict_from) -> None:
        cfg = HFFConfig(**{**self.hff_cfg.to_dict(), 'predict_from': predict_from, 'check_split': False})
        if cfg.predict_from == 'adaptive':
            AdaptiveExit.rule(cfg, self.num_stages)   # refused now, not at the first forward, if nothing to exit on
        if not isinstance(cfg.predict_from, str):
            for k in (cfg.predict_from if isinstance(cfg.predict_from, tuple) else (cfg.predict_from,)):
                self.stage_index(k)
        self.hff_cfg.predict_from = cfg.predict_from

    def stage_index(self, k: int) -> int:
        """``k`` as a stage index in 0..num_stages-1 (negative counts from the end); a one-line refusal otherwise."""
        n = self.num_stages
        if isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n:
            raise ValueError(f'stage index {k!r} is out of range: this model has {n} stages (0..{n - 1})')
        return k % n

    def run_stages(self, x: torch.Tensor, on_stage: Optional[Callable[[int, torch.Tensor], None]] = None,
             stop_after: Optional[int] = None,
             route: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None,
             keep: bool = True) -> List[torch.Tensor]:
        """The backbone's own forward with each stage's output handed to ``on_stage(k, h)`` (and ``route``, which may
        drop rows), stopping after ``stop_after``; the stage outputs (``keep``). ``timm_hff.run_stages`` on this
        model, with a one-line ValueError when the backbone cannot take this input size."""
        return run_stages_checked(self.backbone, self.split, x, self.model_name, on_stage=on_stage,
                                  stop_after=stop_after, route=route, keep=keep)

    def check_input(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> None:
        """The model's input boundary (``_inputs.check_images`` / ``check_target``); none while torch.fx traces (a
        Proxy has no shape to check, and the traced graph is for the inputs it was traced for)."""
        if is_fx_symbolic_tracing():
            return
        check_images(x, self.in_chans)
        if target is not None:
            check_target(target, x.shape[0], self.num_classes)

