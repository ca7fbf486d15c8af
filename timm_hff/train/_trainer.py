"""The training loop on HF Accelerate, one straight line:

    TrainConfig -> data (datasets + timm transforms) -> model (HFF or BP) -> timm optimizer / scheduler
      -> accelerator.prepare -> per epoch: train (local stage losses) -> evaluate every stage -> checkpoint
      -> save_pretrained

Multi-process runs go through ``accelerate launch``; everything here is written once for any number of
processes (DDP) and for mixed precision ('no' | 'bf16' | 'fp16').

Over 400 lines because the Accelerate loop keeps its schedules, evaluation, EMA, checkpoints and fault handling
together (one ``Trainer``); stage-parallel training, exits, metrics and checkpoints naming already live apart.
"""
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.nn as nn

from .._profile import format_profile, stage_profile
from ..data import (
    ImageData, ImageLoader, carve_validation, create_image_loader, load_image_dataset, parse_split, resolve_data_config,
)
from ._checkpoint import (
    CKPT_DIR, EMA_FILE, STATE_FILE, RunLock, check_compatible, checkpoint_name, list_checkpoints, prune, read_state,
    resolve_resume,
)
from ._config import TrainConfig
from ._evaluate import accuracy_row, prediction_heads, topk_hits
from ._exits import adaptive_point, calibrate, describe_point
from ._metrics import atomic_write_text, write_metrics

_logger = logging.getLogger(__name__)

# Stage losses are checked for NaN / inf at every step on the device; the host reads the verdict (one sync, and
# one gather under DDP, so that every process stops together) every this many steps and at the end of an epoch.
FINITE_CHECK_EVERY = 16


# ----------------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The HFF model of the recipe, or (``method: bp``) the same timm backbone with timm's own head, or
    (``method: ff``) that backbone trained by Forward-Forward at HFF's cut."""
    if cfg.method == 'bp':
        return build_bp_model(cfg, num_classes)
    if cfg.method == 'ff':
        return build_ff_model(cfg, num_classes)
    from .._factory import create_model, parse_model_name

    hff = dict(cfg.hff)
    if cfg.img_size and 'check_img_size' not in hff:
        hff['check_img_size'] = cfg.img_size
    weights = dict(pretrained_cfg_overlay=dict(file=cfg.pretrained_file)) if cfg.pretrained_file else {}
    model = create_model(cfg.model, pretrained=cfg.pretrained or bool(cfg.pretrained_file), num_classes=num_classes,
                         in_chans=cfg.in_chans, **weights, **cfg.model_kwargs, **hff)
    new_labels = model.num_classes != num_classes or cfg.reset_prototypes
    if new_labels:   # a new label set: fresh prototypes
        model.reset_classifier(num_classes)
    trained_heads = cfg.pretrained and parse_model_name(cfg.model)[0] in ('hf-hub', 'local-dir') and not new_labels
    if cfg.freeze_stages:   # a frozen stage's head is re-fitted when it is new (timm weights, new labels), else kept
        model.freeze_stages(cfg.freeze_stages, heads=trained_heads)
    if cfg.head_only:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model


def build_bp_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``baselines.create_bp_model``: timm's classifier with HFF's small-input stem adaptation at HFF's own stage
    cut, so BP and HFF train the very same backbone; ``head_only`` freezes all but timm's classifier (a linear
    probe)."""
    from ..baselines.bp import create_bp_model
    from .._factory import parse_model_name

    source, name = parse_model_name(cfg.model)
    hff = dict(cfg.hff)
    if source in ('hf-hub', 'local-dir'):
        raise ValueError(f"method 'bp' needs a timm architecture, not saved HFF weights ({cfg.model})")
    if source == 'hff':
        from .._registry import registered_defaults
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


def build_ff_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``timm_hff.baselines.create_ff_model``: the recipe's backbone and stage cut, one extra input channel for
    the label plane, no prototype heads."""
    from ..baselines.ff import FFConfig, create_ff_model
    from .._factory import parse_model_name

    if parse_model_name(cfg.model)[0] in ('hf-hub', 'local-dir'):
        raise ValueError(f"method 'ff' needs a timm architecture, not saved HFF weights ({cfg.model})")
    hff = dict(cfg.hff)
    if cfg.img_size and 'check_img_size' not in hff:
        hff['check_img_size'] = cfg.img_size
    return create_ff_model(cfg.model, num_classes=num_classes, in_chans=cfg.in_chans, ff_cfg=FFConfig(**cfg.ff),
                           **cfg.model_kwargs, **hff)


def _decay_epochs(cfg: TrainConfig) -> Dict[str, Any]:
    """``decay_epochs`` for timm's scheduler factory only when set: timm 1.0.29 multiplies it by the updates per
    epoch whatever the schedule, so None (a cosine recipe's default) fails there."""
    return {} if cfg.decay_epochs is None else dict(decay_epochs=cfg.decay_epochs)


