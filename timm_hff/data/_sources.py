"""Where images come from: a Hub id, a local ``imagefolder`` or MNIST-family IDX files, all as HF ``datasets``.

A source is named the way timm's ``train.py`` names HF data sets:

    hfds/<hub id>     datasets.load_dataset(<hub id>, split=...)               e.g. hfds/uoft-cs/cifar10
    hfids/<hub id>    the same, streamed (an IterableDataset; nothing is downloaded up front)
    imagefolder       datasets.load_dataset('imagefolder', data_dir=...)      class-per-folder images
    idx               the four IDX files of MNIST / Fashion-MNIST / KMNIST in data_dir
    ''                infer from data_dir: IDX files if present, otherwise imagefolder

Whatever the source, the result is an ``ImageData``: the ``datasets`` object plus the image / label columns and
the class names, checked once here so that training can trust them.
"""
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from ._idx import FASHION_MNIST_DIR, has_idx_files, idx_dataset

__all__ = ['HUB_PREFIX', 'HUB_STREAM_PREFIX', 'IMAGE_KEYS', 'ImageData', 'LABEL_KEYS', 'carve_validation',
           'load_image_dataset', 'parse_dataset_spec', 'parse_split', 'slice_rows']

IMAGE_KEYS = ('image', 'img', 'jpg', 'png', 'webp')
LABEL_KEYS = ('label', 'fine_label', 'labels', 'cls', 'class', 'target')
HUB_PREFIX = 'hfds/'
HUB_STREAM_PREFIX = 'hfids/'


@dataclass
class ImageData:
    """One split of an image-classification data set, with its columns resolved.

    Attributes:
        dataset: A ``datasets.Dataset`` (map-style) or ``datasets.IterableDataset`` (streaming).
        image_key: Column holding the image (an ``Image`` or fixed-shape ``Array2D``/``Array3D`` feature).
        label_key: Column holding the class index (a ``ClassLabel``).
        num_classes: Classes the model is built for (>= the ClassLabel's count).
        label_names: One name per class.
        source: 'hub', 'imagefolder' or 'idx'.
        name: The Hub id or the local folder (recorded in the model card).
        split: The split name.
        streaming: True for an IterableDataset.
        num_samples: Rows in the split, or the given ``num_samples`` for a stream (None when unknown).
    """
    dataset: Any
    image_key: str
    label_key: str
    num_classes: int
    label_names: List[str]
    source: str
    name: str
    split: str
    streaming: bool = False
    num_samples: Optional[int] = None
    array_images: bool = field(default=False)

    def native_channels(self) -> Optional[int]:
        """Channels the images come with (1 grayscale, 3 RGB, ...), from the features or the first image; None when
        unknown (a stream is not read ahead)."""
        features = getattr(self.dataset, 'features', None)
        feat = features.get(self.image_key) if features is not None else None
        if feat is not None and type(feat).__name__ == 'Array2D':
            return 1
        if feat is not None and type(feat).__name__ == 'Array3D':
            shape = tuple(feat.shape)
            return shape[-1] if shape[-1] in (1, 3, 4) else shape[0]
        if self.streaming or not self.num_samples:
            return None
        image = self.dataset[0][self.image_key]
        if hasattr(image, 'getbands'):    # PIL
            return len(image.getbands())
        shape = getattr(image, 'shape', None)
        return None if shape is None else (1 if len(shape) == 2 else int(shape[-1]))

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f'the streamed split {self.name}:{self.split} has unknown length; set num_samples')
        return self.num_samples


