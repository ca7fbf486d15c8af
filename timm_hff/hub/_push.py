"""``push_to_hub``: publish a model or a saved folder, verified first, with a model card rebuilt on every push."""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from huggingface_hub import HfApi

from ..core import link_or_copy
from ._card import build_model_card
from ._errors import CheckpointFileNotFoundError
from ._format import CARD_NAME, CONFIG_NAME, HUB_FILES, WEIGHTS_NAME, read_config
from ._names import check_repo_id, check_revision
from ._save import save_pretrained
from ._weights import read_weights

__all__ = ['push_to_hub']


def push_to_hub(model_or_dir, repo_id: str, token: Optional[str] = None, private: bool = False,
                revision: Optional[str] = None, create_pr: bool = False,
                commit_message: str = 'Upload HFF model (timm_hff)', label_names: Optional[Sequence[str]] = None,
                metrics: Optional[Dict[str, Any]] = None, train_args: Optional[Dict[str, Any]] = None):
    """Upload an HFF model to the Hub with a freshly built model card.

    Uses ``HfApi.create_repo`` (``exist_ok``) and ``upload_folder``. Unlike timm's ``push_to_hf_hub``, the card
    (``README.md``) is rebuilt and uploaded on every push, from the metrics and recipe stored in
    ``config.json``, with the usage block naming ``repo_id``. Only ``config.json``, ``model.safetensors`` and
    ``README.md`` are uploaded; a saved folder is verified (config, checksum) before anything is sent.

    Args:
        model_or_dir: An ``HFFModel`` (saved to a temporary folder first) or a folder written by
            ``save_pretrained``.
        repo_id: ``'org/name'``.
        token: Hub token; default: ``HF_TOKEN`` or the saved login.
        private: Create the repository private (an existing repository keeps its visibility).
        revision: Branch to push to (created from the default branch if missing).
        create_pr: Open a pull request instead of committing directly.
        commit_message: The commit message.
        label_names, metrics, train_args: As in ``save_pretrained``; only used when a model is given.

    Returns:
        huggingface_hub's ``CommitInfo`` (``.commit_url``, ``.pr_url``, ``.oid``).
    """
    check_repo_id(repo_id)
    check_revision(revision)
    if create_pr and revision not in (None, 'main'):
        raise ValueError(f'create_pr opens a pull request against the default branch; it cannot target '
                         f'revision={revision!r} (push to the branch instead, without create_pr)')
    with tempfile.TemporaryDirectory(prefix='hff-push-') as tmp:
        stage = Path(tmp) / 'upload'
        if isinstance(model_or_dir, (str, os.PathLike)):
            src = Path(model_or_dir)
            if any(x is not None for x in (label_names, metrics, train_args)):
                raise ValueError('label_names/metrics/train_args apply when pushing a model; a saved folder already '
                                 'holds them (save it again to change them)')
            saved = read_config(src / CONFIG_NAME, where=str(src))
            weights = src / WEIGHTS_NAME
            if not weights.is_file():
                raise CheckpointFileNotFoundError(f'{src}: {WEIGHTS_NAME} not found; nothing to push')
            read_weights(weights, saved.weights_sha256, where=str(src))    # never publish a corrupt file
            stage.mkdir()
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                link_or_copy(src / name, stage / name)
            config = saved.raw
        else:
            save_pretrained(model_or_dir, stage, label_names=label_names, metrics=metrics, train_args=train_args,
                            card=False)
            config = json.loads((stage / CONFIG_NAME).read_text(encoding='utf-8'))
        build_model_card(config, repo_id=repo_id).save(str(stage / CARD_NAME))

        api = HfApi(token=token)
        api.create_repo(repo_id, token=token, private=private, repo_type='model', exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(stage), revision=None if create_pr else revision,
                                 token=token, commit_message=commit_message, create_pr=create_pr,
                                 allow_patterns=list(HUB_FILES))
