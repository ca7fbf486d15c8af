"""The ``hff_*`` model names: those registered into timm's registry and the HFF defaults each carries, the generic
entrypoint that saved models name, and how a model name is read. Light on purpose (no torch, no timm): the registry,
the factory, the hub format and the training methods all read it."""
from typing import Any, Dict, Tuple

__all__ = ['CFG_OVERRIDES', 'GENERIC_ARCH', 'GENERIC_DEFAULT_ARCH', 'HFF_DEFAULTS', 'HFF_PREFIX', 'parse_model_name',
           'registered_defaults']

HFF_PREFIX = 'hff_'
GENERIC_ARCH = 'hff_timm'   # the entrypoint a saved model's config.json names: any timm architecture (``arch=``)
GENERIC_DEFAULT_ARCH = 'resnet18'   # what ``hff_timm`` wraps when no ``arch=`` is given (timm builds every listed name)

# Registered ``hff_*`` names and the HFF defaults they carry on top of HFFConfig's (``_registry`` registers them
# into timm's registry; ``create_model`` resolves them). Every registered name predicts from the stage ensemble: a
# timm training script that backpropagates a loss on ``model(x)`` then trains every stage (each through its own head,
# the cuts still detach), where 'last' would train only the last stage and leave the others at their initialisation.
REGISTERED_PREDICT_FROM = 'ensemble'
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


# timm's pretrained-cfg values a registered name's default cfg changes from its architecture's: a small-input variant
# is meant for 32 px images and its stem keeps their resolution (a test builds each name and checks these)
CFG_OVERRIDES: Dict[str, Dict[str, Any]] = {
    'hff_resnet18_small': dict(input_size=(3, 32, 32), pool_size=(4, 4)),
}


def registered_defaults(name: str) -> Tuple[str, Dict[str, Any]]:
    """(timm architecture, HFF defaults) for an ``hff_*`` name; unregistered ``hff_<arch>`` gets no defaults."""
    if name == GENERIC_ARCH:
        return GENERIC_DEFAULT_ARCH, dict(predict_from=REGISTERED_PREDICT_FROM)
    defaults = dict(HFF_DEFAULTS.get(name, {}))
    arch = defaults.pop('arch', name[len(HFF_PREFIX):])
    if name in HFF_DEFAULTS:
        defaults.setdefault('predict_from', REGISTERED_PREDICT_FROM)
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
