"""Image-classification data for HFF training: HF ``datasets`` sources, timm transforms, fast loaders.

    load_image_dataset('idx', '/usr/share/datasets/fashion-mnist', split='train')     -> ImageData
    resolve_data_config(model, in_chans=1, img_size=28, crop_pct=1.0)                 -> timm data config
    create_image_loader(data, data_cfg, train=True, batch_size=128)                   -> ImageLoader

Names load on first use (``timm_hff._lazy``): the augmentation settings are read before torch is imported.
"""
from ..core import lazy_exports

_EXPORTS = {
    **dict.fromkeys(['FASHION_MNIST_CLASSES', 'FASHION_MNIST_DIR', 'find_idx_files', 'has_idx_files', 'idx_dataset',
                     'load_idx_arrays', 'read_idx'], '._idx'),
    **dict.fromkeys(['EpochSampler', 'ImageLoader', 'TensorImages', 'create_image_loader', 'load_into_memory'],
                    '._loader'),
    **dict.fromkeys(['ImageData', 'carve_validation', 'load_image_dataset', 'parse_dataset_spec', 'parse_split',
                     'slice_rows'], '._sources'),
    **dict.fromkeys(['AUG_KINDS', 'AugConfig'], '._aug'),
    **dict.fromkeys(['BatchTransform', 'SampleTransform', 'images_to_uint8', 'random_pad_crop', 'resolve_data_config',
                     'image_mode', 'to_pil'], '._transforms'),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