def head_parameter_names(model: nn.Module) -> Set[str]:
    """The heads' parameters (HFF's prototype heads, BP's timm classifier): trained at ``lr`` whatever the backbone
    factors, and the only ones trained by ``head_only`` and during ``head_warmup_epochs``."""
    if hasattr(model, 'heads') and hasattr(model, 'split'):
        return {n for n, _ in model.named_parameters() if n.startswith('heads.')}
    ids = {id(p) for p in model.get_classifier().parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def param_groups(model: nn.Module, cfg: TrainConfig) -> list:
    """Optimizer groups by (lr factor, decay), each parameter's factor the product of timm's layer decay (over the
    backbone's ``group_matcher``), ``backbone_lr_scale`` (backbone parameters only) and ``stage_lr`` (HFF stages),
    applied through timm's ``lr_scale`` so every scheduler honours them. No weight decay where timm leaves it out
    (biases, norms, ``no_weight_decay()``)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scale = {n: 1.0 for n in params}
    if cfg.layer_decay is not None:
        from timm.optim import param_groups_layer_decay
        ids = {id(p): n for n, p in params.items()}
        for g in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=cfg.layer_decay):
            for p in g['params']:
                scale[ids[id(p)]] *= g['lr_scale']
    heads = head_parameter_names(model)
    if cfg.backbone_lr_scale != 1.0:
        for n in params:
            if n not in heads:
                scale[n] *= cfg.backbone_lr_scale
    if cfg.stage_lr:
        if len(cfg.stage_lr) != model.num_stages:
            raise ValueError(f'stage_lr lists {len(cfg.stage_lr)} factors but the model has {model.num_stages} stages')
        owner = {f'backbone.{n}': k for k, names in enumerate(model.split.stage_param_names) for n in names}
        for n in params:
            k = int(n.split('.')[1]) if n.startswith('heads.') else owner.get(n)
            if k is not None:
                scale[n] *= float(cfg.stage_lr[k])
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    groups: Dict[Tuple[float, bool], list] = {}
    for n, p in params.items():
        decay = not (p.ndim <= 1 or n.endswith('.bias') or n in skip)
        groups.setdefault((scale[n], decay), []).append(p)
    return [dict(params=ps, weight_decay=cfg.weight_decay if decay else 0.0, lr_scale=s)
            for (s, decay), ps in groups.items()]


def build_optimizer(cfg: TrainConfig, model: nn.Module):
    """timm's ``create_optimizer_v2`` over the parameters that require grad, lr factors applied (``param_groups``)."""
    from timm.optim import create_optimizer_v2
    opt_kwargs = {}
    if cfg.opt_eps is not None:
        opt_kwargs['eps'] = cfg.opt_eps
    if cfg.opt_betas is not None:
        opt_kwargs['betas'] = tuple(cfg.opt_betas)
    factors = cfg.stage_lr or cfg.layer_decay is not None or cfg.backbone_lr_scale != 1.0
    params = param_groups(model, cfg) if factors else model
    return create_optimizer_v2(params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               **opt_kwargs)


def set_trainable(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    """The heads-only warm-up: for the first ``head_warmup_epochs`` epochs only the heads train (the backbone's
    parameters take no gradient), then the whole model does, bar what ``freeze_stages`` keeps frozen."""
    if not cfg.head_warmup_epochs:
        return
    model = _unwrap(model)
    warm = epoch < cfg.head_warmup_epochs
    if hasattr(model, 'freeze_stages') and hasattr(model, 'split'):
        kept = {k % model.num_stages for k in cfg.freeze_stages}   # frozen at build, and left as they are
        warming = [k for k in range(model.num_stages) if k not in kept]
        if warm:
            model.freeze_stages(warming, heads=False)
        else:
            model.unfreeze_stages(warming)
        return
    heads = head_parameter_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(not warm or n in heads)


def set_train_mode(model: nn.Module, cfg: TrainConfig, epoch: int = 0) -> None:
    """``model.train()``, keeping a frozen backbone's norm layers in eval mode (head-only transfer, the heads-only
    warm-up; HFF's frozen stages keep theirs through ``HFFModel.train``)."""
    model.train()
    if cfg.head_only or epoch < cfg.head_warmup_epochs:
        inner = _unwrap(model)
        if hasattr(inner, 'backbone'):
            inner.backbone.eval()
        else:   # BP: everything but timm's classifier
            inner.eval()
            inner.get_classifier().train()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, 'module') and isinstance(model.module, nn.Module) else model


# ------------------------------------------------------------------------------------------------------ data
def build_data(cfg: TrainConfig, accelerator) -> Tuple[ImageData, ImageData, Optional[ImageData]]:
    """(train, validation, test or None). The test split is loaded here, so a wrong name fails before training, but
    it is read only once, after the last epoch."""
    kw = dict(streaming=cfg.streaming, input_key=cfg.input_key, target_key=cfg.target_key,
              dataset_config=cfg.dataset_config)
    with accelerator.main_process_first():   # one process fills the datasets cache, the others read it
        train = load_image_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, num_classes=cfg.num_classes,
                                   num_samples=cfg.train_num_samples, **kw)
        if cfg.val_fraction > 0:
            train, val = carve_validation(train, cfg.val_fraction, cfg.split_seed)
            if cfg.val_num_samples is not None and cfg.val_num_samples < len(val):
                val.dataset = val.dataset.select(range(cfg.val_num_samples))
                val.num_samples = cfg.val_num_samples
        else:
            val = load_image_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, num_classes=train.num_classes,
                                     num_samples=cfg.val_num_samples, **kw)
        test = None
        if cfg.test_split is not None:
            test = load_image_dataset(cfg.dataset, cfg.data_dir, cfg.test_split, num_classes=train.num_classes,
                                      num_samples=cfg.val_num_samples, **kw)
    for other in (val, test):
        if other is not None and cfg.val_fraction == 0:
            _check_disjoint(train, other)
    if cfg.label_names is not None:
        if len(cfg.label_names) != train.num_classes:
            raise ValueError(f'label_names lists {len(cfg.label_names)} names but {train.name} has '
                             f'{train.num_classes} classes: give one name per class, in label order')
        for d in (train, val, test):
            if d is not None:
                d.label_names = list(cfg.label_names)
    return train, val, test


def _check_disjoint(train: ImageData, other: ImageData) -> None:
    """Refuse evaluating on rows that are trained on (``train[:54000]`` with ``train[50000:]``, or ``train``)."""
    base_t, rows_t = parse_split(train.split)
    base_o, rows_o = parse_split(other.split)
    if base_t != base_o or train.source != other.source or train.name != other.name:
        return
    n = len(train.dataset) if rows_t is None else None
    lo_t, hi_t = (0, n) if rows_t is None else (int(rows_t[0]), int(rows_t[1]))
    lo_o, hi_o = (0, len(other.dataset)) if rows_o is None else (int(rows_o[0]), int(rows_o[1]))
    if lo_o < hi_t and lo_t < hi_o:
        raise ValueError(f'{other.split} overlaps the training rows {train.split} of {train.name}: evaluate on '
                         f'rows that are not trained on (e.g. train_split: {base_t}[:90%] with {base_t}[90%:]), or use '
                         f'val_fraction')


