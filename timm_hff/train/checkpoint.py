"""Epoch checkpoints that are never half-written, resume discovery, and a lock on the run folder.

A checkpoint is ``accelerator.save_state`` (model weights as safetensors, optimizer, RNG states of every
process) plus ``trainer_state.json`` (epoch, update count, metric history, identity of the run) and, with EMA,
``ema.safetensors``. It is written into ``checkpoints/.tmp-epoch_NNNN`` and renamed to ``checkpoints/epoch_NNNN``
only when complete, so a crash at any moment leaves the previous checkpoint intact and loses at most the
current epoch.

A checkpoint folder handed to ``--resume`` is untrusted input, like a model folder: ``trainer_state.json`` is checked
value by value and records every other file's sha256, so a damaged, swapped or replaced file is refused by name before
anything reads it, and no file of it is ever unpickled (``state_files``; Accelerate's own files load with
``weights_only=True``).
"""
import json
import os
import shutil
import weakref
from typing import Any, Dict, Optional, Tuple

from ..core import atomic_write_text
from .errors import first_line, os_error, reason

__all__ = ['CKPT_DIR', 'EMA_FILE', 'FILES_KEY', 'LOCK_FILE', 'RunInUseError', 'RunLock', 'STATE_FILE',
           'check_compatible', 'check_files', 'checkpoint_name', 'checkpoint_paths', 'commit_checkpoint',
           'find_resume', 'list_checkpoints', 'open_run_folder', 'prune', 'read_state', 'resolve_resume',
           'run_identity', 'state_error', 'unloadable']

CKPT_DIR = 'checkpoints'
STATE_FILE = 'trainer_state.json'
EMA_FILE = 'ema.safetensors'
LOCK_FILE = '.lock'
FILES_KEY = 'files'              # trainer_state.json: every other file of the checkpoint -> its sha256
_MAX_STATE_BYTES = 64 * 2 ** 20
_MAX_EPOCHS = 10 ** 7
_PREFIX = 'epoch_'


class RunInUseError(RuntimeError):
    """Another live process holds the run folder's lock."""


def checkpoint_name(epoch: int) -> str:
    return f'{_PREFIX}{epoch:04d}'


def list_checkpoints(run_dir: str):
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(_PREFIX)
                   and os.path.isfile(os.path.join(root, n, STATE_FILE)))
    return [os.path.join(root, n) for n in names]


def resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    """The checkpoint folder to continue from.

    ``resume`` may be a checkpoint folder, a run folder (its latest checkpoint), 'latest' (bare ``--resume``: this
    run's latest checkpoint, refused when there is none) or 'auto' (this run's latest checkpoint, or None to start
    fresh: for job scripts that always pass it).
    """
    if resume in ('auto', 'latest'):
        found = list_checkpoints(run_dir)
        if not found and resume == 'latest':
            raise FileNotFoundError(f'--resume: {run_dir} holds no checkpoint to continue (this run never completed '
                                    f'an epoch); drop --resume to start it, or name a run folder: --resume PATH')
        return found[-1] if found else None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f'--resume {resume!r}: no such folder')
    if os.path.isfile(os.path.join(resume, STATE_FILE)):
        return resume
    found = list_checkpoints(resume)
    if not found:
        raise FileNotFoundError(f'--resume {resume!r} holds no complete checkpoint ({CKPT_DIR}/{_PREFIX}NNNN with '
                                f'{STATE_FILE})')
    return found[-1]


