"""Files written whole: a reader (or a crash) sees the old file or the new one, never half of either.

The one atomic file write of the package. A temporary file is created beside the target (same file system, so the
swap is a rename), fsynced, renamed over the target, and removed if anything fails before the rename.
"""
import os
import tempfile
from pathlib import Path
from typing import Callable, IO, Union

__all__ = ['atomic_write', 'atomic_write_bytes', 'atomic_write_text']


def atomic_write(path: Union[str, Path], write: Callable[[IO], None], mode: str = 'wb', encoding=None) -> None:
    """Call ``write(f)`` on a temporary file that replaces ``path`` once it is complete and on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; a written file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode='w', encoding='utf-8')


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
