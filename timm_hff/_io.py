"""Files and folders written whole: a reader (or a crash) sees the old one or the new one, never half of either.

The package's one atomic file write (``atomic_write*``) and one atomic folder replace (``atomic_dir``), used by the
hub (saved models, exports), the trainer (metrics, checkpoints' state, final models), ``hff-seed-weights`` and the
benchmarks. A temporary file or folder is created beside the target (same file system, so the swap is a rename),
fsynced, swapped in, and removed if anything fails before the swap.
"""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Union

__all__ = ['atomic_dir', 'atomic_write', 'atomic_write_bytes', 'atomic_write_text', 'link_or_copy']


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


@contextmanager
def atomic_dir(target: Union[str, Path], carry_over: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` when the block finishes without error.

    The temporary folder lives next to ``target`` (same file system, so the swap is a rename). Files are
    fsynced before the swap. On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere it is
    two renames with the old folder kept until the new one is in place. With ``carry_over``, regular files in
    ``target`` that the block did not write are carried over (hard links, or copies: a user's notes beside a saved
    model survive a re-save); without it the new folder is exactly what the block wrote. A ``target`` with
    sub-folders is refused. A failure (or a crash) anywhere leaves the old folder as it was and no temporary one.
    """
    target = Path(target).expanduser()
    target = target.resolve() if target.is_symlink() else target.absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f'{target} exists and is not a folder; choose a folder path for the model')
    if target.is_dir():
        subdirs = sorted(p.name for p in target.iterdir() if p.is_dir() and not p.is_symlink())
        if subdirs:
            raise ValueError(f'{target} holds sub-folders {subdirs[:3]}, which replacing it would move; save the '
                             f'model into a folder of its own (e.g. {target / "model"})')
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
    try:
        yield tmp
        mode = 0o666 & ~_umask()     # safetensors writes 0600; a model folder is as readable as any file
        for p in tmp.iterdir():
            if p.is_file() and not p.is_symlink():
                os.chmod(p, mode)
        if carry_over and target.is_dir():
            for old in target.iterdir():
                if not (tmp / old.name).exists():
                    link_or_copy(old, tmp / old.name)
        _fsync_tree(tmp)
        _swap_dirs(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # the new folder's old name, or the replaced folder after a swap


def _swap_dirs(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; afterwards ``new`` names the old content (or nothing)."""
    os.chmod(new, 0o755 & ~_umask())
    if not target.exists():
        os.rename(new, target)
        return
    if _rename_exchange(new, target):
        return
    old = Path(tempfile.mkdtemp(prefix=f'.{target.name}.old-', dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    os.rename(old, new)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for p in root.iterdir():
        if p.is_file() and not p.is_symlink():
            with open(p, 'rb') as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

