"""Folders replaced whole: a model folder is either the old one or the new one, never half of each.

Used by ``save_pretrained`` and ``export_timm``; a crash (or a full disk) mid-write leaves the old folder in place.
"""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union


@contextmanager
def atomic_dir(target: Union[str, Path], keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` when the block finishes without error.

    The temporary folder lives next to ``target`` (same file system, so the swap is a rename). Files are
    fsynced before the swap. On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere it is
    two renames with the old folder kept until the new one is in place. Regular files in ``target`` that the
    block did not write are carried over (hard links, or copies); a ``target`` with sub-folders is refused.
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
        if target.is_dir():
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

