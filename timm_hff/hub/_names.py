"""Names from untrusted input that become paths, URLs or card text: checked, so that none leaves its place.

A revision becomes a file under the Hub cache (``refs/<revision>``), an experiment name a folder under ``--output``,
and a label name a line of ``config.json`` and of the model card; a ``..``, an absolute path, a NUL byte or a newline
in any of them would write somewhere else or break the file it lands in. Each check raises ``ValueError`` with one
line naming the value and the rule.
"""
import re
from typing import Any, Optional

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ._errors import one_line

__all__ = ['MAX_NAME_CHARS', 'check_folder_name', 'check_path', 'check_repo_id', 'check_revision', 'check_text']

MAX_NAME_CHARS = 256
_CONTROL = re.compile(r'[\x00-\x1f\x7f]')
# git's check-ref-format rules, which the Hub applies to branch and tag names: no '..', no '@{', no control
# characters, spaces or any of ~^:?*[\, no empty, '.'-leading or '.lock'-ending component.
_BAD_REF = re.compile(r'\.\.|@\{|[\x00-\x20\x7f~^:?*\[\\]')


def check_text(value: Any, what: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """A one-line string: no NUL, newline or other control character, at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise ValueError(f'{what} must be a string, got {type(value).__name__}')
    if _CONTROL.search(value):
        raise ValueError(f'{what} {value[:60]!r} holds a control character (NUL, newline, tab, ...); use plain text')
    if len(value) > max_chars:
        raise ValueError(f'{what} is {len(value)} characters long; at most {max_chars} are allowed')
    return value


def check_folder_name(value: Any, what: str) -> str:
    """One path component that stays inside its parent: no separator, not '.' or '..', not absolute."""
    check_text(value, what)
    if '/' in value or '\\' in value or value in ('.', '..'):
        raise ValueError(f"{what} {value!r} must be a single folder name (no '/', '\\', '.' or '..'), so that the "
                         f"run stays inside the output folder")
    return value


def check_path(value: Any, what: str) -> str:
    """A path given on purpose (absolute or relative): only NUL and control characters are refused."""
    return check_text(value, what, max_chars=4096)


def check_revision(value: Optional[str], what: str = 'revision') -> Optional[str]:
    """A Hub branch, tag or commit: a git ref name, so it cannot name a file outside the cache's ``refs`` folder."""
    if value is None:
        return None
    check_text(value, what)
    parts = value.split('/')
    if (not value or _BAD_REF.search(value) or value.startswith('/') or value.endswith(('/', '.', '.lock'))
            or any(not p or p.startswith('.') for p in parts)):
        raise ValueError(f"{what} {value!r} is not a branch, tag or commit name (no '..', leading '/', '.'-leading "
                         f"part, spaces or any of ~^:?*[\\)")
    return value


def check_repo_id(value: Any, what: str = 'repo_id') -> str:
    """``'org/name'`` as the Hub allows it (huggingface_hub's own check), in one line."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string 'org/name', got {type(value).__name__}")
    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise ValueError(f'{what} {value[:80]!r}: {one_line(e)}') from None
    return value
