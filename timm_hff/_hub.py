"""Save / load / push HFF models in timm's Hub layout (safetensors only). Being written: see issue 4."""
from typing import Any, Dict, List, Optional


def save_pretrained(model, save_dir: str, label_names: Optional[List[str]] = None,
                    metrics: Optional[Dict[str, Any]] = None, train_args: Optional[Dict[str, Any]] = None,
                    card: bool = True) -> str:
    raise NotImplementedError('save_pretrained lands with issue 4')


def load_pretrained_hff(model_name: str, pretrained: bool = True, num_classes=None, in_chans=None, hff_cfg=None,
                        **kwargs):
    raise NotImplementedError('hf-hub: / local-dir: loading lands with issue 4')
