"""``TrainConfig``: every training setting in one dataclass, loaded from a YAML recipe plus overrides.

Names follow timm's ``train.py`` where timm has the setting (``opt``, ``lr``, ``sched``, ``warmup_epochs``,
``model_ema_decay``, ``mixup``, ``reprob``, ``grad_accum_steps``, ...), so a timm user can read a recipe at once.
Loading is strict: an unknown key, a wrong type or an out-of-range value is a one-line error naming the key,
never a silently ignored setting.

Over 400 lines because every training setting, its documentation and its validation live in one dataclass, as
``HFFConfig`` does for the model.
"""
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from .._config import short_repr
from ..data import AUG_KINDS, AugConfig
from ..hub._values import MAX_KWARG_INT, check_json

SCHEDULES = ('simultaneous', 'memory_efficient', 'sequential', 'stage_parallel')
# Names other trainers use for a setting, so the hint for an unknown key names the right one (difflib alone
# suggests 'decay_rate' for 'learning_rate').
_ALIASES = {'learning_rate': 'lr', 'optimizer': 'opt', 'scheduler': 'sched', 'lr_scheduler': 'sched',
            'num_epochs': 'epochs', 'max_epochs': 'epochs', 'ema': 'model_ema', 'label_smoothing': 'smoothing',
            'num_workers': 'workers', 'arch': 'model', 'data_path': 'data_dir', 'output_dir': 'output',
            'precision': 'mixed_precision', 'gradient_accumulation_steps': 'grad_accum_steps'}
METHODS = ('hff', 'bp', 'ff')
PRECISIONS = ('no', 'bf16', 'fp16')