def read_state(ckpt: str) -> Dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, checked as untrusted input: a damaged or foreign one is one line (the
    file named), never a JSON traceback or a run that silently starts at another epoch."""
    path = os.path.join(ckpt, STATE_FILE)
    try:
        if os.path.getsize(path) > _MAX_STATE_BYTES:
            raise state_error(path, f'is over {_MAX_STATE_BYTES >> 20} MiB, far more than a run state')
        with open(path, encoding='utf-8') as f:
            state = json.load(f)
    except (ValueError, RecursionError) as e:   # not JSON, not UTF-8, an int of 5,000 digits, nested too deep
        raise state_error(path, f'is not valid JSON ({first_line(e)[:80]})') from None
    if not isinstance(state, dict) or not {'epoch', 'updates', 'history'} <= set(state):
        raise ValueError(f'{path} lacks epoch / updates / history; it is not a timm_hff training checkpoint')
    for key, limit in (('epoch', _MAX_EPOCHS), ('updates', 2 ** 53)):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            shown = str(value) if len(str(value)) <= 24 else f'{str(value)[:20]}... ({len(str(value))} chars)'
            raise state_error(path, f'holds {key} = {shown}, not a count from 0 to {limit:,}')
    if not isinstance(state['history'], list) or not all(_metric_row(r) for r in state['history']):
        raise state_error(path, 'holds a history that is not a list of metric rows (names -> numbers)')
    if len(state['history']) > state['epoch'] + 1:
        raise state_error(path, f"holds {len(state['history'])} epochs of history for {state['epoch'] + 1} epochs run")
    if not isinstance(state.get('identity', {}), dict) or not isinstance(state.get(FILES_KEY, {}), dict):
        raise state_error(path, f'holds an identity or {FILES_KEY} that is not a mapping')
    return state


def state_error(path: str, what: str) -> Exception:
    """The one error of a checkpoint file that is not what this run wrote (``CorruptCheckpointError``, one line
    naming the file)."""
    from ..hub import CorruptCheckpointError
    return CorruptCheckpointError(f'--resume: {path} {what}; the checkpoint is damaged or not this run\'s: resume '
                                  f'from an earlier checkpoint or start a new experiment')


def _metric_row(row: Any) -> bool:
    """One epoch's metrics as the run wrote them: names -> numbers (or short strings, or lists of numbers)."""
    def plain(v):
        return v is None or isinstance(v, (bool, float)) or (isinstance(v, int) and abs(v) < 2 ** 63) or (
            isinstance(v, str) and len(v) <= 200)
    return isinstance(row, dict) and len(row) <= 1000 and all(
        isinstance(k, str) and len(k) <= 200 and (plain(v) or (isinstance(v, list) and len(v) <= 1000 and all(
            plain(x) for x in v))) for k, v in row.items())


def check_files(ckpt: str, state: Dict[str, Any]) -> None:
    """Every file of the checkpoint is the one its ``trainer_state.json`` recorded (sha256): a truncated file, one
    swapped between stages or epochs, or one added or replaced is refused, naming it, before anything reads it.
    Checkpoints written before the record existed are read without it (their files are still checked as read)."""
    recorded = state.get(FILES_KEY)
    if recorded is None:
        return
    from ..hub import file_sha256
    present = set(_checkpoint_files(ckpt))
    for name, digest in recorded.items():
        if not (isinstance(name, str) and isinstance(digest, str) and name in present):
            raise state_error(os.path.join(ckpt, str(name)[:80]), f'is listed in {STATE_FILE} but missing')
    for name in sorted(present):
        if name not in recorded:
            raise state_error(os.path.join(ckpt, name), f'is not listed in {STATE_FILE} (added or swapped in)')
        if file_sha256(os.path.join(ckpt, name)) != recorded[name]:
            raise state_error(os.path.join(ckpt, name), f'differs from the file {STATE_FILE} recorded (truncated, '
                                                        f'changed, or swapped with another stage\'s or epoch\'s)')


def _checkpoint_files(ckpt: str):
    """The checkpoint's files but its state, as '/'-separated paths relative to it."""
    for root, dirs, files in os.walk(ckpt):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), ckpt).replace(os.sep, '/')
            if rel != STATE_FILE:
                yield rel


def check_compatible(state: Dict[str, Any], identity: Dict[str, Any], ckpt: str) -> None:
    """Refuse a checkpoint of another model, class count, method, schedule or world size."""
    theirs = state.get('identity', {})
    for key, mine in identity.items():
        if key in theirs and theirs[key] != mine:
            raise ValueError(f'--resume {ckpt}: the checkpoint was made with {key}={theirs[key]!r} but this run has '
                             f'{key}={mine!r}; resume with {key}: {json.dumps(theirs[key])} or start a new experiment')


# torch's words when an optimizer state has other parameter groups than the optimizer it is loaded into
_OTHER_GROUPS = ("doesn't match the size of optimizer's group", 'different number of parameter groups')


