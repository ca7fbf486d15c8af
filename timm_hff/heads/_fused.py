"""The prototype heads' scoring and loss as one autograd function: normalise, cosine, LogSumExp over K, margin,
cross-entropy, with the backward written out, for one stage or for every stage of a step at once.

Autograd would record each of those steps and run a backward op for each (``F.normalize`` alone costs four forward
and about eight backward ops, twice: the embedding and the prototypes), per stage. A training step of HFF is short
and launch bound (each op is a kernel launch on a GPU, a dispatch on a CPU), and the heads are the part of HFF's
step that BP does not have. Fused, one stage's scoring and loss take about a third of the ops; the stages of a
``simultaneous`` step, whose heads run after the forward, are scored in one call (their embeddings and prototypes
stacked), so the head costs about as many ops for five stages as for one. The values are those of
``PrototypeHead.forward`` followed by ``PrototypeHead.loss`` (tested to 1e-5), in fp32 whatever autocast says.

With z a stage's projected embedding, w its prototypes, s the scale, m the margin and T the (hard or soft) target::

    u = z / |z|,  v = w / |w|,  cos = u v^T,  logits = s cos (K = 1) or logsumexp_k(s cos),
    a = logits - s m T,  loss = mean_b( -sum_c T_bc log_softmax(a)_bc )
"""
from contextlib import nullcontext
from typing import List, Tuple

import torch

__all__ = ['fp32', 'fused_score_loss', 'fused_stage_losses']

EPS = 1e-12   # F.normalize's


def fp32(t: torch.Tensor):
    """A context with autocast off on ``t``'s device (the heads' scoring and loss run in fp32); none on the meta
    device, which has no autocast (timm builds and inspects models there), nor while torch.fx traces."""
    if isinstance(t, torch.fx.Proxy) or t.device.type == 'meta':   # torch.fx records no autocast state
        return nullcontext()
    return torch.autocast(t.device.type, enabled=False)


class _ScoreLoss(torch.autograd.Function):
    """One stage: z (B, E), w (CK, E) -> (loss (), logits (B, C)); stacked stages: z (S, B, E), w (S, CK, E) ->
    (losses (S,), logits (S, B, C)). Matrix products as mm / bmm themselves (``@`` on 3-d tensors adds views)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, w: torch.Tensor, target: torch.Tensor, scale: float, margin: float,
                k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        stacked = z.ndim == 3
        zn = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(EPS)
        wn = torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(EPS)
        u, v = z / zn, w / wn
        cos = torch.bmm(u, v.transpose(1, 2)) if stacked else torch.mm(u, v.t())   # (S,) B, CK
        b = z.shape[-2]
        if k > 1:
            scored = (scale * cos).unflatten(-1, (-1, k))
            logits = torch.logsumexp(scored, dim=-1)
        else:
            scored = None
            logits = scale * cos
        lead = (1,) if stacked else ()
        if target.ndim == 2:
            soft = target.view(*lead, *target.shape)                       # broadcast over the stages
        else:
            soft = torch.zeros(*lead, b, logits.shape[-1], dtype=logits.dtype, device=logits.device).scatter_(
                -1, target.view(*lead, b, 1), 1.0)
        lsm = torch.log_softmax(logits - (scale * margin) * soft, dim=-1)
        losses = (soft * lsm).sum((-2, -1)) / -b                           # (S,) or ()
        ctx.save_for_backward(u, v, zn, wn, soft, lsm, scored)
        ctx.scale, ctx.k, ctx.hard = scale, k, target.ndim == 1   # a one-hot target sums to 1
        ctx.mark_non_differentiable(logits)
        return losses, logits

    @staticmethod
    def backward(ctx, g_losses: torch.Tensor, _g_logits=None):
        u, v, zn, wn, soft, lsm, scored = ctx.saved_tensors
        s, k = ctx.scale, ctx.k
        stacked = u.ndim == 3
        b = u.shape[-2]
        # d loss / d a = (softmax(a) * sum_c T - T) / B; the margin is a constant shift, so the same for the logits
        coef = (g_losses.view(-1, 1, 1) if stacked else g_losses) * (s / b)
        p = lsm.exp()
        g = ((p - soft) if ctx.hard else (p * soft.sum(-1, keepdim=True) - soft)) * coef   # s * d loss / d logits
        if k > 1:   # d logits / d cos = s * softmax over the class's K prototypes
            g = (g.unsqueeze(-1) * torch.softmax(scored, dim=-1)).flatten(-2)
        if stacked:
            g_u, g_v = torch.bmm(g, v), torch.bmm(g.transpose(1, 2), u)
        else:
            g_u, g_v = torch.mm(g, v), torch.mm(g.t(), u)
        # through the normalisations: d(x / |x|) = (dy - y (y . dy)) / |x|
        g_z = torch.addcmul(g_u, u, (u * g_u).sum(-1, keepdim=True), value=-1) / zn
        g_w = torch.addcmul(g_v, v, (v * g_v).sum(-1, keepdim=True), value=-1) / wn
        return g_z, g_w, None, None, None, None


def fused_stage_losses(zs: List[torch.Tensor], prototypes: List[torch.Tensor], target: torch.Tensor, scale: float,
                       margin: float, prototypes_per_class: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(losses (S,), detached logits (S, B, C)) of S prototype heads of one configuration from their projected
    embeddings (each (B, E)), in one call; the losses carry the gradient to every embedding and prototype."""
    with fp32(zs[0]):
        target = target.float() if target.ndim == 2 else target
        z, w = torch.stack([t.float() for t in zs]), torch.stack([p.float() for p in prototypes])
        return _ScoreLoss.apply(z, w, target, float(scale), float(margin), int(prototypes_per_class))


def fused_score_loss(z: torch.Tensor, prototypes: torch.Tensor, target: torch.Tensor, scale: float, margin: float,
                     prototypes_per_class: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, detached class logits (B, C)) of one prototype head from its projected embedding ``z`` (B, E)."""
    with fp32(z):
        target = target.float() if target.ndim == 2 else target
        return _ScoreLoss.apply(z.float(), prototypes.float(), target, float(scale), float(margin),
                                int(prototypes_per_class))
