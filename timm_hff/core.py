"""The shared core's public face below the model: settings, atomic writes, model names, lazy package faces.

The subpackages (``data``, ``heads``, ``hub``, ``train``, ``baselines``, ``cli``) import the root's core through this
module and the two above it (``model``, ``factory``), never its private modules, so the root's files can be split or
renamed behind these names. It stays free of torch and timm, because the CLIs' argument parsing imports it.
"""
from ._config import HFFConfig, printable_name, short_repr
from ._io import atomic_dir, atomic_write, atomic_write_bytes, atomic_write_text, link_or_copy
from ._lazy import lazy_exports, moved_module
from ._names import GENERIC_ARCH, parse_model_name, registered_defaults

__all__ = ['GENERIC_ARCH', 'HFFConfig', 'atomic_dir', 'atomic_write', 'atomic_write_bytes', 'atomic_write_text',
           'lazy_exports', 'link_or_copy', 'moved_module', 'parse_model_name', 'printable_name', 'registered_defaults',
           'short_repr']