@dataclass
class TrainConfig:
    """A training run. See ``recipes/*.yaml`` for complete examples.

    Data:
        dataset: 'hfds/<hub id>', 'hfids/<hub id>' (streamed), 'imagefolder', 'idx', or '' (infer from data_dir).
        data_dir: Local folder ('imagefolder' / 'idx').
        dataset_config: Hub configuration name, for data sets that have several.
        train_split: The split trained on: a name, or a ``datasets``-style slice ('train[:54000]').
        val_split: The split evaluated after every epoch (a name or a slice); null with ``val_fraction``.
        val_fraction: Hold out this fraction of ``train_split`` as the validation split: class-balanced
            (stratified) and the same rows on every run (``split_seed``), never trained on. Settings are chosen on it.
        split_seed: Seed of the ``val_fraction`` hold-out; independent of ``seed``, so runs with other training seeds
            validate on the same images.
        test_split: Evaluated once, after the last epoch (the live model and the EMA); never read during training.
        input_key / target_key: Image / label columns; inferred when None.
        num_classes: Classes to build prototypes for; None takes the label column's ClassLabel.
        label_names: Class names saved with the model (config.json, card), one per class in label order; None takes
            the label column's ClassLabel names (digits for an integer column, Fashion-MNIST's names for IDX files
            under a folder named so). Like timm's class map, for data whose labels carry no names.
        train_num_samples / val_num_samples: Use the first N rows; for a stream, its length (required there).
        streaming: Stream the splits (implied by 'hfids/').
        data_in_memory: Hold each split as one uint8 tensor (decode once); None: only array columns (IDX).
        workers: Loader workers for per-sample decoding.
        shuffle_buffer: Shuffle buffer of a streamed training split.
        threads: CPU threads per process (``torch.set_num_threads``); None keeps torch's default. On a CPU shared
            with other jobs, 1 avoids OpenMP threads spinning against each other (often several times faster).

    Model:
        model: A timm architecture, an 'hff_*' name, or 'hf-hub:' / 'local-dir:' HFF weights.
        pretrained: Load timm's pretrained backbone (or the HFF weights of a hub / local model).
        pretrained_file: timm's pretrained weights from this local ``.safetensors`` file instead of the Hub (timm's
            ``pretrained_cfg_overlay=dict(file=...)``; implies ``pretrained``). ``hff-seed-weights`` converts a
            ``.pth`` state dict, or seeds the Hub cache so that ``pretrained: true`` finds it offline.
        in_chans: Input channels (1 reads images as grayscale).
        img_size: Input resolution; None takes the model's default.
        model_kwargs: timm keyword arguments (e.g. ``channels``, ``drop_path_rate``).
        hff: HFF settings (``HFFConfig`` fields: num_stages, prototypes_per_class, margin, small_input, ...).
        method: 'hff' (local prototype losses), 'bp' (the same backbone with timm's head, end to end) or 'ff'
            (Forward-Forward at HFF's stage cut, ``timm_hff.baselines``: a baseline, C passes per prediction).
        ff: Forward-Forward settings (``timm_hff.baselines.FFConfig`` fields: threshold, label_mode, ...); method 'ff'.
        reset_prototypes: Draw fresh prototypes in every head (a new label set with the same class count).
        freeze_stages: HFF stages to keep frozen (transfer).
        head_only: Train only the heads (HFF's prototype heads; BP's classifier: a linear probe); the whole backbone
            stays frozen, its norm layers in eval mode (transfer).
        head_warmup_epochs: Train only the heads for this many epochs first (backbone frozen as with ``head_only``),
            then fine-tune: fresh heads on a pretrained backbone no longer send random gradients into it.
        channels_last: Channels-last memory format.
        torchcompile / torchcompile_mode: timm train.py's flags: ``torch.compile`` backend (e.g. 'inductor'; bare
            ``--torchcompile`` means 'inductor') and mode. HFF compiles each block and head, keeping the cuts eager.
        grad_checkpointing: timm's gradient checkpointing (recompute each block in backward). With schedule
            'memory_efficient' it also applies inside each stage, the lowest-memory way to train.

    Optimisation:
        schedule: 'simultaneous' (all stages each step), 'memory_efficient' (each stage's backward as soon as it
            has run; single process only), 'sequential' (greedy: stage k trains alone for ``epochs`` epochs),
            'stage_parallel' (one process per stage, all training at once; see ``_stage_parallel``).
        stage_parallel_queue: Stage outputs in flight between two stage processes (each way bounded), so hand-offs
            overlap compute; 1 still overlaps one receive.
        stage_parallel_timeout: Seconds a stage process waits for another (set-up, a hand-off, a checkpoint) before
            it stops with an error naming that rank.
        opt, lr, weight_decay, momentum, opt_eps, opt_betas: timm ``create_optimizer_v2``.
        clip_grad: Gradient-norm clip, applied per stage (each stage has its own loss).
        stage_lr: One learning-rate factor per HFF stage (its backbone slice and its head), applied through timm's
            ``lr_scale`` so every scheduler honours it; null: the same rate everywhere.
        layer_decay: timm's layer-wise lr decay (``create_optimizer_v2(layer_decay=...)`` over the backbone's
            ``group_matcher``): layer group g of G trains at ``lr * layer_decay ** (G - g)``; the heads at ``lr``.
        backbone_lr_scale: lr factor of every backbone parameter (the heads train at ``lr``): the usual fine-tuning
            practice of a lower backbone lr. Multiplies with ``layer_decay`` and ``stage_lr``.
        sched, warmup_epochs, warmup_lr, min_lr, cooldown_epochs, decay_epochs, decay_rate, sched_on_updates: timm
            ``create_scheduler_v2`` (with 'sequential', one cosine cycle per stage).
        epochs: Epochs (per stage with 'sequential').
        batch_size: Per-process batch size; validation_batch_size defaults to it.
        grad_accum_steps: Gradient accumulation steps.
        mixed_precision: 'no', 'bf16' or 'fp16'.
        model_ema, model_ema_decay, model_ema_warmup: timm ``ModelEmaV3``.
        mixup, cutmix, mixup_prob, mixup_switch_prob, mixup_mode, smoothing: timm ``Mixup`` / label smoothing.

    Augmentation: aug, crop_padding, hflip, vflip, scale, ratio, color_jitter, aa, reprob, remode, recount (see
        ``timm_hff.data.AugConfig``); mean, std, crop_pct, interpolation override the model's data config.

    Run:
        seed: Seed of everything (initialisation, data order, augmentation).
        output: Parent folder of runs; experiment: the run's folder name (default: the recipe name).
        log_with: Extra Accelerate trackers, e.g. 'tensorboard'.
        checkpoint_hist: Epoch checkpoints to keep.
        val_every: Evaluate the validation split every N epochs, and always after the last one (long runs on a few
            hundred images spend most of their time validating otherwise).
        resume: A checkpoint folder or a run folder to continue from ('auto': this run's latest, if any).
        save_model: Save the final model (``save_pretrained``) at the end.
        calibrate_exits: After the last epoch, fit adaptive-exit thresholds (``timm_hff.calibrate_exits``) on the
            validation split, within this many top-1 points of the full-depth prediction (e.g. 0.2); they are saved
            with the model(s), and the operating point (accuracy, mean FLOPs) is reported on validation and test.
        progress: Show a tqdm bar.
    """
    # data
    dataset: str = ''
    data_dir: Optional[str] = None
    dataset_config: Optional[str] = None
    train_split: str = 'train'
    val_split: Optional[str] = 'test'
    val_fraction: float = 0.0
    split_seed: int = 0
    test_split: Optional[str] = None
    input_key: Optional[str] = None
    target_key: Optional[str] = None
    num_classes: Optional[int] = None
    label_names: Optional[List[str]] = None
    train_num_samples: Optional[int] = None
    val_num_samples: Optional[int] = None
    streaming: bool = False
    data_in_memory: Optional[bool] = None
    workers: int = 2
    shuffle_buffer: int = 10000
    threads: Optional[int] = None
    # model
    model: str = 'resnet18'
    pretrained: bool = False
    pretrained_file: Optional[str] = None
    in_chans: int = 3
    img_size: Optional[int] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    hff: Dict[str, Any] = field(default_factory=dict)
    method: str = 'hff'
    ff: Dict[str, Any] = field(default_factory=dict)
    reset_prototypes: bool = False
    freeze_stages: List[int] = field(default_factory=list)
    head_only: bool = False
    head_warmup_epochs: int = 0
    channels_last: bool = False
    grad_checkpointing: bool = False
    torchcompile: Optional[str] = None
    torchcompile_mode: Optional[str] = None
    # optimisation
    schedule: str = 'simultaneous'
    stage_parallel_queue: int = 2
    stage_parallel_timeout: float = 600.0
    opt: str = 'sgd'
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    clip_grad: Optional[float] = None
    stage_lr: Optional[List[float]] = None
    layer_decay: Optional[float] = None
    backbone_lr_scale: float = 1.0
    sched: str = 'cosine'
    epochs: int = 10
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    decay_epochs: Optional[float] = None
    decay_rate: float = 0.1
    sched_on_updates: bool = True
    batch_size: int = 128
    validation_batch_size: Optional[int] = None
    grad_accum_steps: int = 1
    mixed_precision: str = 'no'
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.0
    # augmentation
    aug: str = 'pad_crop'
    crop_padding: int = 4
    hflip: float = 0.5
    vflip: float = 0.0
    scale: Optional[List[float]] = None
    ratio: Optional[List[float]] = None
    color_jitter: float = 0.4
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = 'pixel'
    recount: int = 1
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    # run
    seed: int = 42
    output: str = 'output'
    experiment: str = ''
    log_with: Optional[str] = None
    checkpoint_hist: int = 1
    val_every: int = 1
    resume: Optional[str] = None
    save_model: bool = True
    progress: bool = True
    calibrate_exits: Optional[float] = None

    def __post_init__(self):
        self.validate()

    # ----- validation -----
    def _validate_ff(self) -> None:
        """Forward-Forward is kept a plain baseline: one process, all stages at once, hard labels (its negatives
        are wrong labels), a fresh timm backbone."""
        from ..baselines.ff import FFConfig
        try:
            FFConfig(**self.ff)
        except TypeError:
            known = ', '.join(FFConfig.__dataclass_fields__)
            unknown = ', '.join(k for k in self.ff if k not in FFConfig.__dataclass_fields__)
            raise ValueError(f'ff has unknown setting(s) {unknown}; FFConfig knows {known}') from None
        except ValueError as e:
            raise ValueError(f'ff: {e}') from None
        if self.schedule != 'simultaneous':
            raise ValueError(f"schedule {self.schedule!r} is an HFF schedule; method 'ff' trains all its stages each "
                             f"step (use schedule: simultaneous)")
        soft = "makes soft labels, and FF's negatives are wrong hard labels"
        why = dict(freeze_stages='is for HFF transfer', head_only='is for HFF transfer',
                   reset_prototypes='is for HFF heads', stage_lr='is for HFF stages',
                   calibrate_exits='is for HFF exits', torchcompile='is for HFF and BP',
                   grad_checkpointing='is for HFF and BP', mixup=soft, cutmix=soft, smoothing=soft)
        default = TrainConfig.__dataclass_fields__
        for name, what in why.items():
            value = getattr(self, name)
            if value is not None if name == 'calibrate_exits' else value:
                off = default[name].default_factory() if callable(default[name].default_factory) else \
                    default[name].default
                raise ValueError(f"{name} {what}; method 'ff' (a Forward-Forward baseline) does not take it: "
                                 f"drop it or override the recipe's (--{name} {json.dumps(off)})")
        if self.pretrained:
            raise ValueError("method 'ff' appends a label channel to the input, so timm's pretrained stem does not "
                             "fit; drop pretrained")

    def validate(self) -> None:
        """Types first (from the annotations), then ranges and choices; one-line errors naming the key."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        _choice('method', self.method, METHODS)
        _choice('schedule', self.schedule, SCHEDULES)
        _choice('mixed_precision', self.mixed_precision, PRECISIONS)
        _choice('aug', self.aug, AUG_KINDS)
        _choice('mixup_mode', self.mixup_mode, ('batch', 'pair', 'elem'))
        for name in ('workers', 'warmup_epochs', 'cooldown_epochs', 'crop_padding', 'split_seed', 'head_warmup_epochs'):
            _at_least(name, getattr(self, name), 0)
        for name in ('epochs', 'batch_size', 'grad_accum_steps', 'checkpoint_hist', 'recount', 'shuffle_buffer',
                     'val_every', 'in_chans', 'stage_parallel_queue'):
            _at_least(name, getattr(self, name), 1)
        for name in ('num_classes', 'train_num_samples', 'val_num_samples', 'img_size', 'validation_batch_size',
                     'threads'):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        for name, most in _AT_MOST.items():   # processes, threads, seeds and sizes a machine can hold
            if getattr(self, name) is not None and getattr(self, name) > most:
                raise ValueError(f'{name} must be <= {most}, got {getattr(self, name)!r}')
        _names(self)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f'val_fraction must be in [0, 1) (the share of train_split held out), got '
                             f'{self.val_fraction!r}')
        if self.val_fraction > 0 and self.val_split is not None:
            raise ValueError(f'val_fraction={self.val_fraction:g} carves the validation split from train_split, but '
                             f'val_split={self.val_split!r} names another; set val_split: null (and test_split: '
                             f'{self.val_split} to evaluate it once at the end)')
        if self.val_fraction == 0 and self.val_split is None:
            raise ValueError('no validation split: set val_split (e.g. test) or val_fraction (e.g. 0.1)')
        if self.test_split is not None and self.test_split == self.val_split:
            raise ValueError(f'test_split and val_split are both {self.test_split!r}: the test split is evaluated once '
                             f'at the end, so validate on another split (or val_fraction) or drop test_split')
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            seen = set()
            dup = next(n for n in self.label_names if n in seen or seen.add(n))
            raise ValueError(f'label_names has a duplicate ({short_repr(dup)}): give each class its own name')
        for name in ('hflip', 'vflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'model_ema_decay'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'{name} must be in [0, 1], got {getattr(self, name)!r}')
        for name in ('lr', 'weight_decay', 'mixup', 'cutmix', 'min_lr', 'warmup_lr'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)!r}')
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f'smoothing must be in [0, 1), got {self.smoothing!r}')
        if self.stage_lr is not None:
            if not self.stage_lr or any(f <= 0 for f in self.stage_lr):
                raise ValueError(f'stage_lr must list one positive factor per stage, got {short_repr(self.stage_lr)}')
            if self.method == 'bp':
                raise ValueError("stage_lr scales HFF stages; method 'bp' has one end-to-end loss (drop stage_lr)")
        if self.calibrate_exits is not None:
            if self.calibrate_exits < 0:
                raise ValueError(f'calibrate_exits is the top-1 points adaptive exit may lose (e.g. 0.2), so it must '
                                 f'be >= 0, got {self.calibrate_exits!r}; null turns calibration off')
            if self.method == 'bp':
                raise ValueError("calibrate_exits fits the exits of HFF stages; method 'bp' has one exit (drop it)")
        if not self.stage_parallel_timeout > 0:
            raise ValueError(f'stage_parallel_timeout must be > 0 seconds, got {self.stage_parallel_timeout!r}')
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f'clip_grad must be > 0 (or null to disable), got {self.clip_grad!r}')
        if self.in_chans not in (1, 3):
            raise ValueError(f'in_chans must be 1 (grayscale) or 3 (RGB) for image data, got {self.in_chans}')
        for name in ('scale', 'ratio'):
            v = getattr(self, name)
            if v is not None and (len(v) != 2 or not 0 < v[0] <= v[1]):
                raise ValueError(f'{name} must be two increasing positive numbers [lo, hi], got {short_repr(v)}')
        if self.method == 'bp':
            if self.schedule != 'simultaneous':
                raise ValueError(f"schedule {self.schedule!r} is an HFF schedule; method 'bp' trains end to end "
                                 f"(use schedule: simultaneous)")
            if self.freeze_stages or self.reset_prototypes:
                raise ValueError("freeze_stages / reset_prototypes apply to HFF models; not with method 'bp' (its "
                                 "linear probe is head_only: true)")
        if self.ff and self.method != 'ff':
            raise ValueError(f"ff settings ({', '.join(sorted(self.ff))}) apply to method 'ff'; drop them or use "
                             f"--baseline ff")
        if self.method == 'ff':
            self._validate_ff()
        self._validate_finetune()
        if self.freeze_stages and self.head_only:
            raise ValueError('give freeze_stages or head_only, not both (head_only freezes the whole backbone)')
        if self.schedule == 'sequential' and (self.freeze_stages or self.head_only):
            raise ValueError("schedule 'sequential' freezes stages itself; drop freeze_stages / head_only")
        if self.hff:
            from .._config import HFFConfig
            HFFConfig.from_dict(dict(self.hff, check_split=False))   # unknown keys / bad values fail here
        if self.streaming or self.dataset.startswith('hfids/'):
            if self.train_num_samples is None:
                raise ValueError('a streamed training split has no known length: set train_num_samples (the '
                                 'images per epoch)')
            if self.data_in_memory:
                raise ValueError('data_in_memory cannot hold a streamed split; set data_in_memory: null')

    def _validate_finetune(self) -> None:
        """The fine-tuning settings: weights, lr factors, heads-only warm-up."""
        if self.pretrained_file is not None:
            if self.model.startswith(('hf-hub:', 'local-dir:')):
                raise ValueError(f'pretrained_file holds timm backbone weights; {self.model} is a saved HFF model, '
                                 f'which loads its own weights (drop pretrained_file)')
            if not self.pretrained_file.endswith('.safetensors'):
                raise ValueError(f'pretrained_file must be a .safetensors file (weights never load from a pickle), got '
                                 f'{short_repr(self.pretrained_file)}; convert it: hff-seed-weights <arch> <file> '
                                 f'--safetensors OUT.safetensors')
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f'layer_decay must be in (0, 1] (each earlier layer group trains at that factor of the '
                             f'next), got {self.layer_decay!r}')
        if not 0.0 < self.backbone_lr_scale <= 1e3:
            raise ValueError(f'backbone_lr_scale must be > 0 (e.g. 0.1 for a backbone lr ten times below the '
                             f"heads'), got {self.backbone_lr_scale!r}; use head_only to freeze the backbone")
        if self.head_warmup_epochs:
            if self.head_only:
                raise ValueError('head_warmup_epochs trains the heads alone before fine-tuning; head_only trains them '
                                 'alone throughout: give one of them')
            if self.head_warmup_epochs >= self.epochs:
                raise ValueError(f'head_warmup_epochs ({self.head_warmup_epochs}) leaves no fine-tuning epoch of '
                                 f'{self.epochs}; lower it or use head_only: true')
            if self.schedule not in ('simultaneous', 'memory_efficient'):
                raise ValueError(f"head_warmup_epochs applies to schedules 'simultaneous' and 'memory_efficient', not "
                                 f"{self.schedule!r}")
        if self.method == 'ff' and (self.layer_decay is not None or self.backbone_lr_scale != 1.0
                                    or self.head_warmup_epochs or self.pretrained_file):
            raise ValueError("layer_decay / backbone_lr_scale / head_warmup_epochs / pretrained_file fine-tune a "
                             "pretrained backbone; method 'ff' trains a fresh one (drop them)")

    # ----- views -----
    def aug_config(self) -> AugConfig:
        return AugConfig(aug=self.aug, crop_padding=self.crop_padding, hflip=self.hflip, vflip=self.vflip,
                         scale=tuple(self.scale) if self.scale else None,
                         ratio=tuple(self.ratio) if self.ratio else None, color_jitter=self.color_jitter,
                         aa=self.aa, reprob=self.reprob, remode=self.remode, recount=self.recount)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_name(self) -> str:
        return self.experiment or 'run'

    @property
    def output_dir(self) -> str:
        return os.path.join(self.output, self.run_name)

    @property
    def streamed(self) -> bool:
        return self.streaming or self.dataset.startswith('hfids/')

    # ----- loading -----
    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = 'config') -> 'TrainConfig':
        """Build from a mapping; unknown keys fail with the closest known key suggested."""
        if not isinstance(d, dict):
            raise ValueError(f'{where} must be a mapping of settings, got {type(d).__name__}')
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ''
                raise ValueError(f"{where}: unknown setting {short_repr(str(key))}{hint}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[Dict[str, Any]] = None) -> 'TrainConfig':
        """A recipe file plus overrides (CLI flags win). The experiment name defaults to the recipe's file name."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f'recipe {path!r} not found')
        if os.path.getsize(path) > MAX_RECIPE_BYTES:
            raise ValueError(f'{path} is {os.path.getsize(path) / 2 ** 20:.1f} MiB, far too large for a recipe')
        with open(path, encoding='utf-8') as f:
            try:
                d = yaml.safe_load(f)
            except yaml.YAMLError as e:
                mark = getattr(e, 'problem_mark', None)
                at = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
                what = getattr(e, 'problem', None) or str(e).splitlines()[0]
                raise ValueError(f'{path} is not valid YAML: {what}{at}') from None
            except (RecursionError, UnicodeDecodeError) as e:
                raise ValueError(f'{path} is not valid YAML: {type(e).__name__} ({str(e).splitlines()[0][:80]})'
                                 ) from None
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ValueError(f'{path} must hold a mapping of settings, got {type(d).__name__}')
        merged = merge_settings(d, overrides or {})
        if not merged.get('experiment'):   # the recipe's name; a BP baseline of it gets its own folder
            stem = os.path.splitext(os.path.basename(path))[0]
            method = merged.get('method', 'hff')
            merged['experiment'] = stem + (f'_{method}' if method in METHODS and method != 'hff' else '')
        return cls.from_dict(merged, where=path)