def parse_dataset_spec(dataset: str, data_dir: Optional[str]) -> Tuple[str, str, bool]:
    """(source, name, streaming) from a ``dataset`` string and ``data_dir``; raises a one-line error when unknown."""
    dataset = dataset or ''
    if dataset.startswith(HUB_STREAM_PREFIX):
        return 'hub', _hub_id(dataset[len(HUB_STREAM_PREFIX):], dataset), True
    if dataset.startswith(HUB_PREFIX):
        return 'hub', _hub_id(dataset[len(HUB_PREFIX):], dataset), False
    if dataset in ('', 'idx', 'imagefolder'):
        if not data_dir:
            hint = f" (Fashion-MNIST: data_dir={FASHION_MNIST_DIR})" if dataset in ('', 'idx') else ''
            raise ValueError(f"dataset {dataset or '(inferred)'!r} reads local files: set data_dir{hint}")
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f'data_dir {data_dir!r} does not exist or is not a folder')
        if dataset == '':
            dataset = 'idx' if has_idx_files(data_dir) else 'imagefolder'
        return dataset, os.path.abspath(data_dir), False
    if '/' in dataset and not dataset.startswith(('/', '.')):
        raise ValueError(f"unknown dataset {dataset!r}: name Hub data sets as 'hfds/{dataset}' (or 'hfids/{dataset}' "
                         f"to stream)")
    raise ValueError(f"unknown dataset {dataset!r}: use 'hfds/<hub id>', 'hfids/<hub id>', 'imagefolder' or 'idx' "
                     f"(the last two with data_dir)")


def _hub_id(name: str, spec: str) -> str:
    if not name or name.count('/') > 1:
        raise ValueError(f"dataset {spec!r} does not name a Hub data set; expected e.g. 'hfds/uoft-cs/cifar10'")
    return name


def load_image_dataset(
        dataset: str = '',
        data_dir: Optional[str] = None,
        split: str = 'train',
        streaming: bool = False,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        num_classes: Optional[int] = None,
        num_samples: Optional[int] = None,
        dataset_config: Optional[str] = None,
) -> ImageData:
    """Load one split and resolve its image and label columns.

    Args:
        dataset: Source spec (see the module docstring).
        data_dir: Folder for 'imagefolder' / 'idx' (or for inferring the source).
        split: Split name ('train', 'test', 'validation', ...), optionally sliced as ``datasets`` does
            (``'train[:54000]'``, ``'train[90%:]'``).
        streaming: Stream the split (any source but 'idx'); 'hfids/' implies it.
        input_key: Image column; inferred ('image', 'img', ... or the only Image feature) when None.
        target_key: Label column; inferred ('label', 'fine_label', ... or the only ClassLabel) when None.
        num_classes: Classes the model will have. Must cover every label; an integer label column needs it.
        num_samples: Keep the first N rows (a map-style split), or the length of a stream (needed to plan steps).
        dataset_config: Hub configuration name, for data sets that have several.
    """
    source, name, stream_spec = parse_dataset_spec(dataset, data_dir)
    streaming = streaming or stream_spec
    split, row_slice = parse_split(split)
    if row_slice is not None and streaming:
        raise ValueError(f'split slices such as {split}[{row_slice[0]}:{row_slice[1]}] need a map-style data set; '
                         f'a stream has no row numbers (set streaming: false)')
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f'num_samples must be an integer >= 1, got {num_samples!r}')
    if source == 'idx':
        if streaming:
            raise ValueError('IDX data is read into memory; it cannot be streamed (set streaming: false)')
        ds = idx_dataset(name, split)
    else:
        ds = _load_hf(source, name, split, streaming, dataset_config)

    features = getattr(ds, 'features', None)
    image_key = _pick_image_key(features, input_key, name, split)
    label_key, ds, class_label = _pick_label(ds, features, target_key, num_classes, name, split)
    n_label = class_label.num_classes if class_label is not None else num_classes
    if num_classes is not None and num_classes < n_label:
        raise ValueError(f"{name}:{split} column '{label_key}' has {n_label} classes but num_classes={num_classes}: "
                         f"labels would fall outside [0, {num_classes}); raise num_classes or leave it unset")
    if num_classes is not None and class_label is not None and num_classes > n_label:   # never phantom classes
        raise ValueError(f"{name}:{split} column '{label_key}' has {n_label} classes "
                         f"({', '.join(map(str, class_label.names[:5]))}{', ...' if n_label > 5 else ''}) but "
                         f"num_classes={num_classes}: the model would predict classes no image has; set num_classes: "
                         f"{n_label}, or null to follow the data")
    n = num_classes or n_label
    names = list(class_label.names) if class_label is not None else []
    names += [str(i) for i in range(len(names), n)]

    array_images = features is not None and type(features[image_key]).__name__.startswith('Array')
    if streaming:
        if num_samples is not None:
            ds = ds.take(num_samples)
        total = num_samples
    else:
        if row_slice is not None:
            lo, hi = slice_rows(row_slice, len(ds))
            ds = ds.select(range(lo, hi))
            split = f'{split}[{lo}:{hi}]'
        if num_samples is not None and num_samples < len(ds):
            ds = ds.select(range(num_samples))
        total = len(ds)
        if total == 0:
            raise ValueError(f'{name}:{split} holds no images; check data_dir and the split name')
        _check_label_range(ds, label_key, n, name, split)
    return ImageData(dataset=ds, image_key=image_key, label_key=label_key, num_classes=n, label_names=names,
                     source=source, name=name, split=split, streaming=streaming, num_samples=total,
                     array_images=array_images)


