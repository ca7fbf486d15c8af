"""Forward-Forward (Hinton, 2022) on a timm backbone cut at the same stages as HFF.

    label plane(y) --+
    image x ---------+-> [x, plane] -> stage 1 -> g_1 = mean(h_1^2)      (goodness)
                                   (length-normalised, detached) -> stage 2 -> g_2 ...
    training:  positive data = (x, true label), negative data = (x, random wrong label);
               stage k's loss = softplus(theta - g_k(pos)) + softplus(g_k(neg) - theta), its own graph only
    inference: one full pass per candidate label; predict argmax_c sum_k g_k(x, c)  -> C passes

The label enters as one extra input channel (a "label plane"), so the backbone is the HFF backbone built with
``in_chans + 1``; the stage cut is HFF's own (``timm_hff.create_model`` builds it, ``run_stages`` runs it).
Between stages each stage output is divided by its root-mean-square, Hinton's "layer normalisation" that hides
a stage's goodness from the next one, so a stage cannot win by copying its predecessor's length. A permanent
forward hook on each tap (placed before HFF's own cut hook) records the goodness and normalises; HFF's hook then
detaches the normalised output, so gradients stay inside each stage.

This is a baseline, kept close to the paper on purpose: its cost (C passes to classify, two passes to train) is
what HFF's prototype heads remove.
"""
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import StageSplit, run_stages

__all__ = ['FFConfig', 'FFModel', 'LABEL_MODES', 'LabelPlane', 'create_ff_model', 'goodness']

LABEL_MODES = ('learned', 'fixed', 'onehot')


