"""``method: ff``: Forward-Forward at HFF's stage cut (``timm_hff.baselines``), a baseline: C passes per prediction."""
import json
from typing import Any, Dict, Optional, Set

from ..registry import register_method
from .base import Method, card_metrics

__all__ = ['FFMethod']

_SOFT = "makes soft labels, and FF's negatives are wrong hard labels"
# settings FF is kept apart from: it is a plain baseline (one process, all stages at once, hard labels, fresh backbone)
_REFUSED = dict(freeze_stages='is for HFF transfer', head_only='is for HFF transfer',
                reset_prototypes='is for HFF heads', stage_lr='is for HFF stages', calibrate_exits='is for HFF exits',
                torchcompile='is for HFF and BP', grad_checkpointing='is for HFF and BP', mixup=_SOFT, cutmix=_SOFT,
                smoothing=_SOFT)


@register_method
class FFMethod(Method):
    name = 'ff'
    help = 'Forward-Forward, a baseline'
    schedules = ('simultaneous',)
    schedule_reason = 'trains all its stages each step'
    processes_reason = ("method 'ff' trains in one process (its loss is not a forward that DDP can wrap); run it "
                        "without accelerate launch / --num_processes")
    owns = ('ff',)

    def check(self, cfg) -> None:
        from ...baselines.ff import FFConfig
        try:
            FFConfig(**cfg.ff)
        except TypeError:
            known = ', '.join(FFConfig.__dataclass_fields__)
            unknown = ', '.join(k for k in cfg.ff if k not in FFConfig.__dataclass_fields__)
            raise ValueError(f'ff has unknown setting(s) {unknown}; FFConfig knows {known}') from None
        except ValueError as e:
            raise ValueError(f'ff: {e}') from None
        super().check(cfg)
        default = type(cfg).__dataclass_fields__
        for name, what in _REFUSED.items():
            value = getattr(cfg, name)
            if value is not None if name == 'calibrate_exits' else value:
                off = default[name].default_factory() if callable(default[name].default_factory) else \
                    default[name].default
                raise ValueError(f"{name} {what}; method 'ff' (a Forward-Forward baseline) does not take it: "
                                 f"drop it or override the recipe's (--{name} {json.dumps(off)})")
        if cfg.layer_decay is not None or cfg.backbone_lr_scale != 1.0 or cfg.head_warmup_epochs or cfg.pretrained_file:
            raise ValueError("layer_decay / backbone_lr_scale / head_warmup_epochs / pretrained_file fine-tune a "
                             "pretrained backbone; method 'ff' trains a fresh one (drop them)")
        if cfg.pretrained:
            raise ValueError("method 'ff' appends a label channel to the input, so timm's pretrained stem does not "
                             "fit; drop pretrained")

    def identity(self, cfg) -> Dict[str, Any]:
        """The resolved FF settings (defaults filled in; chunk_size only batches scoring), so a resume that would
        train with another threshold or label encoding is refused."""
        from ...baselines.ff import FFConfig
        ff = FFConfig(**cfg.ff).to_dict()
        ff.pop('chunk_size')
        return dict(ff=ff)

    def build_model(self, cfg, num_classes: int, label_names=None):
        """``timm_hff.baselines.create_ff_model``: the recipe's backbone and stage cut, one extra input channel for
        the label plane, no prototype heads."""
        from ...baselines.ff import FFConfig, create_ff_model
        from ...core import parse_model_name
        if parse_model_name(cfg.model)[0] in ('hf-hub', 'local-dir'):
            raise ValueError(f"method 'ff' needs a timm architecture, not saved HFF weights ({cfg.model})")
        hff = dict(cfg.hff)
        if cfg.img_size and 'check_img_size' not in hff:
            hff['check_img_size'] = cfg.img_size
        return create_ff_model(cfg.model, num_classes=num_classes, in_chans=cfg.in_chans, ff_cfg=FFConfig(**cfg.ff),
                               **cfg.model_kwargs, **hff)

    def head_parameter_names(self, model) -> Set[str]:
        return set()   # no heads: a label plane and goodness per stage

    def step(self, acc, model, unwrapped, x, target, stage: Optional[int], mode: str):
        """One process (refused otherwise): the unwrapped model's own loss."""
        with acc.autocast():
            loss = unwrapped.loss(x, target)
        acc.backward(loss)
        return loss.detach(), unwrapped.last_stage_losses

    def heads(self, module, x) -> list:
        """HFF's rows from its C passes: each stage's goodness alone, all stages summed, its own prediction."""
        g = module.class_goodness(x).float()           # (S, B, C)
        return list(g.unbind(0)) + [g.sum(0), module.scores(g)]

    def save(self, model, path: str, cfg, data, metrics: Dict[str, Any], data_cfg=None) -> Optional[str]:
        """Its weights (safetensors) and what rebuilds it (``create_ff_model`` arguments), the folder replaced
        whole."""
        import os
        import torch
        from safetensors.torch import save_model
        from ...core import atomic_dir, atomic_write_text
        config = dict(method='ff', model_name=cfg.model, num_classes=model.num_classes, in_chans=cfg.in_chans,
                      model_kwargs=dict(cfg.model_kwargs), hff=dict(cfg.hff), ff=model.cfg.to_dict(),
                      label_names=list(data.label_names), metrics=card_metrics(metrics, cfg, data),
                      rebuild='timm_hff.baselines.create_ff_model(model_name, num_classes, in_chans, '
                              'FFConfig(**ff), **model_kwargs, **hff), then safetensors.torch.load_model')
        with atomic_dir(path, carry_over=False) as tmp:
            save_model(model.to(memory_format=torch.contiguous_format), os.path.join(tmp, 'model.safetensors'))
            atomic_write_text(os.path.join(tmp, 'config.json'), json.dumps(config, indent=2, default=str) + '\n')
        return path