def unloadable(ckpt: str, e: BaseException) -> Exception:
    """The one-line error of a checkpoint that did not load: one made with other optimizer-shaping settings (before
    identities named them) is not called damaged; anything else is (``CorruptCheckpointError``)."""
    from .optim import OPTIMIZER_SHAPE
    if any(words in str(e) for words in _OTHER_GROUPS):
        return ValueError(f"--resume {ckpt}: the checkpoint's optimizer has other parameter groups than this run's "
                          f"({first_line(e)}): one of {', '.join(OPTIMIZER_SHAPE)} differs from the run that wrote it "
                          f"(its config.yaml); resume with those settings or start a new experiment")
    from ..hub import CorruptCheckpointError
    return CorruptCheckpointError(f'--resume {ckpt}: the checkpoint cannot be loaded ({type(e).__name__}: '
                                  f'{first_line(e)}); resume from an earlier checkpoint or start a new experiment')


def find_resume(cfg, run_dir: str) -> Optional[str]:
    """The checkpoint ``cfg.resume`` names; without ``resume``, a run folder holding checkpoints is refused (a new
    run would overwrite them)."""
    if cfg.resume:
        return resolve_resume(cfg.resume, run_dir)
    if list_checkpoints(run_dir):
        raise ValueError(f'{run_dir} already holds checkpoints of a run; pass --resume to continue it, or '
                         f'choose another --experiment / --output')
    return None


def run_identity(cfg, num_classes: int, num_processes: int, extra: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint must match to be resumed by a run (``extra``: the method's own settings)."""
    from .optim import OPTIMIZER_SHAPE   # what trains and the optimizer's groups: its saved state fits only these
    return dict(model=cfg.model, method=cfg.method, schedule=cfg.schedule, num_classes=num_classes, hff=cfg.hff,
                model_kwargs=cfg.model_kwargs, in_chans=cfg.in_chans, **extra, num_processes=num_processes,
                batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps, train_split=cfg.train_split,
                val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                **{k: getattr(cfg, k) for k in OPTIMIZER_SHAPE})


def checkpoint_paths(run_dir: str, epoch: int) -> Tuple[str, str, str]:
    """(checkpoints folder, the temporary folder a checkpoint is written into, its final name)."""
    root = os.path.join(run_dir, CKPT_DIR)
    return root, os.path.join(root, '.tmp-' + checkpoint_name(epoch)), os.path.join(root, checkpoint_name(epoch))


def commit_checkpoint(tmp: str, final: str, state: Dict[str, Any], run_dir: str, keep: int) -> None:
    """Complete a checkpoint written into ``tmp``: its ``trainer_state.json``, the rename to ``final`` (only now is
    it listed), and the pruning of the oldest beyond ``keep``."""
    from ..hub import file_sha256
    state = {**state, FILES_KEY: {n: file_sha256(os.path.join(tmp, n)) for n in _checkpoint_files(tmp)}}
    atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1) + '\n')
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(run_dir, keep)


def open_run_folder(run_dir: str) -> 'RunLock':
    """Create the run folder and take its lock; an unwritable place is one line, before any work is done."""
    lock = RunLock(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock.acquire()
    except OSError as e:   # read-only or full file system
        raise os_error(e, f'cannot write to the output folder {run_dir} ({reason(e)}); choose a writable '
                          f'--output') from None
    return lock


def prune(run_dir: str, keep: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# Locks held by this process, by path: a lock file naming our own pid is only stale if no live RunLock holds it
# (two Trainers in one process, e.g. a notebook, must not share a run folder either).
_HELD: 'weakref.WeakValueDictionary[str, RunLock]' = weakref.WeakValueDictionary()


class RunLock:
    """An exclusive lock on a run folder, so two runs never write into the same place.

    The lock file holds the owner's pid; a lock left by a process that no longer exists is taken over, and so is
    one naming this process when no live ``RunLock`` of this process holds it.
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = self._owner()
                holder = _HELD.get(os.path.abspath(self.path))
                if pid == os.getpid() and holder is not None and holder is not self and holder.held:
                    raise RunInUseError(f'{os.path.dirname(self.path)} is in use by another training run in this '
                                        f'process; let it finish, or release it (trainer.lock.release())') from None
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise RunInUseError(f'{os.path.dirname(self.path)} is in use by another training run (pid {pid}); '
                                       f'wait for it or choose another --experiment / --output') from None
                os.remove(self.path)   # stale: its owner is gone
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(str(os.getpid()))
            self.held = True
            _HELD[os.path.abspath(self.path)] = self
            return
        raise RuntimeError(f'could not lock {self.path}')

    def release(self) -> None:
        if self.held and os.path.exists(self.path):
            os.remove(self.path)
        self.held = False

    def _owner(self) -> Optional[int]:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
