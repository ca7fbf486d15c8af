"""Where a saved model's files are: ``'local-dir:/path'`` or ``'hf-hub:org/repo[@revision]'``.

Hub files go through ``hf_hub_download``, so its cache, ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE`` and saved
tokens apply. A missing file is told apart from a refused one: if only pickle weights are there, the error says so.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

from ..core import printable_name, short_repr
from ._errors import CheckpointError, CheckpointFileNotFoundError, one_line
from ._names import check_repo_id, check_revision
from ._format import CONFIG_NAME, WEIGHTS_NAME
from ._weights import PICKLE_SUFFIXES, pickle_names, unsafe_error

__all__ = ['HUB_KWARGS', 'HubFiles', 'LocalFiles', 'resolve', 'split_source']

HUB_KWARGS = ('revision', 'cache_dir', 'token', 'force_download', 'local_files_only')


def resolve(model_name: str, **hub_kwargs) -> Union['LocalFiles', 'HubFiles']:
    """The files of ``model_name``; ``hub_kwargs`` (``HUB_KWARGS``, None values dropped) apply to ``hf-hub:``."""
    source, ref = split_source(model_name)
    hub = {k: v for k, v in hub_kwargs.items() if v is not None}
    files = LocalFiles(ref) if source == 'local-dir' else HubFiles(ref, **hub)
    if source == 'local-dir' and hub.get('revision'):
        raise ValueError(f"revision={hub['revision']!r} applies to 'hf-hub:' models, not to {model_name}")
    return files


def split_source(model_name: str) -> Tuple[str, str]:
    for source in ('hf-hub', 'local-dir'):
        if isinstance(model_name, str) and model_name.startswith(source + ':'):
            ref = model_name[len(source) + 1:]
            if not ref:
                what = 'repository' if source == 'hf-hub' else 'folder'
                raise ValueError(f"'{printable_name(model_name)}' names no {what}")
            return source, ref
    raise ValueError(f"expected 'hf-hub:org/repo[@revision]' or 'local-dir:/path', got {model_name!r}")


class LocalFiles:
    """``local-dir:`` files."""

    def __init__(self, ref: str):
        self.root = Path(ref).expanduser()
        self.where = f'local-dir:{printable_name(ref)}'
        if self.root.is_file():
            if self.root.name.lower().endswith(PICKLE_SUFFIXES):
                raise unsafe_error(self.where, [self.root.name])
            raise CheckpointFileNotFoundError(f'{self.where} is a file; local-dir: takes the folder that holds '
                                              f'{CONFIG_NAME} and {WEIGHTS_NAME}')
        if not self.root.is_dir():
            raise CheckpointFileNotFoundError(f'{self.where}: no such folder')

    def config(self) -> Path:
        return self.root / CONFIG_NAME

    def weights(self) -> Path:
        path = self.root / WEIGHTS_NAME
        if path.is_file():
            return path
        names = [p.name for p in self.root.iterdir() if p.is_file()]
        pickles = pickle_names(names)
        if pickles:
            raise unsafe_error(self.where, pickles)
        others = sorted(n for n in names if n.endswith('.safetensors'))
        hint = f'; found {others}: rename the right one to {WEIGHTS_NAME}' if others else ''
        raise CheckpointFileNotFoundError(f'{self.where}: {WEIGHTS_NAME} not found{hint} (or load with '
                                          f'pretrained=False for fresh weights)')

    def source_fields(self) -> Dict[str, Any]:
        return {'source': 'local-dir', 'file': str(self.root)}


class HubFiles:
    """``hf-hub:`` files, through ``hf_hub_download`` (cache, offline mode, tokens, revisions)."""

    def __init__(self, ref: str, revision: Optional[str] = None, **hub_kwargs):
        repo_id, sep, rev = ref.partition('@')
        if sep and (not rev or '@' in rev):
            raise ValueError(f"'hf-hub:{printable_name(ref)}': write a revision as 'hf-hub:org/repo@revision' "
                             f"(one '@')")
        if rev and revision and rev != revision:
            raise ValueError(f"'hf-hub:{printable_name(ref)}' names revision {short_repr(rev)} but "
                             f"revision={short_repr(revision)} was also given")
        try:
            check_repo_id(repo_id, f"'hf-hub:{ref[:80]}': the repository")
            check_revision(rev or revision)   # it becomes a file name in the cache (refs/<revision>)
        except ValueError as e:
            raise ValueError(one_line(e)) from None
        self.repo_id, self.revision, self.hub_kwargs = repo_id, rev or revision, hub_kwargs
        self.where = f'hf-hub:{repo_id}' + (f'@{self.revision}' if self.revision else '')
        self._config_path: Optional[Path] = None

    def _download(self, filename: str) -> Path:
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.revision, **self.hub_kwargs))
        except LocalEntryNotFoundError:
            raise CheckpointFileNotFoundError(
                f'{self.where}: {filename} is not in the local Hub cache and the Hub cannot be reached (offline '
                f'mode or no network); download it once online, or unset HF_HUB_OFFLINE') from None
        except EntryNotFoundError:
            raise CheckpointFileNotFoundError(f'{self.where}: the repository has no {filename}') from None
        except RevisionNotFoundError:
            raise CheckpointError(f'{self.where}: revision {self.revision!r} does not exist') from None
        except RepositoryNotFoundError:
            raise CheckpointError(f'{self.where}: repository not found or not accessible; check the id, or pass '
                                  f'token= (or run `hf auth login`) for a private or gated repository') from None

    def config(self) -> Path:
        self._config_path = self._download(CONFIG_NAME)
        return self._config_path

    def weights(self) -> Path:
        try:
            return self._download(WEIGHTS_NAME)
        except CheckpointFileNotFoundError:
            pickles = pickle_names(self._known_files())
            if pickles:
                raise unsafe_error(self.where, pickles) from None
            raise

    def _known_files(self) -> List[str]:
        """Files in the repo: the Hub listing when online, else what the cached snapshot holds."""
        names = []
        if self._config_path is not None:
            names += [p.name for p in self._config_path.parent.iterdir()]
        if not hf_constants.is_offline_mode() and not self.hub_kwargs.get('local_files_only'):
            try:
                names += HfApi().list_repo_files(self.repo_id, revision=self.revision,
                                                 token=self.hub_kwargs.get('token'))
            except Exception:   # listing is only for a better message; the missing-file error stands
                pass
        return names

    def source_fields(self) -> Dict[str, Any]:
        hub_id = self.repo_id + (f'@{self.revision}' if self.revision else '')
        return {'source': 'hf-hub', 'hf_hub_id': hub_id}
