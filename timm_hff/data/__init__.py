"""Image-classification data for HFF training: HF ``datasets`` sources, timm transforms, fast loaders.

    load_image_dataset('idx', '/usr/share/datasets/fashion-mnist', split='train')     -> ImageData
    resolve_data_config(model, in_chans=1, img_size=28, crop_pct=1.0)                 -> timm data config
    create_image_loader(data, data_cfg, train=True, batch_size=128)                   -> ImageLoader
"""
from ._idx import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, find_idx_files, has_idx_files, idx_dataset, load_idx_arrays, read_idx,
)
from ._loader import EpochSampler, ImageLoader, TensorImages, create_image_loader, load_into_memory
from ._sources import ImageData, carve_validation, load_image_dataset, parse_dataset_spec, parse_split, slice_rows
from ._transforms import (
    AUG_KINDS, AugConfig, BatchTransform, SampleTransform, images_to_uint8, random_pad_crop, resolve_data_config,
)
