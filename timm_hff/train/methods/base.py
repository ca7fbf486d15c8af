"""What a training method is to the run sequence: it builds its model, takes its training step, names its prediction
heads and saves its final model. The run sequence (``train/run.py``) and the trainers know nothing else of it.

A new method is one file in this folder: a subclass of ``Method`` decorated with ``@register_method``, plus its
import line in ``methods/__init__.py``. Module level stays light (no torch, no timm): ``hff-train --help`` lists the
methods without loading them.
"""
from typing import Any, Dict, List, Optional, Set, Tuple

__all__ = ['Method', 'NoAccelerator']


class Method:
    """Defaults are HFF's where a method could share them; a method overrides what differs."""
    name: str = ''
    help: str = ''                               # one line for ``hff-train --help``
    per_stage: bool = True                       # metrics of every stage and their ensemble, or one prediction
    exits: bool = False                          # adaptive exits can be fitted (``calibrate_exits``)
    schedules: Optional[Tuple[str, ...]] = None  # the schedules it trains under (None: every one)
    schedule_reason: str = ''                    # why another schedule does not apply, for the one-line refusal
    processes_reason: Optional[str] = None       # why several processes (DDP) do not apply; None: they do
    owns: Tuple[str, ...] = ()                   # mapping settings only this method reads (``ff``)
    baseline: bool = True                        # a baseline of HFF (``hff-train --baseline``; own run folder name)

    # ----- settings -----
    def check(self, cfg) -> None:
        """One-line refusals of settings this method cannot honour (called by ``TrainConfig.validate``)."""
        if self.schedules is not None and cfg.schedule not in self.schedules:
            raise ValueError(f"schedule {cfg.schedule!r} is an HFF schedule; method {self.name!r} "
                             f"{self.schedule_reason} (use schedule: {self.schedules[0]})")

    def identity(self, cfg) -> Dict[str, Any]:
        """Settings of this method a checkpoint must match to be resumed (beyond the common ones)."""
        return {}

    # ----- the model -----
    def build_model(self, cfg, num_classes: int, label_names: Optional[List[str]] = None):
        """The run's model for ``num_classes`` classes named ``label_names`` (the training data's)."""
        raise NotImplementedError

    def num_stages(self, model) -> int:
        return model.num_stages

    def unused_parameters(self, model) -> bool:
        """Parameters that get no gradient in a step (DDP must be told)."""
        return False

    def profile(self, model, img_size) -> Optional[List[Dict[str, Any]]]:
        """Per-stage shares of parameters and FLOPs (the run header), or None."""
        return None

    def compile(self, model, cfg) -> None:
        """timm train.py's ``--torchcompile``: the whole forward."""
        import torch
        model.forward = torch.compile(model.forward, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)

    def head_parameter_names(self, model) -> Set[str]:
        """The heads' parameters: trained at ``lr`` whatever the backbone factors, and the only ones trained by
        ``head_only`` and during ``head_warmup_epochs``."""
        ids = {id(p) for p in model.get_classifier().parameters()}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    def set_trainable(self, model, cfg, epoch: int) -> None:
        """The heads-only warm-up: for the first ``head_warmup_epochs`` epochs only the heads take a gradient."""
        warm = epoch < cfg.head_warmup_epochs
        heads = self.head_parameter_names(model)
        for n, p in model.named_parameters():
            p.requires_grad_(not warm or n in heads)

    def train_mode(self, model, cfg, epoch: int) -> None:
        """``model.train()``; a frozen backbone (``head_only``, the warm-up) keeps its norm layers in eval mode."""
        model.train()
        if cfg.head_only or epoch < cfg.head_warmup_epochs:
            model.eval()
            model.get_classifier().train()

    def clip_groups(self, model, num_stages: int) -> List[list]:
        """Parameter groups whose gradient norm ``clip_grad`` bounds separately (one per local loss)."""
        return [list(model.parameters())]

    # ----- a step, an evaluation -----
    def step(self, acc, model, unwrapped, x, target, stage: Optional[int], mode: str):
        """Forward, loss and backward of one batch (inside ``accelerator.accumulate``); returns (the loss to log,
        the per-stage losses)."""
        raise NotImplementedError

    def heads(self, module, x) -> list:
        """Logits to score, in the order of ``accuracy_row``: every stage, the ensemble, the prediction (per-stage
        methods), or the prediction alone."""
        return [module(x)]

    # ----- the end of a run -----
    def save(self, model, path: str, cfg, data, metrics: Dict[str, Any], data_cfg=None) -> Optional[str]:
        """Write the final model into ``path``; returns the folder, or None when it was not saved."""
        raise NotImplementedError


class NoAccelerator:
    """What a method's ``step`` uses of an ``Accelerator``, for one plain process (benchmarks, notebooks)."""

    @staticmethod
    def backward(loss) -> None:
        loss.backward()

    @staticmethod
    def autocast():
        import contextlib
        return contextlib.nullcontext()


def card_metrics(metrics: Dict[str, Any], cfg, data) -> Dict[str, Any]:
    """The figures a saved model carries: numbers, the split names, and the data set's Hub id."""
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    keep.update({k: metrics[k] for k in ('split', 'val_split') if metrics.get(k) is not None})
    keep = dict(keep, dataset=dataset_id(data))
    keep.setdefault('split', cfg.val_split)
    return keep


def dataset_id(data) -> str:
    """A Hub id for the model card where one exists (Fashion-MNIST's IDX files have one), else the folder name."""
    import os
    if data.source == 'hub':
        return data.name
    if data.source == 'idx' and 'fashion' in data.name.lower():
        return 'zalando-datasets/fashion_mnist'
    return os.path.basename(data.name.rstrip('/')) or data.name


def warn_frozen_random(cfg) -> None:
    """``freeze_stages`` / ``head_only`` keep weights as they start: from scratch those are random layers, which is
    rarely meant (a random-features baseline aside), so it is said in one line."""
    import logging
    if (cfg.freeze_stages or cfg.head_only) and not (cfg.pretrained or cfg.pretrained_file):
        which = 'head_only' if cfg.head_only else f'freeze_stages {list(cfg.freeze_stages)}'
        logging.getLogger(__name__).warning(f'{which} with pretrained: false freezes randomly initialised layers '
                                            f'(nothing is loaded); set pretrained: true (or pretrained_file) to '
                                            f'freeze trained weights')
