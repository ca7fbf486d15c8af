"""The run's data: the training, validation and test splits (HF ``datasets``), and their loaders (timm transforms).

The validation split is carved from the training data (``val_fraction``) or named (``val_split``); the test split is
loaded with them, so a wrong name fails before training, but it is read only once, after the last epoch. A split that
overlaps the training rows is refused, whichever way it was named.
"""
from typing import Optional, Tuple

import torch.nn as nn

from ..data import ImageData, ImageLoader, carve_validation, create_image_loader, load_image_dataset, parse_split
from ..data import resolve_data_config

__all__ = ['build_data', 'build_loaders', 'steps_per_epoch']


def build_data(cfg, accelerator) -> Tuple[ImageData, ImageData, Optional[ImageData]]:
    """(train, validation, test or None). The test split is loaded here, so a wrong name fails before training, but
    it is read only once, after the last epoch."""
    kw = dict(streaming=cfg.streaming, input_key=cfg.input_key, target_key=cfg.target_key,
              dataset_config=cfg.dataset_config)
    with accelerator.main_process_first():   # one process fills the datasets cache, the others read it
        train = load_image_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, num_classes=cfg.num_classes,
                                   num_samples=cfg.train_num_samples, **kw)
        full = train   # every row of train_split: with val_fraction, the hold-out is carved from it
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
                                      **kw)   # the whole split: val_num_samples truncates validation only
    if cfg.val_fraction == 0:
        _check_disjoint(full, val)
    if test is not None:
        _check_disjoint(full, test)
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


def build_loaders(cfg, model: nn.Module, train: ImageData, val: ImageData, accelerator,
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


def steps_per_epoch(loader: ImageLoader, iterable, cfg, num_processes: int) -> int:
    """Batches per process per epoch (streams: from train_num_samples; all processes do the same count)."""
    if loader.kind == 'stream':
        steps = loader.num_samples // (cfg.batch_size * num_processes)
        if steps < 1:
            raise ValueError(f'train_num_samples={loader.num_samples} is less than one global batch '
                             f'({cfg.batch_size} x {num_processes} processes)')
        return steps
    return len(iterable)
