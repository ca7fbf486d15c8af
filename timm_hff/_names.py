"""The ``hff_*`` model names: those registered into timm's registry and the HFF defaults each carries, the generic
entrypoint that saved models name, and how a model name is read. Light on purpose (no torch, no timm): the registry,
the factory, the hub format and the training methods all read it."""
from typing import Any, Dict, Tuple

__all__ = ['GENERIC_ARCH', 'HFF_DEFAULTS', 'HFF_PREFIX', 'parse_model_name', 'registered_defaults']

HFF_PREFIX = 'hff_'
GENERIC_ARCH = 'hff_timm'   # the entrypoint a saved model's config.json names: any timm architecture (``arch=``)

# Registered ``hff_*`` names and the HFF defaults they carry on top of HFFConfig's (``_registry`` registers them
# into timm's registry; ``create_model`` resolves them).
HFF_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'hff_resnet18': dict(),
    'hff_resnet34': dict(),
    'hff_resnet50': dict(),
    'hff_resnet18_small': dict(arch='resnet18', small_input=True),
    'hff_convnext_atto': dict(),
    'hff_convnext_tiny': dict(),
    'hff_efficientnet_b0': dict(),
    'hff_mobilenetv3_small_050': dict(),
    'hff_regnetx_002': dict(),
    'hff_vit_tiny_patch16_224': dict(),
    'hff_vit_small_patch16_224': dict(),
    'hff_deit_tiny_patch16_224': dict(),
    'hff_swin_tiny_patch4_window7_224': dict(),
}


def registered_defaults(name: str) -> Tuple[str, Dict[str, Any]]:
    """(timm architecture, HFF defaults) for an ``hff_*`` name; unregistered ``hff_<arch>`` gets no defaults."""
    defaults = dict(HFF_DEFAULTS.get(name, {}))
    arch = defaults.pop('arch', name[len(HFF_PREFIX):])
    return arch, defaults


def parse_model_name(model_name: str) -> Tuple[str, str]:
    """Split a name into (source, name): source is 'hf-hub', 'local-dir', 'hff' (a registered hff_* name) or
    'timm' (any timm architecture, wrapped with the default HFF settings)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f'model_name must be a non-empty string, got {model_name!r}')
    for source in ('hf-hub', 'local-dir'):
        if model_name.startswith(source + ':'):
            return source, model_name[len(source) + 1:]
    if model_name.startswith(HFF_PREFIX):
        return 'hff', model_name
    return 'timm', model_name
