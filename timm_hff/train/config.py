"""``TrainConfig``: every training setting in one dataclass, loaded from a YAML recipe plus overrides.

Names follow timm's ``train.py`` where timm has the setting (``opt``, ``lr``, ``sched``, ``warmup_epochs``,
``model_ema_decay``, ``mixup``, ``reprob``, ``grad_accum_steps``, ...), so a timm user can read a recipe at once.
Loading is strict: an unknown key, a wrong type or an out-of-range value is a one-line error naming the key,
never a silently ignored setting.

The checks themselves live in ``checks.py``; the method's and the schedule's own refusals in their objects.
"""
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import yaml

from .._config import short_repr
from ..data import AugConfig
from .checks import MAPPING_SETTINGS, PRECISIONS, check_combinations, check_values, coerce
from .registry import get_method, method_names

__all__ = ['ALIASES', 'MAPPING_SETTINGS', 'PRECISIONS', 'TrainConfig', 'flat_config', 'merge_settings',
           'packaged_recipes', 'recipe_path']

# Names other trainers use for a setting, so the hint for an unknown key names the right one (difflib alone
# suggests 'decay_rate' for 'learning_rate').
ALIASES = {'learning_rate': 'lr', 'optimizer': 'opt', 'scheduler': 'sched', 'lr_scheduler': 'sched',
            'num_epochs': 'epochs', 'max_epochs': 'epochs', 'ema': 'model_ema', 'label_smoothing': 'smoothing',
            'num_workers': 'workers', 'arch': 'model', 'data_path': 'data_dir', 'output_dir': 'output',
            'precision': 'mixed_precision', 'gradient_accumulation_steps': 'grad_accum_steps'}


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
        cuda_graphs: Capture the whole training step (forward, local losses, backward, optimizer step) as a CUDA
            graph and replay it per batch (``train/cuda_graphs.py``): a step bound by kernel launches, as HFF's
            many small head kernels make it, then costs one launch. One CUDA process; the optimizer's fused step
            (sgd, momentum, adam, adamw); bf16 or fp32, no gradient accumulation, checkpointing or torchcompile.
        grad_checkpointing: timm's gradient checkpointing (recompute each block in backward). With schedule
            'memory_efficient' it also applies inside each stage, the lowest-memory way to train.

    Optimisation:
        schedule: 'simultaneous' (all stages each step), 'memory_efficient' (each stage's backward as soon as it
            has run; single process only), 'sequential' (greedy: stage k trains alone for ``epochs`` epochs),
            'stage_parallel' (one process per stage, all training at once; see ``schedules/stage_parallel``).
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
        min_steps: At least this many optimizer steps, whatever the data size: a small folder's epochs are stretched
            by a whole factor, and every epoch-counted setting with them (warmup, cooldown, decay, heads-only warm-up,
            val_every), so the schedule keeps its shape; 0: off. The run header says the factor.
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
        calibrate_exits: After the last epoch, choose adaptive-exit thresholds (``timm_hff.calibrate_exits``) on the
            validation split, losing at most this many top-1 points against the full-depth prediction (e.g. 0.5); they
            are saved with the model(s), and the operating point (accuracy, mean FLOPs) is reported on validation and
            test.
        exit_confidence: The probability, over the draw of the validation images, that ``calibrate_exits``' bound
            holds on new data (Learn-then-Test); null fits the thresholds to the validation images without a
            guarantee (``timm_hff.best_fit_exits``).
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
    cuda_graphs: bool = False
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
    min_steps: int = 0
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
    exit_confidence: Optional[float] = 0.9

    def __post_init__(self):
        self.validate()

    # ----- validation -----
    def validate(self) -> None:
        """Types first (from the annotations), then ranges and choices; one-line errors naming the key."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        check_values(self)
        check_combinations(self)

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
                close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ''
                raise ValueError(f"{where}: unknown setting {short_repr(str(key))}{hint}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[Dict[str, Any]] = None) -> 'TrainConfig':
        """A recipe file (or a shipped recipe's name: ``recipe_path``) plus overrides (CLI flags win). The experiment
        name defaults to the recipe's file name."""
        path = recipe_path(path)
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
            merged['experiment'] = stem + (f'_{method}' if method in method_names() and get_method(method).baseline
                                           else '')
        return cls.from_dict(merged, where=path)


MAX_RECIPE_BYTES = 2 ** 20     # a recipe is a few hundred bytes
# the recipes shipped inside the package (a source checkout's top-level recipes/ is a link to this folder)
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'recipes')


def packaged_recipes() -> List[str]:
    """The names of the recipes shipped with timm_hff (``hff-train --config NAME``)."""
    if not os.path.isdir(RECIPES_DIR):
        return []
    return sorted(n[:-len('.yaml')] for n in os.listdir(RECIPES_DIR) if n.endswith('.yaml'))


def recipe_path(name: str) -> str:
    """The recipe file ``name`` stands for: a path that exists, else a shipped recipe by its name
    (``fashion_mnist_quick``, also written ``fashion_mnist_quick.yaml`` or, from a folder without the source tree,
    ``recipes/fashion_mnist_quick.yaml``, as the docs write it). Anything else is one line listing the names."""
    if os.path.isfile(name):
        return name
    folder, base = os.path.split(os.path.normpath(name))
    stem = base[:-len('.yaml')] if base.endswith('.yaml') else base
    if folder in ('', 'recipes') and stem in packaged_recipes():
        return os.path.join(RECIPES_DIR, stem + '.yaml')
    raise FileNotFoundError(f"recipe {name!r} not found: give a YAML file, or the name of a recipe shipped with "
                            f"timm_hff: {', '.join(packaged_recipes()) or '(none installed)'}")


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


def flat_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The settings as scalars, for trackers (TensorBoard's hparams take no lists or mappings)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}