def build_loaders(cfg: TrainConfig, model: nn.Module, train: ImageData, val: ImageData, accelerator,
                  test: Optional[ImageData] = None):
    data_cfg = resolve_data_config(model, cfg.in_chans, cfg.img_size, cfg.mean, cfg.std, cfg.crop_pct,
                                   cfg.interpolation)
    common = dict(workers=cfg.workers, seed=cfg.seed, in_memory=cfg.data_in_memory, channels_last=cfg.channels_last,
                  process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    train_loader = create_image_loader(train, data_cfg, True, cfg.batch_size, aug=cfg.aug_config(),
                                       drop_last=mixing, shuffle_buffer=cfg.shuffle_buffer, **common)
    eval_bs = cfg.validation_batch_size or cfg.batch_size
    val_loader = create_image_loader(val, data_cfg, False, eval_bs, **common)
    test_loader = create_image_loader(test, data_cfg, False, eval_bs, **common) if test is not None else None
    return data_cfg, train_loader, val_loader, test_loader


def _steps_per_epoch(loader: ImageLoader, iterable, cfg: TrainConfig, num_processes: int) -> int:
    """Batches per process per epoch (streams: from train_num_samples; all processes do the same count)."""
    if loader.kind == 'stream':
        steps = loader.num_samples // (cfg.batch_size * num_processes)
        if steps < 1:
            raise ValueError(f'train_num_samples={loader.num_samples} is less than one global batch '
                             f'({cfg.batch_size} x {num_processes} processes)')
        return steps
    return len(iterable)


# ------------------------------------------------------------------------------------------------------ loop
class Trainer:
    """Owns one run: call ``fit()``; the result is the last epoch's metrics (validation) plus, with a test split,
    the test evaluation under ``test_*`` keys."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        if cfg.schedule == 'stage_parallel':
            raise ValueError("schedule 'stage_parallel' runs one process per stage, which this Accelerate trainer does "
                             "not: use hff-train or timm_hff.train.create_trainer(cfg)")
        self.cfg = cfg
        self.out_dir = cfg.output_dir
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        needs_unused = cfg.schedule == 'sequential' or cfg.head_warmup_epochs > 0   # parameters with no gradient
        self._ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=needs_unused)
        project = dict(project_dir=self.out_dir) if cfg.log_with else {}
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=cfg.log_with, kwargs_handlers=[self._ddp_kwargs], step_scheduler_with_optimizer=False,
            **project)
        acc = self.accelerator
        if cfg.method == 'ff' and acc.num_processes > 1:
            raise ValueError("method 'ff' trains in one process (its loss is not a forward that DDP can wrap); run it "
                             "without accelerate launch / --num_processes")
        if cfg.schedule == 'memory_efficient' and acc.num_processes > 1:
            raise ValueError("schedule 'memory_efficient' runs each stage's backward inside the forward, which DDP "
                             "cannot synchronise; with several processes use schedule: simultaneous")
        self.lock = RunLock(self.out_dir)
        if acc.is_main_process:
            try:
                os.makedirs(self.out_dir, exist_ok=True)
                self.lock.acquire()
            except OSError as e:   # read-only or full file system: say so before any work is done
                raise _os_error(e, f'cannot write to the output folder {self.out_dir} ({_reason(e)}); choose a '
                                   f'writable --output') from None
        try:
            self._setup(needs_unused)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, needs_unused: bool) -> None:
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()
        self.resume_from = self._find_resume()

        set_seed(cfg.seed)   # the same initial weights on every process (DDP also broadcasts rank 0's)
        self.train_data, self.val_data, self.test_data = build_data(cfg, acc)
        self.num_classes = self.train_data.num_classes
        if self.resume_from:   # refuse another run's checkpoint before building anything
            check_compatible(read_state(self.resume_from), self.identity, self.resume_from)
        model = build_model(cfg, self.num_classes)
        if cfg.method == 'hff' and model.split.unused_param_names and not needs_unused:
            self._ddp_kwargs.find_unused_parameters = True   # a truncated backbone leaves parameters unused
        self.num_stages = model.num_stages if cfg.method != 'bp' else 1
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:   # with schedule memory_efficient: checkpointing inside each stage as well
            model.set_grad_checkpointing(True)
        self.profile = stage_profile(model, cfg.img_size) if cfg.method == 'hff' else None
        self._check_channels()
        self.data_cfg, self.train_loader, self.val_loader, self.test_loader = build_loaders(
            cfg, model, self.train_data, self.val_data, acc, self.test_data)
        self.total_epochs = cfg.epochs * (self.num_stages if cfg.schedule == 'sequential' else 1)
        if cfg.calibrate_exits is not None and self.val_loader.sharded and acc.num_processes > 1:
            raise ValueError('calibrate_exits fits thresholds on the whole validation split, which a streamed split '
                             'spreads over the processes; run on one process, or calibrate the saved model afterwards '
                             'with timm_hff.calibrate_exits')
        self.exits: Dict[str, Any] = {}   # '' / 'ema_' -> the fitted ExitCalibration (calibrate_exits)

        from timm.scheduler import create_scheduler_v2
        optimizer = build_optimizer(cfg, model)
        loaders = [self.train_loader, self.val_loader] + ([self.test_loader] if self.test_loader else [])
        to_prepare = [model, optimizer] + [ld.loader for ld in loaders if not ld.sharded]
        prepared = acc.prepare(*to_prepare)
        self.model, self.optimizer = prepared[0], prepared[1]
        rest = list(prepared[2:])
        iterables = [ld.loader if ld.sharded else rest.pop(0) for ld in loaders]
        self.train_iterable, self.val_iterable = iterables[0], iterables[1]
        self.test_iterable = iterables[2] if self.test_loader else None
        # batches per process: known only once Accelerate has sharded the loader
        self.steps_per_epoch = _steps_per_epoch(self.train_loader, self.train_iterable, cfg, acc.num_processes)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum_steps)
        sequential = cfg.schedule == 'sequential'
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs if sequential else self.total_epochs,
            cooldown_epochs=cfg.cooldown_epochs, decay_rate=cfg.decay_rate, **_decay_epochs(cfg),
            min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
            cycle_limit=self.num_stages if sequential else 1, cycle_decay=1.0,
            step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=self.updates_per_epoch)

        self.ema = None
        if cfg.model_ema:   # after prepare: a copy of the (broadcast) weights every process shares
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(acc.unwrap_model(self.model), decay=cfg.model_ema_decay,
                                  use_warmup=cfg.model_ema_warmup)
        if cfg.torchcompile:   # after the EMA copy (which stays eager: it only evaluates), in place under DDP
            self._compile(acc.unwrap_model(self.model))
        self.mixup = self._build_mixup()
        set_seed(cfg.seed, device_specific=True)   # from here on, each process draws its own augmentation
        self.start_epoch, self.updates, self.history = 0, 0, []
        if self.resume_from:
            self._load(self.resume_from)
        self.lr_at(self.start_epoch, self.updates)

    # ----- setup helpers -----
    def _compile(self, model: nn.Module) -> None:
        """timm train.py's --torchcompile: BP compiles the whole model; HFF compiles block by block, keeping the
        stage cuts eager (timm_hff._compile)."""
        cfg = self.cfg
        if cfg.method == 'bp':
            model.forward = torch.compile(model.forward, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
        else:
            from .._compile import compile_model
            compile_model(model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)


    def _check_channels(self) -> None:
        """Images of another channel count than ``in_chans`` are converted (as PIL's ``convert`` does): say so in one
        line, with the normalisation they get, rather than train on a silent conversion."""
        cfg = self.cfg
        native = self.train_data.native_channels()
        if native is None or native == cfg.in_chans:
            return
        kind = {1: 'grayscale', 3: 'RGB', 4: 'RGBA'}.get(native, f'{native}-channel')
        norm = ('the mean / std you gave' if cfg.mean is not None else "the model's default mean / std, not the "
                "data's: set mean and std")
        _logger.warning(f'{self.train_data.name} has {kind} images but in_chans={cfg.in_chans}: they are converted to '
                        f'{cfg.in_chans} channel(s) and normalised with {norm}; set in_chans: {native} to train on '
                        f'them as they are')
    @property
    def identity(self) -> Dict[str, Any]:
        """What a checkpoint must match to be resumed by this run."""
        c = self.cfg
        return dict(model=c.model, method=c.method, schedule=c.schedule, num_classes=self.num_classes,
                    hff=c.hff, model_kwargs=c.model_kwargs, in_chans=c.in_chans, **self._ff_identity(),
                    num_processes=self.accelerator.num_processes, batch_size=c.batch_size,
                    grad_accum_steps=c.grad_accum_steps, train_split=c.train_split, val_fraction=c.val_fraction,
                    split_seed=c.split_seed)

    def _ff_identity(self) -> Dict[str, Any]:
        """An FF run's resolved FF settings (its defaults filled in; chunk_size only batches scoring), so a resume
        that would train with another threshold or label encoding is refused."""
        if self.cfg.method != 'ff':
            return {}
        from ..baselines.ff import FFConfig
        ff = FFConfig(**self.cfg.ff).to_dict()
        ff.pop('chunk_size')
        return dict(ff=ff)

    def _find_resume(self) -> Optional[str]:
        cfg = self.cfg
        if cfg.resume:
            return resolve_resume(cfg.resume, self.out_dir)
        if list_checkpoints(self.out_dir):
            raise ValueError(f'{self.out_dir} already holds checkpoints of a run; pass --resume to continue it, or '
                             f'choose another --experiment / --output')
        return None

    def _build_mixup(self):
        cfg = self.cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                         num_classes=self.num_classes)
        return None

    def lr_at(self, epoch: int, updates: int) -> None:
        if self.scheduler is None:
            return
        if self.cfg.sched_on_updates:
            self.scheduler.step_update(updates)
        else:
            self.scheduler.step(epoch)

    def active_stage(self, epoch: int) -> Optional[int]:
        return epoch // self.cfg.epochs if self.cfg.schedule == 'sequential' else None

    # ----- checkpoints -----
    def _save(self, epoch: int) -> str:
        acc = self.accelerator
        root = os.path.join(self.out_dir, CKPT_DIR)
        final = os.path.join(root, checkpoint_name(epoch))
        tmp = os.path.join(root, '.tmp-' + checkpoint_name(epoch))
        if acc.is_main_process:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(tmp, safe_serialization=True)
            acc.wait_for_everyone()   # every process's files (its RNG state) are in tmp before it becomes final
            if acc.is_main_process:
                state = dict(epoch=epoch, updates=self.updates, history=self.history, identity=self.identity)
                atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1) + '\n')
                if self.ema is not None:
                    from safetensors.torch import save_file
                    save_file({k: v.contiguous() for k, v in self.ema.module.state_dict().items()},
                              os.path.join(tmp, EMA_FILE))
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except (OSError, RuntimeError) as e:   # disk full, read-only, quota: torch reports these as RuntimeError
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise _os_error(e, f'cannot write checkpoint {final} ({_reason(e)}); {self._kept()}: free disk space '
                               f'or fix permissions, then {self._go_on()}') from None
        if acc.is_main_process:
            prune(self.out_dir, self.cfg.checkpoint_hist)
        acc.wait_for_everyone()
        return final

    def _kept(self) -> str:
        found = list_checkpoints(self.out_dir)
        return f'the last good checkpoint {found[-1]} is kept' if found else 'no checkpoint had been written yet'

    def _go_on(self) -> str:
        return 'continue with --resume' if list_checkpoints(self.out_dir) else 'start the run again'

    def _load(self, ckpt: str) -> None:
        state = read_state(ckpt)
        try:
            self.accelerator.load_state(ckpt)
        except Exception as e:   # truncated or foreign files; the identity was already checked
            from ..hub import CorruptCheckpointError
            raise CorruptCheckpointError(f'--resume {ckpt}: the checkpoint cannot be loaded ({type(e).__name__}: '
                                         f'{_first_line(e)}); resume from an earlier checkpoint or start a new '
                                         f'experiment') from None
        if self.ema is not None:
            path = os.path.join(ckpt, EMA_FILE)
            if not os.path.isfile(path):
                raise ValueError(f'--resume {ckpt}: model_ema is on but the checkpoint has no {EMA_FILE}')
            from safetensors.torch import load_file
            self.ema.module.load_state_dict(load_file(path))
        self.start_epoch = int(state['epoch']) + 1
        self.updates = int(state['updates'])
        self.history = list(state['history'])
        self.accelerator.print(f'resumed from {ckpt} (epoch {state["epoch"] + 1} done)')

    # ----- one epoch -----
    def _sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's norm statistics everywhere (DDP broadcasts them at each forward; do it before eval / save)."""
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist
            for b in module.buffers():
                dist.broadcast(b.data, src=0)

    def _targets(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is not None:
            return self.mixup(x, y)
        if self.cfg.smoothing > 0:
            from timm.data.mixup import one_hot
            off = self.cfg.smoothing / self.num_classes
            return x, one_hot(y, self.num_classes, on_value=1.0 - self.cfg.smoothing + off, off_value=off)
        return x, y

    def _bp_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2:
            return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return nn.functional.cross_entropy(logits.float(), target)

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        model, unwrapped = self.model, acc.unwrap_model(self.model)
        stage = self.active_stage(epoch)
        if stage is not None:   # greedy: earlier stages frozen (norms in eval), later ones not run
            unwrapped.unfreeze_stages(range(self.num_stages))
            unwrapped.freeze_stages(range(stage))
        set_trainable(model, cfg, epoch)
        set_train_mode(model, cfg, epoch)
        if self.train_loader.kind == 'stream':
            self.train_loader.loader.dataset.set_epoch(epoch)
        else:
            self.train_iterable.set_epoch(epoch)
        transform = self.train_loader.transform
        mode = 'memory_efficient' if cfg.schedule == 'memory_efficient' else 'simultaneous'
        stage_params = ([unwrapped.stage_parameters(k) for k in range(self.num_stages)]
                        if cfg.method == 'hff' else [list(unwrapped.parameters())])
        trained = ([stage] if stage is not None else [k for k in range(self.num_stages)
                                                       if k not in getattr(unwrapped, 'frozen_stages', [])])

        from tqdm.auto import tqdm
        bar = tqdm(total=self.steps_per_epoch, desc=f'epoch {epoch + 1}/{self.total_epochs}', leave=False,
                   disable=not (cfg.progress and acc.is_local_main_process), dynamic_ncols=True)
        loss_sum = torch.zeros((), device=acc.device)
        stage_sum = torch.zeros(self.num_stages, device=acc.device)
        first_bad = torch.full((len(trained),), -1, dtype=torch.long, device=acc.device)   # step of a NaN / inf
        bad_value = torch.zeros(len(trained), device=acc.device)
        seen, steps, start, last_print = 0, 0, time.time(), time.time()
        batches = _take(self.train_iterable, self.steps_per_epoch, restart=self.train_loader.kind == 'stream')
        for step, (x, y) in enumerate(batches):
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
            x, target = self._targets(transform(x), y)
            with acc.accumulate(model):
                if cfg.method == 'bp':
                    loss = self._bp_loss(model(x), target)
                    acc.backward(loss)
                    stage_losses = [loss.detach()]
                elif cfg.method == 'ff':   # one process (refused otherwise): the unwrapped model's own loss
                    with acc.autocast():
                        loss = unwrapped.loss(x, target)
                    acc.backward(loss)
                    loss, stage_losses = loss.detach(), unwrapped.last_stage_losses
                else:
                    out = model(x, target, mode=mode, stages=None if stage is None else [stage],
                                backward_fn=acc.backward if mode == 'memory_efficient' else None)
                    if not out.backward_done:
                        acc.backward(out.loss)
                    loss, stage_losses = out.loss.detach(), out.stage_losses
                if acc.sync_gradients and cfg.clip_grad:
                    acc.unscale_gradients()
                    for params in stage_params:   # each stage's own gradient norm: their losses are separate
                        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.updates += 1
                self.lr_at(epoch, self.updates)
                if self.ema is not None:
                    self.ema.update(unwrapped, step=self.updates)
            step_losses = torch.stack([s.float() for s in stage_losses])
            newly_bad = ~torch.isfinite(step_losses) & (first_bad < 0)   # no host sync: flags stay on the device
            first_bad = torch.where(newly_bad, step, first_bad)
            bad_value = torch.where(newly_bad, step_losses, bad_value)
            if (step + 1) % FINITE_CHECK_EVERY == 0:
                self._check_finite(first_bad, bad_value, trained, epoch)
            loss_sum += loss.detach().float()
            stage_sum[trained] += step_losses
            seen += x.shape[0]
            steps += 1
            bar.update(1)
            if bar.disable is False and (time.time() - last_print > 1.0 or step + 1 == self.steps_per_epoch):
                last_print = time.time()
                bar.set_postfix(loss=f'{loss_sum.item() / (step + 1):.4f}',
                                img_s=f'{seen * acc.num_processes / (time.time() - start):.0f}',
                                lr=f"{self.optimizer.param_groups[0]['lr']:.3g}")
        bar.close()
        self._check_finite(first_bad, bad_value, trained, epoch)
        steps = max(steps, 1)
        elapsed = time.time() - start
        totals = acc.reduce(torch.cat([loss_sum.view(1), stage_sum]), reduction='mean') / steps
        row = dict(train_loss=totals[0].item(), lr=self.optimizer.param_groups[0]['lr'],
                   train_time_s=elapsed, train_img_per_s=seen * acc.num_processes / max(elapsed, 1e-9))
        if cfg.method != 'bp':
            for k in trained:
                row[f'train_loss_stage{k}'] = totals[1 + k].item()
        if stage is not None:
            row['active_stage'] = stage
        return row

    def _check_finite(self, first_bad: torch.Tensor, bad_value: torch.Tensor, trained, epoch: int) -> None:
        """Stop at the first NaN / inf stage loss of any process, naming the stage and the step; nothing is saved,
        so the last checkpoint on disk stays the last good one. Every process calls this at the same steps."""
        acc = self.accelerator
        n = len(trained)
        if acc.num_processes > 1:
            first_bad = acc.gather(first_bad).view(acc.num_processes, n)
            bad_value = acc.gather(bad_value).view(acc.num_processes, n)
        else:
            first_bad, bad_value = first_bad.view(1, n), bad_value.view(1, n)
        bad = first_bad >= 0
        if not bool(bad.any()):
            return
        earliest = torch.where(bad, first_bad, torch.iinfo(torch.long).max).flatten().argmin().item()
        rank, j = divmod(int(earliest), n)
        what = f'stage {trained[j]} loss' if self.cfg.method != 'bp' else 'loss'
        on = f' on process {rank}' if acc.num_processes > 1 else ''
        raise FloatingPointError(
            f'{what} is {bad_value[rank, j].item()} at epoch {epoch + 1}, step {int(first_bad[rank, j]) + 1} of '
            f'{self.steps_per_epoch}{on}; training stopped without saving and {self._kept()}: lower lr, set '
            f'clip_grad or check the data, then {self._go_on()}')

    @torch.no_grad()
    def evaluate(self, module: nn.Module, prefix: str = '', split: str = 'val') -> Dict[str, Any]:
        """Top-1 / top-5 of every stage and of the model's prediction over the whole split ('val' or 'test'), each
        image once."""
        acc, cfg = self.accelerator, self.cfg
        loader, iterable = ((self.val_loader, self.val_iterable) if split == 'val'
                            else (self.test_loader, self.test_iterable))
        self._sync_buffers(module)
        module.eval()
        transform = loader.transform
        k = min(5, self.num_classes)
        n_heads = self.num_stages + 2 if cfg.method != 'bp' else 1
        correct1 = torch.zeros(n_heads, dtype=torch.long, device=acc.device)
        correct5 = torch.zeros(n_heads, dtype=torch.long, device=acc.device)
        total = torch.zeros((), dtype=torch.long, device=acc.device)
        gather = not loader.sharded   # map-style: gather_for_metrics drops the padding of the last batch
        for x, y in iterable:
            x, y = transform(x.to(acc.device)), y.to(acc.device)
            with acc.autocast():
                heads = prediction_heads(module, x, method=cfg.method)
            c1, c5 = topk_hits(heads, y, k)
            if gather:
                c1, c5 = acc.gather_for_metrics((c1, c5))
            correct1 += c1.sum(0)
            correct5 += c5.sum(0)
            total += c1.shape[0]
        if not gather:
            correct1, correct5, total = (acc.reduce(t, reduction='sum') for t in (correct1, correct5, total))
        return accuracy_row(correct1, correct5, int(total), self.num_stages, self.num_classes,
                            hff=cfg.method != 'bp', prefix=prefix, images_key=f'{split}_images')

    # ----- the run -----
    def fit(self) -> Dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        try:
            if cfg.log_with:
                acc.init_trackers(cfg.run_name, config=_flat_config(cfg))
            if acc.is_main_process:
                atomic_write_text(os.path.join(self.out_dir, 'config.yaml'), _yaml(cfg))
                self._print_plan()
            if self.resume_from and self.start_epoch >= self.total_epochs:
                acc.print(f'nothing left to train: {self.resume_from} completed all {self.total_epochs} epochs; to '
                          f'train longer, resume with --epochs N (N > {cfg.epochs})'
                          + ('' if self._finished() else '; finishing the run (test split, saved model)'))
                if self._finished():
                    return dict(self.history[-1]) if self.history else {}
            for epoch in range(self.start_epoch, self.total_epochs):
                row = dict(epoch=epoch + 1)
                row.update(self.train_epoch(epoch))
                t = time.time()
                validate = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == self.total_epochs
                if validate:
                    row.update(self.evaluate(acc.unwrap_model(self.model)))
                    if self.ema is not None:
                        row.update(self.evaluate(self.ema.module, prefix='ema_'))
                    row['eval_time_s'] = time.time() - t
                self.lr_at(epoch + 1, self.updates)
                self.history.append(row)
                if acc.is_main_process:
                    write_metrics(self.out_dir, self.history, run=self.run_info())
                    acc.print(_summary(row, self.num_stages, cfg.method, self.val_data.split) if validate else
                              f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {row['train_img_per_s']:.0f} img/s")
                if cfg.log_with:
                    acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
                self._save(epoch)
            last = dict(self.history[-1]) if self.history else {}
            self.calibrate_exits()
            test = self.evaluate_test()
            self._finish(last, test)
            return {**last, **{k if k.startswith('test_') else f'test_{k}': v for k, v in (test or {}).items()}}
        finally:
            if cfg.log_with:
                acc.end_training()
            if acc.is_main_process:
                self.lock.release()

    def _finished(self) -> bool:
        """The run's end already happened: the final model was saved (and the test split evaluated, if any)."""
        if self.cfg.save_model and not os.path.isfile(os.path.join(self.out_dir, 'model', 'config.json')):
            return False
        if self.test_loader is None:
            return True
        try:
            with open(os.path.join(self.out_dir, 'metrics.json')) as f:
                return bool(json.load(f).get('test'))
        except (OSError, ValueError, AttributeError):
            return False

    def evaluate_test(self) -> Optional[Dict[str, Any]]:
        """The test split, once, after the last epoch: the live model and the EMA (None without test_split); with
        fitted exits, also their adaptive operating point."""
        if self.test_loader is None:
            return None
        acc = self.accelerator
        t = time.time()
        test = self.evaluate(acc.unwrap_model(self.model), split='test')
        if self.ema is not None:
            test.update(self.evaluate(self.ema.module, prefix='ema_', split='test'))
        for prefix, module in self._exit_models():
            with acc.autocast():
                test.update(adaptive_point(module, self._batches('test'), self._gather('test'), prefix=prefix))
        test['eval_time_s'] = time.time() - t
        if acc.is_main_process:
            write_metrics(self.out_dir, self.history, run=self.run_info(), test=test)
            acc.print(_summary(dict(test, epoch='test'), self.num_stages, self.cfg.method, self.test_data.split))
            for prefix, _ in self._exit_models():
                acc.print(f'test ({self.test_data.split}){" EMA" if prefix else ""}: {describe_point(test, prefix)}')
        return test

    def calibrate_exits(self) -> None:
        """``calibrate_exits``: fit the exit thresholds of the live model (and the EMA) on the validation split;
        they are saved with the model, and the operating point goes to metrics.json's ``run``."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.calibrate_exits is None or cfg.method != 'hff':
            return
        models = [('', acc.unwrap_model(self.model))] + ([('ema_', self.ema.module)] if self.ema is not None else [])
        for prefix, module in models:
            self._sync_buffers(module)
            with acc.autocast():
                self.exits[prefix] = calibrate(module, self._batches('val'), cfg.calibrate_exits, self._gather('val'))
            acc.print(f'validation ({self.val_data.split}){" EMA" if prefix else ""}: '
                      f'{self.exits[prefix].describe()}')
        if acc.is_main_process:
            write_metrics(self.out_dir, self.history, run=self.run_info())

    def _exit_models(self):
        """(prefix, module) of the models whose exits were fitted."""
        acc = self.accelerator
        return [(p, acc.unwrap_model(self.model) if p == '' else self.ema.module) for p in self.exits]

    def _batches(self, split: str):
        """The split's batches, transformed for the model, on the device."""
        loader, iterable = ((self.val_loader, self.val_iterable) if split == 'val'
                            else (self.test_loader, self.test_iterable))
        device = self.accelerator.device
        for x, y in iterable:
            yield loader.transform(x.to(device)), y.to(device)

    def _gather(self, split: str):
        loader = self.val_loader if split == 'val' else self.test_loader
        return None if loader.sharded else self.accelerator.gather_for_metrics

    def run_info(self) -> Dict[str, Any]:
        """What the run is (metrics.json's header): model, method, splits, and how local each stage is."""
        cfg = self.cfg
        info = dict(model=cfg.model, method=cfg.method, schedule=cfg.schedule, num_stages=self.num_stages,
                    num_classes=self.num_classes, dataset=self.train_data.name, train_split=self.train_data.split,
                    train_images=self.train_loader.num_samples, val_split=self.val_data.split,
                    val_images=self.val_loader.num_samples,
                    test_split=self.test_data.split if self.test_data is not None else None,
                    test_images=self.test_loader.num_samples if self.test_loader is not None else None)
        if self.profile is not None:
            info['stages'] = self.profile
        for prefix, cal in self.exits.items():   # fitted on validation: the setting and its operating point
            info[f'{prefix}adaptive_exit'] = cal.to_dict()
        return info

    def _print_plan(self) -> None:
        cfg = self.cfg
        tl, vl, test = self.train_loader, self.val_loader, self.test_data
        at_end = (f'; test {test.split} ({self.test_loader.num_samples} images) once at the end' if test is not None
                  else '; no test split')
        self.accelerator.print(
            f'{cfg.method.upper()} {cfg.model} ({self.num_stages} stage(s), schedule {cfg.schedule}) on '
            f'{self.train_data.name}: train {self.train_data.split} ({tl.num_samples} images, {tl.kind} loader), '
            f'validation {self.val_data.split} ({vl.num_samples} images) every epoch{at_end}; '
            f'{self.num_classes} classes, input {self.data_cfg["input_size"]}; {self.total_epochs} epochs x '
            f'{self.steps_per_epoch} steps on {self.accelerator.num_processes} process(es), '
            f'mixed precision {cfg.mixed_precision}; output {self.out_dir}')
        if self.profile is not None:
            self.accelerator.print('how local each stage is (backbone shares; FLOPs of one forward):\n'
                                   + format_profile(self.profile))

    def _finish(self, last: Dict[str, Any], test: Optional[Dict[str, Any]]) -> None:
        acc, cfg = self.accelerator, self.cfg
        unwrapped = acc.unwrap_model(self.model)
        self._sync_buffers(unwrapped)
        if not cfg.save_model or not acc.is_main_process:
            acc.wait_for_everyone()
            return
        path = os.path.join(self.out_dir, 'model')
        splits = dict(split=self.test_data.split if test is not None else self.val_data.split,
                      val_split=self.val_data.split)
        saved = save_final_model(unwrapped, path, cfg, self.train_data,
                                 {**final_metrics(last, test), **self._exit_metrics('', test), **splits}, self.data_cfg)
        if saved and self.ema is not None:
            save_final_model(self.ema.module, os.path.join(self.out_dir, 'model_ema'), cfg, self.train_data,
                             {**final_metrics(last, test, ema=True), **self._exit_metrics('ema_', test), **splits},
                             self.data_cfg)
        acc.print(f'weights: {saved}' if saved else 'weights: not saved (see the warning above)')
        acc.wait_for_everyone()

    def _exit_metrics(self, prefix: str, test: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The validation operating point of a model's fitted exits, named as ``final_metrics`` names validation
        figures (``val_*`` beside a test split, plain without one); the test point is in ``test`` already."""
        cal = self.exits.get(prefix)
        return cal.metrics('val_adaptive_' if test is not None else 'adaptive_') if cal is not None else {}


def final_metrics(last: Dict[str, Any], test: Optional[Dict[str, Any]], ema: bool = False) -> Dict[str, Any]:
    """A model's figures at the end of a run: training figures of the last epoch, its validation accuracy under
    ``val_*`` and, with a test split, the test accuracy under the plain names (``top1``, ``top1_stage0``, ...); without
    one, the validation accuracy keeps the plain names. ``ema`` takes the EMA model's evaluations instead."""
    own = ema_metrics if ema else (lambda row: {k: v for k, v in row.items() if not k.startswith('ema_')})
    src = own(last)
    if test is None:
        return src
    tested = {k: v for k, v in own(test).items() if k != 'eval_time_s'}
    out = {k: v for k, v in src.items() if k not in tested}
    out.update({f'val_{k}': src[k] for k in tested if k in src})
    out.update(tested)
    return out


def ema_metrics(row: Dict[str, Any]) -> Dict[str, Any]:
    """The EMA model's view of an epoch's row: its own evaluation (``ema_*``) under the plain names, training
    figures (loss, lr, time) kept, the live model's evaluation dropped, so the EMA's card states the EMA's accuracy."""
    ema = {k[len('ema_'):]: v for k, v in row.items() if k.startswith('ema_')}
    return {**{k: v for k, v in row.items() if not k.startswith('ema_') and k not in ema}, **ema}


def save_final_model(model: nn.Module, path: str, cfg: TrainConfig, data: ImageData, metrics: Dict[str, Any],
                     data_cfg: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """HFF: ``timm_hff.save_pretrained`` (config.json + model.safetensors + card); BP: timm's ``save_for_hf``; FF: its
    weights and the ``create_ff_model`` arguments that rebuild it."""
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    keep.update({k: metrics[k] for k in ('split', 'val_split') if metrics.get(k) is not None})
    metrics = dict(keep, dataset=dataset_id(data))
    metrics.setdefault('split', cfg.val_split)
    train_args = dict(cfg.to_dict(), dataset_name=data.name)
    if cfg.method == 'bp':
        from timm.models import save_for_hf
        small = bool(cfg.hff.get('small_input'))
        model = model.to(memory_format=torch.contiguous_format)   # safetensors stores contiguous tensors only
        return _replace_folder(path, lambda tmp: save_for_hf(
            model, tmp, model_config=dict(label_names=data.label_names, hff_small_input=small),
            model_args=dict(cfg.model_kwargs), data_config=data_cfg, safe_serialization=True))
    if cfg.method == 'ff':
        return _replace_folder(path, lambda tmp: _write_ff(model, tmp, cfg, data, metrics))
    from .. import hub as _hub
    try:
        return _hub.save_pretrained(model, path, label_names=data.label_names, metrics=metrics,
                                    train_args=train_args) or path
    except NotImplementedError as e:
        _logger.warning(f'final model not saved: {e}')
        return None


def _replace_folder(path: str, write) -> str:
    """``write(tmp)`` fills a temporary folder beside ``path``, which then replaces ``path`` whole: a failed save
    leaves the old folder and no half-written one."""
    import tempfile
    tmp = tempfile.mkdtemp(prefix='.tmp-model-', dir=os.path.dirname(os.path.abspath(path)))
    try:
        write(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_ff(model: nn.Module, folder: str, cfg: TrainConfig, data: ImageData, metrics: Dict[str, Any]) -> None:
    """A Forward-Forward baseline's weights (safetensors) and what rebuilds it (``create_ff_model`` arguments)."""
    from safetensors.torch import save_model
    save_model(model.to(memory_format=torch.contiguous_format), os.path.join(folder, 'model.safetensors'))
    config = dict(method='ff', model_name=cfg.model, num_classes=model.num_classes, in_chans=cfg.in_chans,
                  model_kwargs=dict(cfg.model_kwargs), hff=dict(cfg.hff), ff=model.cfg.to_dict(),
                  label_names=list(data.label_names), metrics=metrics,
                  rebuild='timm_hff.baselines.create_ff_model(model_name, num_classes, in_chans, '
                          'FFConfig(**ff), **model_kwargs, **hff), then safetensors.torch.load_model')
    atomic_write_text(os.path.join(folder, 'config.json'), json.dumps(config, indent=2, default=str) + '\n')


def dataset_id(data: ImageData) -> str:
    """A Hub id for the model card where one exists (Fashion-MNIST's IDX files have one), else the folder name."""
    if data.source == 'hub':
        return data.name
    if data.source == 'idx' and 'fashion' in data.name.lower():
        return 'zalando-datasets/fashion_mnist'
    return os.path.basename(data.name.rstrip('/')) or data.name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _reason(e: BaseException) -> str:
    """'No space left on device' for an OSError (the caller names the path), else the first line."""
    return e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)


def _os_error(e: BaseException, message: str) -> OSError:
    """An OSError with ``message`` that keeps the errno of ``e`` (ENOSPC, EACCES, ...) when it has one."""
    code = getattr(e, 'errno', None)
    return OSError(code, message) if code is not None else OSError(message)


def _take(iterable, n: int, restart: bool = False):
    """The first n batches; a stream that runs dry restarts, so every process does exactly n steps (DDP)."""
    done = 0
    while done < n:
        produced = False
        for batch in iterable:
            produced = True
            yield batch
            done += 1
            if done >= n:
                return
        if not restart or not produced:
            return


def _summary(row: Dict[str, Any], num_stages: int, method: str, split: str = 'val') -> str:
    if row['epoch'] == 'test':
        parts = [f"test ({split}): top-1 {row['top1']:.2f}%"]
    else:
        parts = [f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, {row['train_img_per_s']:.0f} img/s, "
                 f"val top-1 {row['top1']:.2f}%"]
    if 'top5' in row:
        parts.append(f"top-5 {row['top5']:.2f}%")
    if method != 'bp':
        parts.append('stages ' + ' / '.join(f"{row[f'top1_stage{k}']:.2f}" for k in range(num_stages)))
        parts.append(f"ensemble {row['top1_ensemble']:.2f}")
    if 'ema_top1' in row:
        parts.append(f"EMA {row['ema_top1']:.2f}%")
    return ', '.join(parts)


def _flat_config(cfg: TrainConfig) -> Dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}


def _yaml(cfg: TrainConfig) -> str:
    import yaml
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run a whole training; returns the last epoch's metrics."""
    return Trainer(cfg).fit()