@dataclass
class FFConfig:
    """Forward-Forward settings.

    Attributes:
        threshold: Goodness threshold theta: positive data should score above it, negative data below.
        label_mode: How the label is drawn into the extra input channel: 'learned' (a trainable low-resolution
            pattern per class, upsampled), 'fixed' (a random +-1 pattern per class) or 'onehot' (Hinton's MNIST
            encoding: one-hot over the first C pixels of the plane, zero elsewhere).
        label_res: Side of the per-class pattern for 'learned' and 'fixed' before upsampling to the input.
        predict_skip_first: Leave stage 1 out of the summed goodness at inference, as Hinton (2022) does with
            the first hidden layer. Ignored with one stage.
        chunk_size: Rows (image, candidate label) per backbone call at inference; bounds memory for large C.
        eps: Added to the mean square before the square root in the between-stage normalisation.
    """
    threshold: float = 2.0
    label_mode: str = 'learned'
    label_res: int = 8
    predict_skip_first: bool = True
    chunk_size: int = 256
    eps: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or self.threshold <= 0:
            raise ValueError(f'threshold must be a positive number (goodness is a mean square), got {self.threshold!r}')
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f'label_mode must be one of {list(LABEL_MODES)}, got {self.label_mode!r}')
        for name in ('label_res', 'chunk_size'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be an integer >= 1, got {value!r}')

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class LabelPlane(nn.Module):
    """Draws labels as one image-sized plane per sample, the channel FF appends to the input."""

    def __init__(self, mode: str, num_classes: int, res: int, seed: int = 0):
        super().__init__()
        self.mode = mode
        self.res = res
        self.num_classes = num_classes
        if mode == 'learned':
            self.patterns = nn.Parameter(torch.randn(num_classes, 1, res, res))
        elif mode == 'fixed':
            g = torch.Generator().manual_seed(seed)
            self.register_buffer('patterns', torch.randint(0, 2, (num_classes, 1, res, res), generator=g) * 2. - 1.)
        else:
            self.register_buffer('patterns', torch.empty(num_classes, 1, 0, 0), persistent=False)

    def forward(self, labels: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Planes (N, 1, H, W) for ``labels`` (N,)."""
        if self.mode == 'onehot':
            if self.num_classes > height * width:
                raise ValueError(f"label_mode='onehot' writes {self.num_classes} classes into the first pixels of a "
                                 f"{height}x{width} plane, which has fewer; use label_mode='learned'")
            plane = torch.zeros(labels.shape[0], height * width, device=labels.device, dtype=dtype)
            plane[torch.arange(labels.shape[0], device=labels.device), labels] = 1.
            return plane.view(-1, 1, height, width)
        p = self.patterns[labels].to(dtype)
        return F.interpolate(p, size=(height, width), mode='nearest')


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Mean square activity of each sample, over every non-batch dimension (any layout), in float32."""
    return h.float().pow(2).flatten(1).mean(1)


class _GoodnessState:
    """Shared by the normalising hooks: collects stage goodness while ``stage_goodness`` runs, else None."""

    def __init__(self):
        self.goods: Optional[Dict[int, torch.Tensor]] = None


class _NormaliseHook:
    """Forward hook on the tap ending stage k: records the stage's goodness, hands on the RMS-normalised output.

    Installed for the model's life (a callable object, so ``copy.deepcopy`` rebinds it), so that any forward of
    the backbone, including a gradient-checkpointing recompute, sees the same normalised stage inputs.
    """

    def __init__(self, state: _GoodnessState, k: int, eps: float):
        self.state, self.k, self.eps = state, k, eps

    def __call__(self, module, args, output):
        g = goodness(output)
        if self.state.goods is not None and self.k not in self.state.goods:
            self.state.goods[self.k] = g
        # the next stage sees a detached input anyway (HFF's cut), so the scale needs no graph
        scale = (g.detach() + self.eps).rsqrt().to(output.dtype)
        return output * scale.view(-1, *([1] * (output.ndim - 1)))


class FFModel(nn.Module):
    """A timm backbone trained with Forward-Forward, stage by stage, at HFF's stage cut.

    Use ``create_ff_model``. ``model(x)`` returns per-class scores (summed goodness, B x C) after C passes;
    ``model.loss(x, y)`` returns the summed local losses of one positive and one negative pass.
    """

    def __init__(self, backbone: nn.Module, split: StageSplit, num_classes: int, in_chans: int,
                 cfg: Optional[FFConfig] = None, model_name: str = ''):
        super().__init__()
        self.cfg = cfg or FFConfig()
        self.backbone = backbone
        self.split = split
        self.in_chans = in_chans
        self.model_name = model_name
        self.num_classes = num_classes
        self.label_plane = LabelPlane(self.cfg.label_mode, num_classes, self.cfg.label_res)
        self._goodness_state = _GoodnessState()
        for k, name in enumerate(split.tap_names):
            # prepend: fire before HFF's cut hook, so goodness sees the stage output with its graph and the
            # cut hook detaches the normalised output for the next stage
            backbone.get_submodule(name).register_forward_hook(
                _NormaliseHook(self._goodness_state, k, self.cfg.eps), prepend=True)

    @property
    def num_stages(self) -> int:
        return self.split.num_stages

    def reset_classifier(self, num_classes: int) -> None:
        """A new label set: fresh label patterns; the backbone is kept."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
        device = next(self.backbone.parameters()).device
        self.num_classes = num_classes
        self.label_plane = LabelPlane(self.cfg.label_mode, num_classes, self.cfg.label_res).to(device)

    def with_label(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The FF input: the image with its label plane appended as the last channel."""
        self._check_input(x)
        plane = self.label_plane(labels, x.shape[-2], x.shape[-1], x.dtype)
        out = torch.cat([x, plane], dim=1)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)   # keep the caller's layout (GPU benchmarks)
        return out

    def stage_goodness(self, xl: torch.Tensor, stop_after: Optional[int] = None) -> List[torch.Tensor]:
        """Goodness (B,) of each stage (up to ``stop_after``) for labelled inputs, each on its own stage's graph."""
        st = self._goodness_state
        if st.goods is not None:
            raise RuntimeError('stage_goodness is not re-entrant: a forward of this model is already running')
        st.goods = {}
        try:
            outs = run_stages(self.backbone, self.split, xl, stop_after=stop_after)
            goods = st.goods
        finally:
            st.goods = None
        if len(outs) - 1 not in goods:   # a full last stage (pooled features) has no tap
            goods[len(outs) - 1] = goodness(outs[-1])
        return [goods[k] for k in range(len(outs))]

    def loss(self, x: torch.Tensor, target: torch.Tensor, stop_after: Optional[int] = None) -> torch.Tensor:
        """Summed local FF losses of one batch: a positive (true label) and a negative (random wrong label) pass.

        Positives and negatives go through the backbone as one batch so norm layers see both. Gradients stay
        inside each stage (``run_stages`` detaches every stage input), so one ``backward()`` trains all stages
        locally. Returns the sum of the stage losses; ``self.last_stage_losses`` keeps them apart for logging.
        """
        if target.ndim != 1:
            raise ValueError(f'FF needs class indices (B,), got targets of shape {tuple(target.shape)}; '
                             f'mixup/cutmix soft targets have no single positive label')
        if self.num_classes < 2:
            raise ValueError('FF needs at least two classes to draw negative labels')
        b = x.shape[0]
        wrong = (target + torch.randint(1, self.num_classes, target.shape, device=target.device)) % self.num_classes
        xl = self.with_label(torch.cat([x, x]), torch.cat([target, wrong]))
        theta = self.cfg.threshold
        losses = []
        for g in self.stage_goodness(xl, stop_after=stop_after):
            losses.append(F.softplus(theta - g[:b]).mean() + F.softplus(g[b:] - theta).mean())
        self.last_stage_losses = [l.detach() for l in losses]
        return torch.stack(losses).sum()

    @torch.no_grad()
    def class_goodness(self, x: torch.Tensor, stop_after: Optional[int] = None,
                       classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Goodness of every stage for every candidate label: (num_stages, B, C), one pass per (image, label).

        Rows (image, label) are built a chunk at a time so large C does not hold C copies of the batch.
        """
        self._check_input(x)
        cls = torch.arange(self.num_classes, device=x.device) if classes is None else torch.as_tensor(
            list(classes), device=x.device)
        b, c = x.shape[0], cls.numel()
        rows = b * c
        chunks = []
        for start in range(0, rows, self.cfg.chunk_size):
            idx = torch.arange(start, min(rows, start + self.cfg.chunk_size), device=x.device)
            goods = self.stage_goodness(self.with_label(x[idx // c], cls[idx % c]), stop_after=stop_after)
            chunks.append(torch.stack(goods))
        return torch.cat(chunks, dim=1).view(-1, b, c)

    def scores(self, stage_goodness: torch.Tensor) -> torch.Tensor:
        """Class scores from ``class_goodness`` output: goodness summed over the predicting stages."""
        n = stage_goodness.shape[0]
        first = 1 if self.cfg.predict_skip_first and n > 1 else 0
        return stage_goodness[first:].sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, C) from C passes; argmax is the prediction."""
        return self.scores(self.class_goodness(x))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'expected images of shape (B, {self.in_chans}, H, W), got {shape}; the label plane '
                             f'is added by the model, do not pass it')


def create_ff_model(model_name: str, num_classes: int = 10, in_chans: int = 3, ff_cfg: Optional[FFConfig] = None,
                    **kwargs: Any) -> FFModel:
    """Build an FF model on the same backbone and stage cut as ``timm_hff.create_model(model_name, ...)``.

    The HFF factory builds (and checks) the backbone with one extra input channel for the label plane; FF keeps
    its backbone and split and drops the prototype heads.

    Args:
        model_name: A timm architecture or ``hff_*`` name, as for ``timm_hff.create_model``.
        num_classes: Candidate labels C (inference costs C passes).
        in_chans: Image channels, without the label plane.
        ff_cfg: Forward-Forward settings.
        **kwargs: HFF split settings (``num_stages``, ``stage_indices``, ``small_input``, ``check_img_size``)
            and timm kwargs, exactly as for ``timm_hff.create_model``.
    """
    from ..factory import create_model
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f'in_chans must be an integer >= 1, got {in_chans!r}')
    hff = create_model(model_name, num_classes=num_classes, in_chans=in_chans + 1, **kwargs)
    return FFModel(hff.backbone, hff.split, num_classes, in_chans, ff_cfg, model_name=hff.model_name)
