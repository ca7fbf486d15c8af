"""DataLoaders over an ``ImageData`` split, in one of three ways:

- ``memory``: the split is one uint8 tensor (N, C, S, S) made once (IDX / Array columns are read as one array;
  image columns are decoded once when asked). A batch is a single index into it: no per-sample Python work.
- ``samples``: a map-style split decoded and transformed per sample in loader workers (timm transforms).
- ``stream``: a streamed split, sharded per process with ``datasets.distributed.split_dataset_by_node`` and per
  worker by ``datasets`` itself.

Every batch is ``(uint8 images, int64 labels)``; ``BatchTransform`` finishes it on the device.
"""
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ._sources import ImageData
from ._transforms import AugConfig, BatchTransform, SampleTransform, images_to_uint8

__all__ = ['EpochSampler', 'ImageLoader', 'LabelCheckedCollate', 'SampleImages', 'StreamImages', 'TensorImages',
           'create_image_loader', 'load_into_memory']


@dataclass
class ImageLoader:
    """A DataLoader with the batch half of its transform.

    Attributes:
        loader: Yields (uint8 images, labels) batches.
        transform: ``BatchTransform`` to run on the device.
        kind: 'memory', 'samples' or 'stream'.
        num_samples: Images in the split (per epoch, over all processes).
        sharded: True when the loader already reads only this process's part (streams); map-style loaders are
            sharded by ``accelerator.prepare`` instead.
    """
    loader: DataLoader
    transform: BatchTransform
    kind: str
    num_samples: int
    sharded: bool = False


class EpochSampler(Sampler):
    """Indices in a fresh permutation per epoch, drawn from ``seed + epoch`` only.

    Because the order depends on nothing but (seed, epoch), a resumed run replays exactly the order an
    uninterrupted run would have used, on every process.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0):
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class TensorImages(Dataset):
    """A split held as one uint8 tensor; ``__getitems__`` serves a whole batch with a single index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, idx: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def _identity_collate(batch):
    return batch


class LabelCheckedCollate:
    """Stack samples and refuse labels outside [0, num_classes) (streams cannot be checked up front)."""

    def __init__(self, num_classes: int, where: str):
        self.num_classes = num_classes
        self.where = where

    def __call__(self, batch):
        images = torch.stack([b[0] for b in batch])
        labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f'{self.where}: a batch holds labels in [{int(labels.min())}, {int(labels.max())}], '
                             f'outside [0, {self.num_classes}); fix the labels or num_classes')
        return images, labels


class SampleImages(Dataset):
    """Map-style split transformed per sample (runs in loader workers)."""

    def __init__(self, data: ImageData, transform: SampleTransform):
        self.ds = data.dataset.select_columns([data.image_key, data.label_key])
        if data.array_images:   # rows as uint8 arrays, not nested lists
            self.ds = self.ds.with_format('numpy', columns=[data.image_key], dtype=np.uint8, output_all_columns=True)
        self.image_key, self.label_key = data.image_key, data.label_key
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[int(i)]
        return self.transform(row[self.image_key]), row[self.label_key]


class StreamImages(IterableDataset):
    """A streamed split transformed per sample; ``datasets`` splits shards across loader workers."""

    def __init__(self, ds, image_key: str, label_key: str, transform: SampleTransform):
        self.ds = ds
        self.image_key, self.label_key = image_key, label_key
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.ds, 'set_epoch'):
            self.ds.set_epoch(epoch)

    def __iter__(self):
        for row in self.ds:
            yield self.transform(row[self.image_key]), row[self.label_key]


def load_into_memory(data: ImageData, data_cfg: Dict[str, Any], workers: int = 0) -> TensorImages:
    """The whole split as uint8 tensors at the model's input size, decoded exactly once."""
    ds = data.dataset
    labels = torch.from_numpy(np.asarray(ds.with_format('numpy', columns=[data.label_key])[:][data.label_key],
                                         dtype=np.int64))
    images = None
    if data.array_images:   # already pixels: no per-image work unless a resize is needed
        raw = ds.with_format('numpy', columns=[data.image_key], dtype=np.uint8)[:][data.image_key]
        images = images_to_uint8(torch.from_numpy(np.ascontiguousarray(raw)), data_cfg)
    if images is None:      # timm's eval transform per image, once
        loader = DataLoader(SampleImages(data, SampleTransform(data_cfg, train=False)), batch_size=256,
                            num_workers=workers, collate_fn=LabelCheckedCollate(data.num_classes, data.name))
        images = torch.cat([x for x, _ in loader])
    return TensorImages(images, labels)


def create_image_loader(
        data: ImageData,
        data_cfg: Dict[str, Any],
        train: bool,
        batch_size: int,
        aug: Optional[AugConfig] = None,
        workers: int = 2,
        seed: int = 0,
        in_memory: Optional[bool] = None,
        drop_last: bool = False,
        channels_last: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
        shuffle_buffer: int = 10000,
) -> ImageLoader:
    """Build the loader and its batch transform for one split.

    Args:
        data: The split (``load_image_dataset``).
        data_cfg: Resolved timm data config (``resolve_data_config``).
        train: Shuffle and augment.
        batch_size: Per-process batch size.
        aug: Training augmentation; ignored for evaluation.
        workers: Loader worker processes for per-sample decoding (the memory path needs none).
        seed: Shuffling seed (the order of epoch e depends only on seed and e).
        in_memory: Hold the split as one tensor. None: yes for array columns (IDX), no for encoded images.
        drop_last: Drop the last incomplete batch (mixup needs even batches).
        channels_last: Batches in channels-last memory format.
        process_index: This process's rank (streams only; map-style loaders are sharded by Accelerate).
        num_processes: World size (streams only).
        shuffle_buffer: Shuffle buffer of a streamed training split.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be an integer >= 1, got {batch_size!r}')
    aug = aug or AugConfig()
    transform = BatchTransform(data_cfg, train=train, aug=aug, channels_last=channels_last)
    where = f'{data.name}:{data.split}'
    if data.streaming:
        if in_memory:
            raise ValueError(f'{where} is streamed; it cannot also be held in memory (set data_in_memory: false)')
        from datasets.distributed import split_dataset_by_node
        ds = data.dataset
        if train:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        if num_processes > 1:
            ds = split_dataset_by_node(ds, rank=process_index, world_size=num_processes)
        stream = StreamImages(ds, data.image_key, data.label_key, SampleTransform(data_cfg, train=train, aug=aug))
        workers = min(workers, getattr(ds, 'num_shards', None) or getattr(ds, 'n_shards', 1) or 1)
        loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                            collate_fn=LabelCheckedCollate(data.num_classes, where))
        return ImageLoader(loader, transform, 'stream', data.num_samples, sharded=True)

    if in_memory is None:
        in_memory = data.array_images
    per_sample_aug = train and aug.aug == 'timm'
    sampler = EpochSampler(len(data), shuffle=train, seed=seed)
    if in_memory and not per_sample_aug:
        dataset = load_into_memory(data, data_cfg, workers)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                            collate_fn=_identity_collate)
        return ImageLoader(loader, transform, 'memory', len(dataset))
    dataset = SampleImages(data, SampleTransform(data_cfg, train=train, aug=aug))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                        collate_fn=LabelCheckedCollate(data.num_classes, where))
    return ImageLoader(loader, transform, 'samples', len(dataset))
