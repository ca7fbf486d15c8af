"""``method: bp``: the same timm backbone with timm's own classifier, trained end to end (the baseline)."""
from typing import Any, Dict, Optional

from ..registry import register_method
from .base import Method

__all__ = ['BPMethod']


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
        if cfg.freeze_stages or cfg.reset_prototypes:
            raise ValueError("freeze_stages / reset_prototypes apply to HFF models; not with method 'bp' (its "
                             "linear probe is head_only: true)")

    def build_model(self, cfg, num_classes: int):
        """``baselines.create_bp_model``: timm's classifier with HFF's small-input stem adaptation at HFF's own stage
        cut, so BP and HFF train the very same backbone; ``head_only`` freezes all but timm's classifier (a linear
        probe)."""
        from ...baselines.bp import create_bp_model
        from ..._names import parse_model_name
        source, name = parse_model_name(cfg.model)
        hff = dict(cfg.hff)
        if source in ('hf-hub', 'local-dir'):
            raise ValueError(f"method 'bp' needs a timm architecture, not saved HFF weights ({cfg.model})")
        if source == 'hff':
            from ..._names import registered_defaults
            name, defaults = registered_defaults(name)
            hff = {**defaults, **hff}
        stem = {k: hff[k] for k in ('small_input', 'num_stages', 'stage_indices', 'balance') if k in hff}
        model = create_bp_model(name, num_classes=num_classes, in_chans=cfg.in_chans, pretrained=cfg.pretrained,
                                pretrained_file=cfg.pretrained_file, **stem, **cfg.model_kwargs)
        if cfg.head_only:
            head = {id(p) for p in model.get_classifier().parameters()}
            for p in model.parameters():
                p.requires_grad_(id(p) in head)
        return model

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
        from ..._io import atomic_dir
        small = bool(cfg.hff.get('small_input'))
        model = model.to(memory_format=torch.contiguous_format)   # safetensors stores contiguous tensors only
        with atomic_dir(path, carry_over=False) as tmp:
            save_for_hf(model, str(tmp), model_config=dict(label_names=data.label_names, hff_small_input=small),
                        model_args=dict(cfg.model_kwargs), data_config=data_cfg, safe_serialization=True)
        return path


def bp_loss(logits, target):
    """Cross-entropy with hard or soft (mixup, smoothing) targets, in float32."""
    import torch
    if target.ndim == 2:
        return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return torch.nn.functional.cross_entropy(logits.float(), target)
