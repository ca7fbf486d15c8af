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
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

import yaml

from ..core import short_repr
from ..data import AUG_KINDS, AugConfig
from .help import setting
from .checks import MAPPING_SETTINGS, PRECISIONS, check_combinations, check_values, coerce
from .registry import get_method, method_names, schedule_names

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
    """A training run. Each setting is declared once, below: its type, default, ``hff-train --help`` group and help
    line (``help.setting``), from which the CLI builds its flags. The augmentation settings are ``AugConfig``'s
    (``aug_config``); ``hff`` holds ``HFFConfig`` fields and ``ff`` ``FFConfig`` ones. ``recipes/*.yaml`` are complete
    examples; docs/training.md says how the settings work together.
    """
    # data
    dataset: str = setting('', 'Dataset',
        "'hfds/<hub id>', 'hfids/<hub id>' (streamed), 'imagefolder', 'idx' or '' (infer from data_dir)")
    data_dir: Optional[str] = setting(None, 'Dataset', "local folder of 'imagefolder' / 'idx' data")
    dataset_config: Optional[str] = setting(None, 'Dataset', 'Hub configuration name, for data sets that have several')
    train_split: str = setting('train', 'Dataset',
        "split trained on: a name or a datasets-style slice ('train[:54000]')")
    val_split: Optional[str] = setting('test', 'Dataset',
        'split evaluated after every epoch (name or slice); null with val_fraction')
    val_fraction: float = setting(0.0, 'Dataset',
        'hold out this share of train_split (class-balanced, same rows every run) as the validation split')
    split_seed: int = setting(0, 'Dataset',
        'seed of the val_fraction hold-out; independent of seed, so runs with other training seeds validate on '
        'the same images', at_least=0, at_most=2 ** 32 - 1)
    test_split: Optional[str] = setting(None, 'Dataset',
        'split evaluated once, after the last epoch (never read during training)')
    input_key: Optional[str] = setting(None, 'Dataset', 'image column (inferred when null)')
    target_key: Optional[str] = setting(None, 'Dataset', 'label column (inferred when null)')
    num_classes: Optional[int] = setting(None, 'Dataset',
        "classes to build prototypes for (null: the label column's ClassLabel)", at_least=1, at_most=2 ** 24)
    label_names: Optional[List[str]] = setting(None, 'Dataset',
        "class names saved with the model, one per class in label order (null: the label column's ClassLabel "
        "names), like timm's class map")
    train_num_samples: Optional[int] = setting(None, 'Dataset',
        "use the first N training rows; a stream's length (required there)", at_least=1)
    val_num_samples: Optional[int] = setting(None, 'Dataset', 'use the first N validation (and test) rows', at_least=1)
    streaming: bool = setting(False, 'Dataset', "stream the splits (implied by 'hfids/')")
    data_in_memory: Optional[bool] = setting(None, 'Dataset',
        'hold each split as one uint8 tensor (null: only array columns such as IDX)')
    workers: int = setting(2, 'Dataset', 'loader workers for per-sample decoding', at_least=0, at_most=256)
    shuffle_buffer: int = setting(10000, 'Dataset', 'shuffle buffer of a streamed training split', at_least=1)
    threads: Optional[int] = setting(None, 'Miscellaneous',
        "CPU threads per process (torch.set_num_threads; null: torch's default); 1 on a CPU shared with other "
        'jobs, where OpenMP threads spinning against each other are often several times slower',
        at_least=1, at_most=1024)
    # model
    model: str = setting('resnet18', 'Model',
        "timm architecture, 'hff_*' name, or 'hf-hub:<repo>' / 'local-dir:<folder>' HFF weights")
    pretrained: bool = setting(False, 'Model',
        "load timm's pretrained backbone (or the HFF weights of a hub / local model)")
    pretrained_file: Optional[str] = setting(None, 'Model',
        "timm's pretrained weights from a local .safetensors file (implies pretrained)")
    in_chans: int = setting(3, 'Model', 'input channels (1 reads images as grayscale)', at_least=1)
    img_size: Optional[int] = setting(None, 'Model', "input resolution (null: the model's default)",
        at_least=1, at_most=8192)
    model_kwargs: Dict[str, Any] = setting(dict, 'Model',
        "timm keyword arguments, a mapping merged key by key (e.g. '{drop_path_rate: 0.1}')")
    hff: Dict[str, Any] = setting(dict, 'Model',
        "HFF settings, a mapping merged key by key (e.g. '{num_stages: 4, margin: 0.3}')")
    method: str = setting('hff', 'Model', 'what learns; one of the registered methods', choices=method_names)
    ff: Dict[str, Any] = setting(dict, 'Model',
        'Forward-Forward settings (FFConfig: threshold, label_mode, label_res, ...); method ff only')
    reset_prototypes: bool = setting(False, 'Model',
        'fresh prototypes in every head (a new label set with the same class count)')
    freeze_stages: List[int] = setting(list, 'Model',
        "HFF stages whose backbone slice stays frozen (transfer), e.g. '[0, 1]'; BP: the same blocks")
    head_only: bool = setting(False, 'Model',
        "train only the heads (BP: timm's classifier, a linear probe); the backbone stays frozen")
    head_warmup_epochs: int = setting(0, 'Model', 'train only the heads for N epochs (backbone frozen), then fine-tune',
        at_least=0)
    channels_last: bool = setting(False, 'Model', 'channels-last memory format')
    grad_checkpointing: bool = setting(False, 'Model',
        "timm's gradient checkpointing (with memory_efficient: inside each stage too)")
    torchcompile: Optional[str] = setting(None, 'Model',
        "torch.compile backend, e.g. 'inductor' (bare --torchcompile: inductor); HFF compiles block by block, "
        'the cuts stay eager')
    torchcompile_mode: Optional[str] = setting(None, 'Model',
        "torch.compile mode, e.g. 'max-autotune' (null: the default)")
    cuda_graphs: bool = setting(False, 'Model',
        'capture the whole training step as a CUDA graph and replay it (one GPU; fused sgd / adam / adamw; not '
        'fp16)')
    # optimisation
    schedule: str = setting('simultaneous', 'Optimizer', 'when stages step; one of the registered schedules',
        choices=schedule_names)
    stage_parallel_queue: int = setting(2, 'Optimizer',
        'stage_parallel: stage outputs in flight between two stage processes', at_least=1, at_most=1024)
    stage_parallel_timeout: float = setting(600.0, 'Optimizer',
        'stage_parallel: seconds to wait for another stage process before stopping with an error naming it')
    opt: str = setting('sgd', 'Optimizer', "timm optimizer name ('sgd', 'adamw', 'lamb', ...)")
    lr: float = setting(0.1, 'Optimizer', 'learning rate', at_least=0)
    weight_decay: float = setting(5e-4, 'Optimizer', 'weight decay (not on biases, norms and prototypes)', at_least=0)
    momentum: float = setting(0.9, 'Optimizer', 'SGD momentum')
    opt_eps: Optional[float] = setting(None, 'Optimizer', 'optimizer epsilon (null: its default)')
    opt_betas: Optional[List[float]] = setting(None, 'Optimizer', 'optimizer betas (null: its default)')
    clip_grad: Optional[float] = setting(None, 'Optimizer', 'gradient-norm clip, per stage (null: off)')
    stage_lr: Optional[List[float]] = setting(None, 'Optimizer',
        "one lr factor per HFF stage (timm's lr_scale), e.g. '[1, 1, 2, 2]'")
    layer_decay: Optional[float] = setting(None, 'Optimizer',
        "timm's layer-wise lr decay over the backbone's group_matcher (e.g. 0.75)")
    backbone_lr_scale: float = setting(1.0, 'Optimizer',
        "lr factor of the backbone's parameters; the heads train at lr (e.g. 0.1)")
    sched: str = setting('cosine', 'Learning rate schedule', "timm scheduler ('cosine', 'step', 'plateau', ...)")
    epochs: int = setting(10, 'Learning rate schedule', "epochs (per stage with schedule 'sequential')", at_least=1)
    min_steps: int = setting(0, 'Learning rate schedule',
        "at least this many optimizer steps: a small data set's epochs (and every epoch-counted setting) "
        'stretched by a whole factor; 0: off', at_least=0)
    warmup_epochs: int = setting(0, 'Learning rate schedule', 'linear warm-up epochs', at_least=0)
    warmup_lr: float = setting(1e-5, 'Learning rate schedule', 'learning rate at the start of the warm-up', at_least=0)
    min_lr: float = setting(0.0, 'Learning rate schedule', 'lowest learning rate of the schedule', at_least=0)
    cooldown_epochs: int = setting(0, 'Learning rate schedule', 'epochs at min_lr after the schedule', at_least=0)
    decay_epochs: Optional[float] = setting(None, 'Learning rate schedule', "epochs between decays ('step' schedules)")
    decay_rate: float = setting(0.1, 'Learning rate schedule', "decay factor ('step' schedules)")
    sched_on_updates: bool = setting(True, 'Learning rate schedule',
        'step the schedule every update (else every epoch)')
    batch_size: int = setting(128, 'Optimizer', 'per-process batch size', at_least=1, at_most=2 ** 20)
    validation_batch_size: Optional[int] = setting(None, 'Optimizer', 'evaluation batch size (null: batch_size)',
        at_least=1, at_most=2 ** 20)
    grad_accum_steps: int = setting(1, 'Optimizer', 'gradient accumulation steps', at_least=1)
    mixed_precision: str = setting('no', 'Optimizer', "'no', 'bf16' or 'fp16'", choices=PRECISIONS)
    model_ema: bool = setting(False, 'Model exponential moving average',
        "keep an EMA of the weights (timm's ModelEmaV3)")
    model_ema_decay: float = setting(0.9998, 'Model exponential moving average', 'EMA decay', within=(0, 1))
    model_ema_warmup: bool = setting(False, 'Model exponential moving average', 'EMA decay warm-up')
    mixup: float = setting(0.0, 'Augmentation and regularization', 'mixup alpha (0: off)', at_least=0)
    cutmix: float = setting(0.0, 'Augmentation and regularization', 'cutmix alpha (0: off)', at_least=0)
    mixup_prob: float = setting(1.0, 'Augmentation and regularization', 'probability of mixup / cutmix per batch',
        within=(0, 1))
    mixup_switch_prob: float = setting(0.5, 'Augmentation and regularization', 'probability of cutmix instead of mixup',
        within=(0, 1))
    mixup_mode: str = setting('batch', 'Augmentation and regularization', "'batch', 'pair' or 'elem'",
        choices=('batch', 'pair', 'elem'))
    smoothing: float = setting(0.0, 'Augmentation and regularization', 'label smoothing', within=(0, 1, ')'))
    # augmentation
    aug: str = setting('pad_crop', 'Augmentation and regularization',
        "'pad_crop' (batched on the device), 'timm' (per sample) or 'none'", choices=AUG_KINDS)
    crop_padding: int = setting(4, 'Augmentation and regularization', "padding of 'pad_crop'", at_least=0)
    hflip: float = setting(0.5, 'Augmentation and regularization', 'horizontal flip probability', within=(0, 1))
    vflip: float = setting(0.0, 'Augmentation and regularization', 'vertical flip probability', within=(0, 1))
    scale: Optional[List[float]] = setting(None, 'Augmentation and regularization',
        "RandomResizedCrop scale range ('timm' aug)")
    ratio: Optional[List[float]] = setting(None, 'Augmentation and regularization',
        "RandomResizedCrop aspect-ratio range ('timm' aug)")
    color_jitter: float = setting(0.4, 'Augmentation and regularization', "colour jitter ('timm' aug)")
    aa: Optional[str] = setting(None, 'Augmentation and regularization',
        "auto-augment policy, e.g. 'rand-m9-mstd0.5' ('timm' aug)")
    reprob: float = setting(0.0, 'Augmentation and regularization', 'random erasing probability', within=(0, 1))
    remode: str = setting('pixel', 'Augmentation and regularization', "random erasing mode ('pixel', 'rand', 'const')")
    recount: int = setting(1, 'Augmentation and regularization', 'random erasing count', at_least=1)
    mean: Optional[List[float]] = setting(None, 'Augmentation and regularization',
        "normalisation mean (null: the model's)")
    std: Optional[List[float]] = setting(None, 'Augmentation and regularization',
        "normalisation std (null: the model's)")
    crop_pct: Optional[float] = setting(None, 'Augmentation and regularization',
        "evaluation crop fraction (null: the model's)")
    interpolation: Optional[str] = setting(None, 'Augmentation and regularization',
        "resize interpolation (null: the model's)")
    # run
    seed: int = setting(42, 'Miscellaneous', 'seed of initialisation, data order and augmentation', at_most=2 ** 32 - 1)
    output: str = setting('output', 'Miscellaneous', 'parent folder of runs')
    experiment: str = setting('', 'Miscellaneous', "the run's folder name (default: the recipe's name)")
    log_with: Optional[str] = setting(None, 'Miscellaneous', "extra Accelerate trackers, e.g. 'tensorboard'")
    checkpoint_hist: int = setting(1, 'Miscellaneous', 'epoch checkpoints to keep', at_least=1)
    val_every: int = setting(1, 'Miscellaneous',
        'evaluate the validation split every N epochs (and after the last): long runs on a few hundred images '
        'spend most of their time validating otherwise', at_least=1)
    resume: Optional[str] = setting(None, 'Miscellaneous',
        "checkpoint or run folder to continue from (bare --resume: this run's latest)")
    save_model: bool = setting(True, 'Miscellaneous', 'save the final model (config.json + model.safetensors + card)')
    progress: bool = setting(True, 'Miscellaneous', 'show a progress bar')
    calibrate_exits: Optional[float] = setting(None, 'Miscellaneous',
        'after training, choose adaptive-exit thresholds on the validation split losing at most this many top-1'
        ' points (null: off)')
    exit_confidence: Optional[float] = setting(0.9, 'Miscellaneous',
        "probability that calibrate_exits' bound holds on new data (Learn-then-Test; null: fit to the "
        'validation images, no guarantee)')


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
        """The data loaders' view of the augmentation settings: ``AugConfig``'s fields, each read from the setting of
        the same name here (a recipe's lists become the tuples timm's transforms take)."""
        values = {f.name: getattr(self, f.name) for f in fields(AugConfig)}
        return AugConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

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
