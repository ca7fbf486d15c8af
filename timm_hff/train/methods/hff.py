"""``method: hff``: the timm backbone cut into stages, each learning from its own prototype head's local loss."""
from typing import Any, Dict, List, Optional, Set

from ..registry import register_method
from .base import Method, card_metrics, warn_frozen_random

__all__ = ['HFFMethod']


@register_method
class HFFMethod(Method):
    name = 'hff'
    help = 'local prototype losses'
    exits = True
    baseline = False

    def build_model(self, cfg, num_classes: int, label_names=None):
        """``timm_hff.create_model`` of the recipe: timm's (pretrained) backbone or saved HFF weights; new labels get
        fresh prototypes; ``freeze_stages`` / ``head_only`` freeze backbone slices (fresh heads are re-fitted)."""
        from ...factory import create_model
        from ...core import parse_model_name
        warn_frozen_random(cfg)
        hff = dict(cfg.hff)
        if cfg.img_size and 'check_img_size' not in hff:
            hff['check_img_size'] = cfg.img_size
        if hff.get('balance') == 'step':   # the cut is timed as this run will train: its batch and memory format
            hff.setdefault('balance_batch', cfg.batch_size)
            hff.setdefault('balance_channels_last', bool(cfg.channels_last))
        weights = dict(pretrained_cfg_overlay=dict(file=cfg.pretrained_file)) if cfg.pretrained_file else {}
        model = create_model(cfg.model, pretrained=cfg.pretrained or bool(cfg.pretrained_file),
                             num_classes=num_classes, in_chans=cfg.in_chans, **weights, **cfg.model_kwargs, **hff)
        new_labels = model.num_classes != num_classes or cfg.reset_prototypes
        if not new_labels:
            check_same_labels(model, cfg, label_names)
        if new_labels:   # a new label set: fresh prototypes
            model.reset_classifier(num_classes)
        saved = parse_model_name(cfg.model)[0] in ('hf-hub', 'local-dir')
        trained_heads = cfg.pretrained and saved and not new_labels
        if cfg.freeze_stages:   # a frozen stage's head is re-fitted when it is new (timm weights, new labels)
            model.freeze_stages(cfg.freeze_stages, heads=trained_heads)
        if cfg.head_only:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
        return model

    def unused_parameters(self, model) -> bool:
        return bool(model.split.unused_param_names)   # a truncated backbone leaves parameters unused

    def profile(self, model, img_size) -> Optional[List[Dict[str, Any]]]:
        from ...model import stage_profile
        return stage_profile(model, img_size)

    def compile(self, model, cfg) -> None:
        """Block by block, keeping the stage cuts eager (``timm_hff._compile``)."""
        from ...model import compile_model
        compile_model(model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)

    def head_parameter_names(self, model) -> Set[str]:
        return {n for n, _ in model.named_parameters() if n.startswith('heads.')}

    def set_trainable(self, model, cfg, epoch: int) -> None:
        """Warm-up: every stage's backbone slice frozen (its head trains); afterwards unfrozen again, bar the stages
        ``freeze_stages`` froze at build (left as they are)."""
        kept = {k % model.num_stages for k in cfg.freeze_stages}
        warming = [k for k in range(model.num_stages) if k not in kept]
        if epoch < cfg.head_warmup_epochs:
            model.freeze_stages(warming, heads=False)
        else:
            model.unfreeze_stages(warming)

    def train_mode(self, model, cfg, epoch: int) -> None:
        """Frozen stages keep their norm statistics through ``HFFModel.train``; a frozen backbone keeps all."""
        model.train()
        if cfg.head_only or epoch < cfg.head_warmup_epochs:
            model.backbone.eval()

    def clip_groups(self, model, num_stages: int) -> List[list]:
        return [model.stage_parameters(k) for k in range(num_stages)]

    def step(self, acc, model, unwrapped, x, target, stage: Optional[int], mode: str):
        """One forward: every stage's detached input, its own loss; ``memory_efficient`` runs each stage's backward
        inside it (through ``backward_fn``, which the other mode leaves unused), else one backward of the summed
        (gradient-isolated) losses."""
        out = model(x, target, mode=mode, stages=None if stage is None else [stage], backward_fn=acc.backward)
        if not out.backward_done:
            acc.backward(out.loss)
        return out.loss.detach(), out.stage_losses

    def heads(self, module, x) -> list:
        from ...heads import log_probs_mean
        stage_logits = module.forward_stages(x)
        return stage_logits + [log_probs_mean(stage_logits), module.predict_from_stages(stage_logits)]

    def save(self, model, path: str, cfg, data, metrics: Dict[str, Any], data_cfg=None) -> Optional[str]:
        """``timm_hff.save_pretrained``: config.json + model.safetensors + card."""
        import logging
        from ... import hub
        train_args = dict(cfg.to_dict(), dataset_name=data.name)
        try:
            return hub.save_pretrained(model, path, label_names=data.label_names,
                                       metrics=card_metrics(metrics, cfg, data), train_args=train_args) or path
        except NotImplementedError as e:
            logging.getLogger(__name__).warning(f'final model not saved: {e}')
            return None


def check_same_labels(model, cfg, label_names) -> None:
    """Saved prototypes are the saved classes': data whose class names differ (the same count, other classes or
    another order) is a new label set, which must be said (``reset_prototypes``), not trained on the old prototypes."""
    saved = model.pretrained_cfg.get('label_names')
    if not saved or not label_names or [str(n) for n in saved] == [str(n) for n in label_names]:
        return
    show = (lambda names: ', '.join(map(str, names[:4])) + (', ...' if len(names) > 4 else ''))
    raise ValueError(f'{cfg.model} was trained on the classes [{show(saved)}], the data has [{show(label_names)}]: '
                     f'for a new label set set reset_prototypes: true (fresh prototypes in every stage, frozen ones '
                     f'fitted too); for the same classes give label_names in the saved order')