_SLICE = re.compile(r'^([\w.-]+)\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\]$')


def parse_split(split: str) -> Tuple[str, Optional[Tuple[Optional[str], Optional[str]]]]:
    """``'train[:54000]'`` -> ``('train', (None, '54000'))``; a plain name -> ``(name, None)``.

    The ``datasets`` slice syntax (rows or percentages, negative counts from the end), applied the same way to
    every map-style source, IDX files included, so a recipe can name its validation rows as ``train[54000:]``.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f'a split must be a non-empty name such as \'train\' or \'train[:90%]\', got {split!r}')
    if '[' not in split:
        return split, None
    m = _SLICE.match(split.strip())
    if m is None:
        raise ValueError(f"split {split!r} is not a name or a slice such as 'train[:54000]', 'train[54000:]' or "
                         f"'train[:90%]'")
    return m.group(1), (m.group(2), m.group(3))


def slice_rows(row_slice: Tuple[Optional[str], Optional[str]], n: int) -> Tuple[int, int]:
    """Row bounds [lo, hi) of a parsed slice over ``n`` rows; an empty range is an error."""
    def bound(v: Optional[str], default: int) -> int:
        if v is None:
            return default
        i = round(int(v[:-1]) * n / 100) if v.endswith('%') else int(v)
        return max(0, min(n, i + n if i < 0 else i))

    lo, hi = bound(row_slice[0], 0), bound(row_slice[1], n)
    if hi <= lo:
        raise ValueError(f'the split slice [{row_slice[0] or ""}:{row_slice[1] or ""}] selects no rows of {n}')
    return lo, hi


def _load_hf(source: str, name: str, split: str, streaming: bool, config: Optional[str]):
    import datasets

    path, kwargs = (name, {}) if source == 'hub' else ('imagefolder', dict(data_dir=name))
    try:
        return datasets.load_dataset(path, config, split=split, streaming=streaming, **kwargs)
    except ValueError as e:
        msg = str(e)
        if 'split' in msg.lower():
            raise ValueError(f"split {split!r} does not exist in {name}: {msg.splitlines()[0]}") from None
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(f'cannot load {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}); check the '
                                f'id or path, the network, or HF_HUB_OFFLINE with a filled cache') from None


def _pick_image_key(features, input_key: Optional[str], name: str, split: str) -> str:
    if features is None:
        return input_key or 'image'
    columns = list(features)
    if input_key is not None:
        if input_key not in features:
            raise ValueError(f"{name}:{split} has no image column {input_key!r}; columns are {columns}")
        return input_key
    for key in IMAGE_KEYS:
        if key in features:
            return key
    images = [k for k, f in features.items() if type(f).__name__ in ('Image', 'Array2D', 'Array3D')]
    if len(images) == 1:
        return images[0]
    raise ValueError(f"cannot tell which column of {name}:{split} holds the images (columns {columns}); set "
                     f"input_key")


def _pick_label(ds, features, target_key: Optional[str], num_classes: Optional[int], name: str, split: str):
    """(label column, dataset (possibly cast), its ClassLabel or None)."""
    import datasets

    if features is None:
        if num_classes is None:
            raise ValueError(f'{name}:{split} does not declare its features, so the class count is unknown; '
                             f'set num_classes (and input_key / target_key if not image / label)')
        return target_key or 'label', ds, None
    columns = list(features)
    if target_key is not None:
        if target_key not in features:
            raise ValueError(f"{name}:{split} has no label column {target_key!r}; columns are {columns}")
        key = target_key
    else:
        key = next((k for k in LABEL_KEYS if k in features), None)
        if key is None:
            labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
            if len(labels) != 1:
                close = difflib.get_close_matches('label', columns, n=1)
                raise ValueError(f"cannot tell which column of {name}:{split} holds the labels (columns {columns}); "
                                 f"set target_key" + (f" (perhaps {close[0]!r})" if close else ''))
            key = labels[0]
    feat = features[key]
    if isinstance(feat, datasets.ClassLabel):
        return key, ds, feat
    if isinstance(feat, datasets.Value) and feat.dtype.startswith(('int', 'uint')):
        if num_classes is None:
            raise ValueError(f"{name}:{split} column '{key}' is {feat.dtype}, not a ClassLabel, so the class count "
                             f"is unknown; set num_classes")
        label = datasets.ClassLabel(num_classes=num_classes)
        return key, ds.cast_column(key, label), label
    raise ValueError(f"{name}:{split} column '{key}' is {feat!r}, not a class label; give target_key of a "
                     f"ClassLabel (or integer) column")


def carve_validation(data: ImageData, fraction: float, seed: int = 0) -> Tuple[ImageData, ImageData]:
    """(train, validation): a class-balanced hold-out of ``fraction`` of a training split.

    ``datasets``' stratified ``train_test_split`` with a fixed seed: the same rows on every run, process and
    machine whatever the training seed, every class in proportion, and no row in both parts.
    """
    if data.streaming:
        raise ValueError(f'{data.name}:{data.split} is streamed, so a validation fraction cannot be carved from it; '
                         f'name a validation split (val_split) instead')
    if not 0 < fraction < 1:
        raise ValueError(f'val_fraction must be in (0, 1), got {fraction!r}')
    n_val = round(len(data) * fraction)
    if n_val < data.num_classes or len(data) - n_val < data.num_classes:
        raise ValueError(f'val_fraction={fraction:g} of {len(data)} images leaves fewer than one image per class '
                         f'({data.num_classes} classes) on one side; use a larger data set or another fraction')
    # in memory unless the rows live in Arrow cache files (a Hub or imagefolder data set): datasets then names the
    # indices cache files itself and refuses keep_in_memory beside them
    parts = data.dataset.train_test_split(test_size=n_val, stratify_by_column=data.label_key, seed=seed,
                                          keep_in_memory=not data.dataset.cache_files)
    pct = f'{fraction:.0%}' if round(fraction * 100, 6) == round(fraction * 100) else f'{fraction:g}'
    common = dict(image_key=data.image_key, label_key=data.label_key, num_classes=data.num_classes,
                  label_names=list(data.label_names), source=data.source, name=data.name, streaming=False,
                  array_images=data.array_images)
    train = ImageData(dataset=parts['train'], split=f'{data.split} minus a {pct} hold-out',
                      num_samples=len(parts['train']), **common)
    val = ImageData(dataset=parts['test'], split=f'{data.split}, {pct} stratified hold-out (split_seed {seed})',
                    num_samples=len(parts['test']), **common)
    return train, val


def _check_label_range(ds, key: str, num_classes: int, name: str, split: str) -> None:
    """Every label in [0, num_classes), checked on the Arrow column (no Python loop)."""
    import pyarrow.compute as pc

    column = ds.with_format('arrow')[key]
    column = column.column(key) if hasattr(column, 'column') else column
    bounds = pc.min_max(column).as_py()
    lo, hi = bounds['min'], bounds['max']
    if lo is None:
        raise ValueError(f"{name}:{split} column '{key}' holds no labels")
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}:{split} column '{key}' has labels in [{lo}, {hi}], outside [0, {num_classes}) "
                         f"(num_classes={num_classes}); fix the labels or num_classes")
