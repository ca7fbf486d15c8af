"""The prototype head: a stage's local classifier on the unit hypersphere.

    stage output -> aux block -> pooling (per layout) -> projection -> L2 normalise = z
    scores s_c = (1/s) logsumexp_j(s <z, p_cj>)   over the K unit-norm prototypes p_cj of class c
    loss = cross_entropy(s * (s_c - m * target), target)

The other classes' prototypes act as negatives, so no negative data is needed and one pass predicts.
"""
import warnings
from typing import List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import HFFConfig
from ._aux import AuxBlock
from ._base import Head, register_head
from ._fused import fp32, fused_score_loss, fused_stage_losses
from ._pooling import LAYOUTS, pool_stage

__all__ = ['PrototypeHead']


@register_head('prototype')
class PrototypeHead(Head):
    """Projects a stage output onto the sphere and scores it against learned class prototypes.

    Args:
        in_chs: Channels of the stage output.
        layout: 'NCHW', 'NHWC', 'NLC' (tokens, ``num_prefix_tokens`` first) or 'NC' (already pooled).
        num_classes: Number of classes C.
        cfg: The HFF settings (K, embed_dim, scale, margin, aux, pool, prototype_init).
        num_prefix_tokens: Class/register tokens at the front of an NLC sequence.
    """

    def __init__(self, in_chs: int, layout: str, num_classes: int, cfg: HFFConfig, num_prefix_tokens: int = 0):
        super().__init__()
        assert layout in LAYOUTS, layout
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens
        self.pool_kind = cfg.pool
        if cfg.pool == 'token' and layout == 'NLC' and num_prefix_tokens == 0:
            raise ValueError("pool='token' needs a model with a class token; use pool='avg'")
        if cfg.pool == 'token' and layout in ('NCHW', 'NHWC'):
            raise ValueError(f"pool='token' reads a class token, but this stage's output is a feature map ({layout}) "
                             f"with none; use pool='avg' (the default) for a CNN")
        if cfg.aux_size is not None and cfg.aux != 'none' and layout == 'NLC':
            raise ValueError(f'aux_size={cfg.aux_size} pools a feature map before the aux block, but this stage '
                             f'outputs tokens (NLC); drop aux_size for a token model')
        self.num_prototypes = cfg.prototypes_per_class
        self.scale = float(cfg.scale)
        self.margin = float(cfg.margin)
        self.prototype_init = cfg.prototype_init

        if cfg.aux == 'none' or layout == 'NC':
            self.aux = nn.Identity()
            width = in_chs
        else:
            width = cfg.aux_channels or in_chs
            self.aux = AuxBlock(cfg.aux, layout, in_chs, width, depth=cfg.aux_depth, size=cfg.aux_size)
        self.grid = cfg.pool_size if layout in ('NCHW', 'NHWC') else 1
        if cfg.pool_size > 1 and layout in ('NLC',):
            raise ValueError(f'pool_size={cfg.pool_size} needs a feature map (NCHW / NHWC); token stages pool to one '
                             f'vector (pool_size: 1)')
        width *= self.grid ** 2
        self.embed_dim = cfg.embed_dim or width
        self.proj = nn.Linear(width, self.embed_dim) if cfg.embed_dim else nn.Identity()
        self.prototypes = nn.Parameter(torch.empty(num_classes * self.num_prototypes, self.embed_dim))
        self.num_classes = num_classes
        self.reset_prototypes(num_classes)

    @classmethod
    def class_tensor_shapes(cls, cfg, num_classes: int):
        return {'prototypes': ((num_classes * cfg.prototypes_per_class, cfg.embed_dim or None),
                               f'num_classes={num_classes}, prototypes_per_class={cfg.prototypes_per_class} and '
                               f'embed_dim={cfg.embed_dim}')}

    def reset_prototypes(self, num_classes: int) -> None:
        """Draw fresh prototypes for ``num_classes`` classes (used for new label sets in transfer)."""
        self.num_classes = num_classes
        w = torch.empty(num_classes * self.num_prototypes, self.embed_dim, device=self.prototypes.device,
                        dtype=self.prototypes.dtype)
        if self.prototype_init == 'orthogonal':
            nn.init.orthogonal_(w)
        else:
            nn.init.normal_(w)
        self.prototypes = nn.Parameter(F.normalize(w, dim=1))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid > 1:   # a grid of positions, flattened channel-major (NCHW order)
            if self.layout == 'NHWC':
                x = x.permute(0, 3, 1, 2)
            return F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        if self.layout == 'NLC' and self.pool_kind == 'token':
            return x[:, 0]
        return pool_stage(x, self.layout, self.num_prefix_tokens)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The stage output as a point z on the unit sphere, shape (B, embed_dim), in fp32.

        The aux block and projection follow autocast (bf16 / fp16 convs are where mixed precision pays); the
        normalisation runs in fp32 with autocast off, since autocast would otherwise re-cast it."""
        z = self.proj(self.pool(self.aux(x)))
        with fp32(z):
            return F.normalize(z.float(), dim=-1)

    def unit_prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototypes.float(), dim=-1)

    def class_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Smooth-max cosine s_c per class, shape (B, C), in fp32 (autocast off: a bf16 cosine has two significant
        digits, too coarse for a margin of 0.2 at scale 16). With one prototype per class it is a cosine, in [-1, 1];
        with K the LogSumExp lies between the largest cosine and that plus ln(K) / scale, so in
        [-1, 1 + ln(K) / scale]."""
        with fp32(z):
            cos = z.float() @ self.unit_prototypes().t()
            if self.num_prototypes == 1:
                return cos
            cos = cos.view(z.shape[0], self.num_classes, self.num_prototypes)
            return torch.logsumexp(self.scale * cos, dim=-1) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``scale * s_c``: a softmax over them is the head's class posterior. Scored in fp32, returned
        in the head's parameter dtype (fp32 under autocast; bf16 after ``model.to(torch.bfloat16)``, as timm's models
        return their own dtype)."""
        return (self.scale * self.class_scores(self.embed(x))).to(self.prototypes.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The stage output pooled and projected, before the sphere (what the fused scoring takes)."""
        return self.proj(self.pool(self.aux(x)))

    def forward_loss(self, x: torch.Tensor, target: torch.Tensor):
        """(local loss, detached class logits) of a training step: ``loss(forward(x), target)`` and ``forward(x)``
        from one fused scoring function (``heads._fused``: a third of the ops, the same values). Forward hooks on the
        head's own modules (aux, proj) run; hooks on the head module itself do not (it is not called)."""
        return fused_score_loss(self.project(x), self.prototypes, target, self.scale, self.margin, self.num_prototypes)

    def fuses_with(self, other: Head) -> bool:
        """Whether ``other`` can be scored in the same fused call (``fused_losses``)."""
        return (type(other) is type(self) and other.embed_dim == self.embed_dim and other.scale == self.scale
                and other.margin == self.margin and other.num_prototypes == self.num_prototypes
                and other.num_classes == self.num_classes)

    def fused_losses(self, heads: Sequence[Head], xs: Sequence[torch.Tensor], target: torch.Tensor
                     ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The stages of a ``simultaneous`` step scored in one call (``heads._fused.fused_stage_losses``): their
        embeddings and prototypes stacked, so five stages' heads cost about as many ops as one."""
        vec, logits = fused_stage_losses([h.project(x) for h, x in zip(heads, xs)], [h.prototypes for h in heads],
                                         target, self.scale, self.margin, self.num_prototypes)
        return vec, list(logits.unbind(0))

    def no_weight_decay(self) -> Set[str]:
        """Prototypes live on the sphere: weight decay would only fight the normalisation."""
        return {'prototypes'}

    def linear_classifier(self, multi_prototype: str = 'mean') -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The linear classifier with this head's argmax on its pooled input: the unit prototypes folded through
        the projection. None with an aux block or an unpooled input (not linear in the pooled features). With K
        prototypes per class, ``'mean'`` exports each class's normalised mean prototype and ``'expand'`` one output
        per prototype (a hard max replacing the LogSumExp); both warn, as the argmax can differ from HFF's."""
        if not isinstance(self.aux, nn.Identity) or self.layout != 'NC':
            return None
        protos = self.unit_prototypes().detach()
        c, k = self.num_classes, self.num_prototypes
        if k > 1 and multi_prototype == 'mean':
            warnings.warn(f'prototypes_per_class={k}: HFF takes a smooth max over each class\'s prototypes, which a '
                          f'linear classifier cannot express; exporting the normalised mean prototype per class (the '
                          f'argmax can differ from HFF\'s where they spread out; multi_prototype=\'expand\' is '
                          f'closer)', stacklevel=3)
            protos = F.normalize(protos.view(c, k, -1).mean(1), dim=-1)
        elif k > 1:
            warnings.warn(f'prototypes_per_class={k}: exporting {c * k} outputs, one per prototype (class = index // '
                          f'{k}, label_names repeated); a hard max replaces HFF\'s LogSumExp over a class\'s '
                          f'prototypes', stacklevel=3)
        if isinstance(self.proj, nn.Linear):
            w = self.proj.weight.detach().float()
            b = self.proj.bias.detach().float() if self.proj.bias is not None else torch.zeros(w.shape[0])
            return protos @ w, protos @ b
        return protos.clone(), torch.zeros(c)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Margin softmax loss in fp32; ``target`` is class indices (B,) or soft targets (B, C) from mixup / label
        smoothing.

        With soft targets the margin is spread like the target: class c's logit is lowered by ``scale * margin *
        target_c`` (one-hot targets give CosFace's margin on the true class; a 0.9 / 0.1 smoothed target lowers the
        true class by 0.9 m and each other class by its small share). The loss stays linear in the target, so a
        mixup of two images is trained as the same mixture of their two margin losses' targets.
        """
        with fp32(logits):
            logits = logits.float()
            soft = F.one_hot(target, self.num_classes).float() if target.ndim == 1 else target.float()
            return torch.sum(-soft * F.log_softmax(logits - self.scale * self.margin * soft, dim=-1), dim=-1).mean()
