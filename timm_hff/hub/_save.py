"""``save_pretrained``: config, weights and card, written together into one folder that appears whole."""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from ..core import atomic_dir
from ._build_config import build_config, unwrap_model
from ._card import build_model_card
from ._format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from ._weights import state_tensors, write_weights

__all__ = ['save_pretrained']


def save_pretrained(model, save_dir: Union[str, Path], label_names: Optional[Sequence[str]] = None,
                    metrics: Optional[Dict[str, Any]] = None, train_args: Optional[Dict[str, Any]] = None,
                    card: bool = True) -> str:
    """Write ``config.json``, ``model.safetensors`` and (with ``card``) a ``README.md`` model card.

    Writing is atomic: everything goes to a temporary folder next to ``save_dir``, is flushed to disk, and only
    then takes ``save_dir``'s place, so a crash never leaves a half-written model. Other regular files already
    in ``save_dir`` (logs, a recipe) are kept; a ``save_dir`` holding sub-folders is refused, because replacing
    it would move data save_pretrained does not own (save into a sub-folder such as ``run_dir/'model'``).

    Args:
        model: An ``HFFModel`` (Accelerate/DDP wrappers and ``torch.compile`` are unwrapped).
        save_dir: The model folder; created, or replaced once the new content is complete.
        label_names: Class names, index-aligned with the logits; default ``model.pretrained_cfg['label_names']``.
        metrics: Evaluation results for the card: ``top1`` (percent), ``stage_top1`` (one per stage),
            ``dataset`` (Hub id or a short name such as ``'fashion_mnist'``), and any measured cost
            (``train_time_s``, ``images_per_s``, ``peak_mem_mb``, ...). Stored in ``config.json``.
        train_args: The training recipe (hyper-parameters), stored in ``config.json`` and shown on the card.
            Preprocessing keys in timm's names (``img_size``/``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``) become the saved ``pretrained_cfg``, so timm's
            ``resolve_model_data_config`` reproduces the training preprocessing.
        card: Also write the model card (``README.md``).

    Returns:
        The folder written, as a string.
    """
    model = unwrap_model(model)
    if not len(getattr(model, 'heads', ())):
        raise ValueError('save_pretrained writes an HFF model with its prototype heads, but this one has none '
                         '(num_classes=0 or pruned by features_only); save it before removing them, or add heads '
                         'with reset_classifier(num_classes)')
    config = build_config(model, label_names=label_names, metrics=metrics, train_args=train_args)
    tensors = state_tensors(model)
    with atomic_dir(save_dir) as tmp:
        config['hff']['weights_sha256'] = write_weights(tensors, tmp / WEIGHTS_NAME)
        _write_json(tmp / CONFIG_NAME, config)
        if card:
            build_model_card(config).save(str(tmp / CARD_NAME))
    return str(Path(save_dir))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + '\n', encoding='utf-8')
