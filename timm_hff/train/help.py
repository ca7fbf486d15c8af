"""One line of help per ``TrainConfig`` setting, grouped as timm's ``train.py`` groups its flags.

``hff-train --help`` prints these under their group with each setting's type and default; a test checks that every
``TrainConfig`` field has a line here, so a new setting cannot be added without its help.
"""
from typing import Dict, Tuple

from .registry import get_method, get_schedule, method_names, schedule_names

__all__ = ['GROUPS', 'HELP', 'help_text']

GROUPS = ('Dataset', 'Model', 'Optimizer', 'Learning rate schedule', 'Augmentation and regularization',
          'Model exponential moving average', 'Miscellaneous')

HELP: Dict[str, Tuple[str, str]] = {
    # Dataset
    'dataset': ('Dataset', "'hfds/<hub id>', 'hfids/<hub id>' (streamed), 'imagefolder', 'idx' or '' (infer from "
                           "data_dir)"),
    'data_dir': ('Dataset', "local folder of 'imagefolder' / 'idx' data"),
    'dataset_config': ('Dataset', 'Hub configuration name, for data sets that have several'),
    'train_split': ('Dataset', "split trained on: a name or a datasets-style slice ('train[:54000]')"),
    'val_split': ('Dataset', 'split evaluated after every epoch (name or slice); null with val_fraction'),
    'val_fraction': ('Dataset', 'hold out this share of train_split (class-balanced, same rows every run) as the '
                                'validation split'),
    'split_seed': ('Dataset', 'seed of the val_fraction hold-out (independent of seed)'),
    'test_split': ('Dataset', 'split evaluated once, after the last epoch (never read during training)'),
    'input_key': ('Dataset', 'image column (inferred when null)'),
    'target_key': ('Dataset', 'label column (inferred when null)'),
    'num_classes': ('Dataset', "classes to build prototypes for (null: the label column's ClassLabel)"),
    'label_names': ('Dataset', 'class names saved with the model, one per class in label order'),
    'train_num_samples': ('Dataset', 'use the first N training rows; a stream\'s length (required there)'),
    'val_num_samples': ('Dataset', 'use the first N validation (and test) rows'),
    'streaming': ('Dataset', "stream the splits (implied by 'hfids/')"),
    'data_in_memory': ('Dataset', 'hold each split as one uint8 tensor (null: only array columns such as IDX)'),
    'workers': ('Dataset', 'loader workers for per-sample decoding'),
    'shuffle_buffer': ('Dataset', 'shuffle buffer of a streamed training split'),
    'threads': ('Miscellaneous', 'CPU threads per process (torch.set_num_threads); 1 on a shared CPU'),
    # Model
    'model': ('Model', "timm architecture, 'hff_*' name, or 'hf-hub:<repo>' / 'local-dir:<folder>' HFF weights"),
    'pretrained': ('Model', "load timm's pretrained backbone (or the HFF weights of a hub / local model)"),
    'pretrained_file': ('Model', "timm's pretrained weights from a local .safetensors file (implies pretrained)"),
    'head_warmup_epochs': ('Model', 'train only the heads for N epochs (backbone frozen), then fine-tune'),
    'in_chans': ('Model', 'input channels (1 reads images as grayscale)'),
    'img_size': ('Model', "input resolution (null: the model's default)"),
    'model_kwargs': ('Model', "timm keyword arguments, a mapping merged key by key (e.g. '{drop_path_rate: 0.1}')"),
    'hff': ('Model', "HFF settings, a mapping merged key by key (e.g. '{num_stages: 4, margin: 0.3}')"),
    'ff': ('Model', 'Forward-Forward settings (FFConfig: threshold, label_mode, label_res, ...); method ff only'),
    'reset_prototypes': ('Model', 'fresh prototypes in every head (a new label set with the same class count)'),
    'freeze_stages': ('Model', "HFF stages whose backbone slice stays frozen (transfer), e.g. '[0, 1]'; BP: "
                      "the same blocks"),
    'head_only': ('Model', "train only the heads (BP: timm's classifier, a linear probe); the backbone stays frozen"),
    'channels_last': ('Model', 'channels-last memory format'),
    'grad_checkpointing': ('Model', "timm's gradient checkpointing (with memory_efficient: inside each stage too)"),
    'torchcompile': ('Model', "torch.compile backend, e.g. 'inductor' (bare --torchcompile: inductor); HFF compiles "
                              "block by block, the cuts stay eager"),
    'torchcompile_mode': ('Model', "torch.compile mode, e.g. 'max-autotune' (null: the default)"),
    'cuda_graphs': ('Model', 'capture the whole training step as a CUDA graph and replay it (one GPU; fused sgd / '
                             'adam / adamw; not fp16)'),
    # Optimizer
    'stage_parallel_queue': ('Optimizer', 'stage_parallel: stage outputs in flight between two stage processes'),
    'stage_parallel_timeout': ('Optimizer', 'stage_parallel: seconds to wait for another stage process before stopping '
                                            'with an error naming it'),
    'opt': ('Optimizer', "timm optimizer name ('sgd', 'adamw', 'lamb', ...)"),
    'lr': ('Optimizer', 'learning rate'),
    'weight_decay': ('Optimizer', 'weight decay (not on biases, norms and prototypes)'),
    'momentum': ('Optimizer', 'SGD momentum'),
    'opt_eps': ('Optimizer', 'optimizer epsilon (null: its default)'),
    'opt_betas': ('Optimizer', 'optimizer betas (null: its default)'),
    'clip_grad': ('Optimizer', 'gradient-norm clip, per stage (null: off)'),
    'layer_decay': ('Optimizer', "timm's layer-wise lr decay over the backbone's group_matcher (e.g. 0.75)"),
    'backbone_lr_scale': ('Optimizer', "lr factor of the backbone's parameters; the heads train at lr (e.g. 0.1)"),
    'stage_lr': ('Optimizer', "one lr factor per HFF stage (timm's lr_scale), e.g. '[1, 1, 2, 2]'"),
    'batch_size': ('Optimizer', 'per-process batch size'),
    'validation_batch_size': ('Optimizer', 'evaluation batch size (null: batch_size)'),
    'grad_accum_steps': ('Optimizer', 'gradient accumulation steps'),
    'mixed_precision': ('Optimizer', "'no', 'bf16' or 'fp16'"),
    # Learning rate schedule
    'sched': ('Learning rate schedule', "timm scheduler ('cosine', 'step', 'plateau', ...)"),
    'epochs': ('Learning rate schedule', "epochs (per stage with schedule 'sequential')"),
    'min_steps': ('Learning rate schedule', 'at least this many optimizer steps: a small data set\'s epochs (and every '
                  'epoch-counted setting) stretched by a whole factor; 0: off'),
    'warmup_epochs': ('Learning rate schedule', 'linear warm-up epochs'),
    'warmup_lr': ('Learning rate schedule', 'learning rate at the start of the warm-up'),
    'min_lr': ('Learning rate schedule', 'lowest learning rate of the schedule'),
    'cooldown_epochs': ('Learning rate schedule', 'epochs at min_lr after the schedule'),
    'decay_epochs': ('Learning rate schedule', "epochs between decays ('step' schedules)"),
    'decay_rate': ('Learning rate schedule', "decay factor ('step' schedules)"),
    'sched_on_updates': ('Learning rate schedule', 'step the schedule every update (else every epoch)'),
    # Augmentation and regularization
    'mixup': ('Augmentation and regularization', 'mixup alpha (0: off)'),
    'cutmix': ('Augmentation and regularization', 'cutmix alpha (0: off)'),
    'mixup_prob': ('Augmentation and regularization', 'probability of mixup / cutmix per batch'),
    'mixup_switch_prob': ('Augmentation and regularization', 'probability of cutmix instead of mixup'),
    'mixup_mode': ('Augmentation and regularization', "'batch', 'pair' or 'elem'"),
    'smoothing': ('Augmentation and regularization', 'label smoothing'),
    'aug': ('Augmentation and regularization', "'pad_crop' (batched on the device), 'timm' (per sample) or 'none'"),
    'crop_padding': ('Augmentation and regularization', "padding of 'pad_crop'"),
    'hflip': ('Augmentation and regularization', 'horizontal flip probability'),
    'vflip': ('Augmentation and regularization', 'vertical flip probability'),
    'scale': ('Augmentation and regularization', "RandomResizedCrop scale range ('timm' aug)"),
    'ratio': ('Augmentation and regularization', "RandomResizedCrop aspect-ratio range ('timm' aug)"),
    'color_jitter': ('Augmentation and regularization', "colour jitter ('timm' aug)"),
    'aa': ('Augmentation and regularization', "auto-augment policy, e.g. 'rand-m9-mstd0.5' ('timm' aug)"),
    'reprob': ('Augmentation and regularization', 'random erasing probability'),
    'remode': ('Augmentation and regularization', "random erasing mode ('pixel', 'rand', 'const')"),
    'recount': ('Augmentation and regularization', 'random erasing count'),
    'mean': ('Augmentation and regularization', "normalisation mean (null: the model's)"),
    'std': ('Augmentation and regularization', "normalisation std (null: the model's)"),
    'crop_pct': ('Augmentation and regularization', "evaluation crop fraction (null: the model's)"),
    'interpolation': ('Augmentation and regularization', "resize interpolation (null: the model's)"),
    # Model exponential moving average
    'model_ema': ('Model exponential moving average', "keep an EMA of the weights (timm's ModelEmaV3)"),
    'model_ema_decay': ('Model exponential moving average', 'EMA decay'),
    'model_ema_warmup': ('Model exponential moving average', 'EMA decay warm-up'),
    # Miscellaneous
    'seed': ('Miscellaneous', 'seed of initialisation, data order and augmentation'),
    'output': ('Miscellaneous', 'parent folder of runs'),
    'experiment': ('Miscellaneous', "the run's folder name (default: the recipe's name)"),
    'log_with': ('Miscellaneous', "extra Accelerate trackers, e.g. 'tensorboard'"),
    'val_every': ('Miscellaneous', 'evaluate the validation split every N epochs (and after the last)'),
    'checkpoint_hist': ('Miscellaneous', 'epoch checkpoints to keep'),
    'resume': ('Miscellaneous', "checkpoint or run folder to continue from (bare --resume: this run's latest)"),
    'save_model': ('Miscellaneous', 'save the final model (config.json + model.safetensors + card)'),
    'progress': ('Miscellaneous', 'show a progress bar'),
    'calibrate_exits': ('Miscellaneous', 'after training, choose adaptive-exit thresholds on the validation split '
                                         'losing at most this many top-1 points (null: off)'),
    'exit_confidence': ('Miscellaneous', "probability that calibrate_exits' bound holds on new data (Learn-then-Test; "
                                         'null: fit to the validation images, no guarantee)'),
}


def _choices(names, get) -> str:
    parts = [f"'{n}' ({get(n).help})" if get(n).help else f"'{n}'" for n in names]
    return ', '.join(parts[:-1]) + ' or ' + parts[-1] if len(parts) > 1 else parts[0]


def help_text(name: str) -> Tuple[str, str]:
    """(group, one line) of a setting; ``method`` and ``schedule`` list the registered choices."""
    if name == 'method':
        return 'Model', _choices(method_names(), get_method)
    if name == 'schedule':
        return 'Optimizer', _choices(schedule_names(), get_schedule)
    return HELP[name]