MAX_RECIPE_BYTES = 2 ** 20     # a recipe is a few hundred bytes
# Settings that are mappings of their own: an override changes the keys it names and keeps the others.
MAPPING_SETTINGS = ('hff', 'model_kwargs', 'ff')


def merge_settings(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Recipe settings with overrides on top; ``hff`` and ``model_kwargs`` merge key by key.

    ``--hff '{margin: 0.3}'`` on a recipe with ``hff: {small_input: true, ...}`` changes the margin only; replacing
    the whole mapping would silently build a different network.
    """
    merged = {**base, **overrides}
    for key in MAPPING_SETTINGS:
        if isinstance(base.get(key), dict) and isinstance(overrides.get(key), dict):
            merged[key] = {**base[key], **overrides[key]}
    return merged


def _type_name(tp) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _coerce(name: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; accept int for float and YAML-1.1 '1e-3' strings for float."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:   # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(name, value, inner)
    if tp is Any:
        return value
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'{name} must be a list, got {short_repr(value)}')
        return [_coerce(f'{name}[{i}]', v, args[0]) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f'{name} must be a mapping, got {short_repr(value)}')
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f'{name} must be true or false, got {short_repr(value)}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'{name} must be an integer, got {short_repr(value)}')
        if abs(value) > 2 ** 53:
            raise ValueError(f'{name} must be an integer of magnitude <= 2**53, got {short_repr(value)}')
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f'{name} must be a number, got {short_repr(value)}') from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f'{name} must be a finite number, got {short_repr(value)}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f'{name} must be a string, got {short_repr(value)}')
        return value
    raise TypeError(f'unsupported setting type {_type_name(tp)} for {name}')


# Upper bounds of settings that size what a run starts or allocates before it can fail on its own.
_AT_MOST = {'workers': 256, 'threads': 1024, 'stage_parallel_queue': 1024, 'seed': 2 ** 32 - 1,
            'split_seed': 2 ** 32 - 1, 'img_size': 8192, 'num_classes': 2 ** 24, 'batch_size': 2 ** 20,
            'validation_batch_size': 2 ** 20}


def _names(cfg: TrainConfig) -> None:
    """Strings that become paths, folder names or model-card text: no '..' escape, no NUL, no line break."""
    from ..hub._names import check_folder_name, check_path, check_text
    if cfg.experiment:
        check_folder_name(cfg.experiment, 'experiment')
    for name in ('output', 'data_dir', 'resume', 'model', 'dataset'):
        if getattr(cfg, name) is not None:
            check_path(getattr(cfg, name), name)
    for i, label in enumerate(cfg.label_names or ()):
        check_text(label, f'label_names[{i}]')
    for name in MAPPING_SETTINGS:
        try:
            check_json('recipe', name, getattr(cfg, name), max_int=MAX_KWARG_INT)
        except ValueError as e:
            raise ValueError(str(e)) from None   # a recipe error, not a checkpoint's


def _choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f'{name} must be one of {list(choices)}, got {short_repr(value)}')


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
