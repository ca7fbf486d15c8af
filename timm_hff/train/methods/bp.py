"""``method: bp``: the same timm backbone with timm's own classifier, trained end to end (the baseline)."""
import weakref
from typing import Any, Dict, Optional

from ..registry import register_method
from .base import Method, warn_frozen_random

__all__ = ['BPMethod']

# BP models with frozen blocks (``freeze_stages``): the parameter names kept frozen through the run
_FROZEN: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()
# BP models taken from a saved HFF model: the timm kwargs that rebuild them (the recipe has none of its own)
_SAVED_ARGS: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


@register_method
class BPMethod(Method):
    name = 'bp'
    help = 'the same backbone end to end'
    per_stage = False
    schedules = ('simultaneous',)
    schedule_reason = 'trains end to end'

    def check(self, cfg) -> None:
        if cfg.stage_lr is not None:
            raise ValueError("stage_lr scales HFF stages; method 'bp' has one end-to-end loss (drop stage_lr)")
        if cfg.calibrate_exits is not None:
            raise ValueError("calibrate_exits fits the exits of HFF stages; method 'bp' has one exit (drop it)")
        super().check(cfg)
        if cfg.reset_prototypes:   # a recipe's prototype setting: BP's classifier is new whatever it says
            import logging
            logging.getLogger(__name__).warning("reset_prototypes draws fresh HFF prototypes; method 'bp' has none "
                                                "(timm's classifier starts fresh for the run's classes): dropped")
            cfg.reset_prototypes = False

    def build_model(self, cfg, num_classes: int, label_names=None):
        """``baselines.create_bp_model``: timm's classifier with HFF's small-input stem adaptation at HFF's own stage
        cut, so BP and HFF train the very same backbone; ``head_only`` freezes all but timm's classifier (a linear
        probe)."""
        from ...baselines.bp import create_bp_model
        from ...core import parse_model_name
        warn_frozen_random(cfg)
        source, name = parse_model_name(cfg.model)
        hff = dict(cfg.hff)
        if source in ('hf-hub', 'local-dir'):
            return self._from_saved_hff(cfg, num_classes)
        if source == 'hff':
            from ...core import registered_defaults
            name, defaults = registered_defaults(name)
            hff = {**defaults, **hff}
        stem = {k: hff[k] for k in ('small_input', 'num_stages', 'stage_indices', 'balance') if k in hff}
        model = create_bp_model(name, num_classes=num_classes, in_chans=cfg.in_chans, pretrained=cfg.pretrained,
                                pretrained_file=cfg.pretrained_file, **stem, **cfg.model_kwargs)
        return _freeze(model, cfg, lambda: _twin(name, cfg, hff, num_classes).split)

    def _from_saved_hff(self, cfg, num_classes: int):
        """BP from a saved HFF model (``transfer_hff.yaml``'s baseline): its backbone, with its trained weights when
        ``pretrained``, under timm's fresh classifier; the same freezing as from timm's weights. The backbone's cut
        passes everything through outside HFF's forward, so it trains end to end (``_cuts``)."""
        from ...factory import create_model
        from ...hub import saved_timm_kwargs
        hff = create_model(cfg.model, pretrained=cfg.pretrained, in_chans=cfg.in_chans)
        model = hff.backbone
        model.reset_classifier(num_classes)
        model.pretrained_cfg = dict(model.pretrained_cfg or {}, architecture=hff.model_name)
        _SAVED_ARGS[model] = (saved_timm_kwargs(model), hff.hff_cfg.small_input)
        return _freeze(model, cfg, lambda: hff.split)

    def set_trainable(self, model, cfg, epoch: int) -> None:
        """The heads-only warm-up, then every layer but the blocks ``freeze_stages`` keeps frozen."""
        super().set_trainable(model, cfg, epoch)
        for n, p in model.named_parameters():
            if n in _FROZEN.get(model, ()):
                p.requires_grad_(False)

    def train_mode(self, model, cfg, epoch: int) -> None:
        """Frozen blocks keep their norm statistics (and no dropout), as HFF's frozen stages do."""
        super().train_mode(model, cfg, epoch)
        if _FROZEN.get(model):
            from ...model import stage_modules
            for m in stage_modules(model, sorted(_FROZEN[model])):
                m.eval()

    def num_stages(self, model) -> int:
        return 1

    def step(self, acc, model, unwrapped, x, target, stage: Optional[int], mode: str):
        loss = bp_loss(model(x), target)
        acc.backward(loss)
        return loss, [loss.detach()]

    def save(self, model, path: str, cfg, data, metrics: Dict[str, Any], data_cfg=None) -> Optional[str]:
        """timm's ``save_for_hf`` (config.json with the label names, model.safetensors), the folder replaced whole."""
        import torch
        from timm.models import save_for_hf
        from ...core import atomic_dir
        args, small = _SAVED_ARGS.get(model, (cfg.model_kwargs, bool(cfg.hff.get('small_input'))))
        model = model.to(memory_format=torch.contiguous_format)   # safetensors stores contiguous tensors only
        with atomic_dir(path, carry_over=False) as tmp:
            save_for_hf(model, str(tmp), model_config=dict(label_names=data.label_names, hff_small_input=small),
                        model_args=dict(args), data_config=data_cfg,
                        safe_serialization=True)
        return path


def _twin(arch: str, cfg, hff: Dict[str, Any], num_classes: int):
    """The HFF model of the same architecture, cut and stem, built on the meta device (nothing allocated): its
    backbone's parameter names are the BP model's, so its stages say which blocks ``freeze_stages`` means."""
    from ...factory import create_model
    hff = {k: v for k, v in hff.items() if k != 'predict_from'}
    if cfg.img_size and 'check_img_size' not in hff:
        hff['check_img_size'] = cfg.img_size
    return create_model(arch, num_classes=num_classes, in_chans=cfg.in_chans, device='meta', **cfg.model_kwargs,
                        **hff)


def _freeze(model, cfg, split_of):
    """``head_only``: all but timm's classifier frozen (a linear probe). ``freeze_stages``: the very blocks of those HFF
    stages (``split_of()``, the cut's split), the usual partial fine-tune; kept frozen through the run."""
    if cfg.head_only:
        head = {id(p) for p in model.get_classifier().parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    if cfg.freeze_stages:
        split = split_of()
        n = split.num_stages
        bad = [k for k in cfg.freeze_stages if isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n]
        if bad:
            raise ValueError(f'freeze_stages {bad}: the HFF cut of {cfg.model} has {n} stages (0..{n - 1})')
        frozen = frozenset(name for k in cfg.freeze_stages for name in split.stage_param_names[k % n])
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        _FROZEN[model] = frozen
    return model


def bp_loss(logits, target):
    """Cross-entropy with hard or soft (mixup, smoothing) targets, in float32."""
    import torch
    if target.ndim == 2:
        return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return torch.nn.functional.cross_entropy(logits.float(), target)
