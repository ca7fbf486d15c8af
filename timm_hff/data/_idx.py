"""MNIST-family IDX files: a strict reader, and the conversion of a split into a ``datasets.Dataset``.

The images become a fixed-shape ``Array2D`` uint8 column (not PNG-encoded ``Image`` cells), so the whole split
can be read back as one array and trained from memory without any per-sample decoding.
"""
import gzip
import os
from typing import List, Optional, Tuple

import numpy as np

__all__ = ['FASHION_MNIST_CLASSES', 'FASHION_MNIST_DIR', 'find_idx_files', 'has_idx_files', 'idx_dataset',
           'idx_label_names', 'load_idx_arrays', 'read_idx']

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST family), gzipped or not, into a numpy array; a truncated file is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'IDX file not found: {path}')
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path} is not an IDX file (bad magic number)')
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f'{path} is truncated: its header is incomplete')
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f'{path} is truncated or corrupt: {len(data) - header} data bytes, expected {expected} '
                         f'for shape {shape}')
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_idx_files(root: str, split: str) -> Tuple[str, str]:
    """(images, labels) IDX paths of a split ('train' or 'test') under ``root``, gzipped or not."""
    prefix = {'train': 'train', 'test': 't10k'}.get(split)
    if prefix is None:
        raise ValueError(f"IDX data has splits 'train' and 'test', not {split!r}")
    paths = []
    for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'):
        for ext in ('', '.gz'):
            p = os.path.join(root, f'{prefix}-{kind}{ext}')
            if os.path.isfile(p):
                paths.append(p)
                break
        else:
            raise FileNotFoundError(f'no {prefix}-{kind}[.gz] in {root}; for Fashion-MNIST run '
                                    f'`apt-get install -y dataset-fashion-mnist`')
    return paths[0], paths[1]


def load_idx_arrays(root: str = FASHION_MNIST_DIR, split: str = 'train') -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of an MNIST-family split."""
    img_path, lbl_path = find_idx_files(root, split)
    images, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f'{root} {split}: {len(images)} images but {len(labels)} labels')
    return images, labels


FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')


def has_idx_files(root: str) -> bool:
    """True when ``root`` holds an MNIST-family training split (so a bare ``data_dir`` can be recognised)."""
    try:
        find_idx_files(root, 'train')
    except (FileNotFoundError, ValueError):
        return False
    return True


def idx_label_names(root: str, num_classes: int) -> List[str]:
    """Class names for an IDX folder: Fashion-MNIST's when the path says so, else the digits."""
    if num_classes == len(FASHION_MNIST_CLASSES) and 'fashion' in os.path.abspath(root).lower():
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_classes)]


def idx_dataset(root: str = FASHION_MNIST_DIR, split: str = 'train', label_names: Optional[List[str]] = None):
    """An MNIST-family split as a ``datasets.Dataset`` with columns ``image`` (Array2D uint8) and ``label``
    (ClassLabel).

    The class count is taken from the training split, so a test split that lacks some class still gets the
    same ClassLabel as its training split.
    """
    import datasets

    images, labels = load_idx_arrays(root, split)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f'{root} {split}: expected uint8 images of shape (N, H, W), got {images.dtype} '
                         f'{images.shape}')
    if label_names is None:
        train_labels = labels if split == 'train' else read_idx(find_idx_files(root, 'train')[1])
        num_classes = int(train_labels.max()) + 1 if len(train_labels) else 0
        num_classes = max(num_classes, int(labels.max()) + 1 if len(labels) else 0)
        label_names = idx_label_names(root, num_classes)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise ValueError(f'{root} {split}: labels span [{labels.min()}, {labels.max()}] but there are '
                         f'{len(label_names)} class names')
    features = datasets.Features({
        'image': datasets.Array2D(shape=images.shape[1:], dtype='uint8'),
        'label': datasets.ClassLabel(names=list(label_names)),
    })
    return datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features, split=split)
