"""Starting the processes of a stage-parallel run: one per stage, joined by a ``torch.distributed`` process group.

Two ways in. Under ``torchrun`` (or ``accelerate launch --multi_gpu``), every process exists already and ``RANK`` /
``WORLD_SIZE`` say which it is. Started alone (``hff-train``, or ``accelerate launch --cpu``, which starts a single
process: Accelerate runs several CPU processes only through MPI), rank 0 starts the other stages' processes itself
once it knows how many stages the model has, hosting the rendezvous store on a free port. Those children run the same
recipe (written to a temporary file) with their rank in the environment; their output goes where the parent's goes.

Gloo on CPU, NCCL on GPU (one GPU per stage); control messages always use a gloo group.
"""
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

from .handoff import who

__all__ = ['Group', 'check_devices', 'from_environment', 'join', 'leave', 'spawn', 'stop_children']

_STORE_ENV = 'HFF_STAGE_PARALLEL_STORE'   # host:port of the store of a run that started its own processes


@dataclass
class Group:
    """This process's place in the run."""
    rank: int
    world: int
    device: torch.device
    launched: bool                 # True: torchrun / Accelerate started every process; False: rank 0 started them
    ctrl: Optional[object] = None  # the gloo group of control messages
    children: List[subprocess.Popen] = field(default_factory=list)
    config_file: Optional[str] = None


def from_environment() -> Optional[Group]:
    """This process's rank and world size when a launcher (or rank 0) started it, else None (rank 0, alone)."""
    if 'WORLD_SIZE' not in os.environ or 'RANK' not in os.environ:
        return None
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    return Group(rank, world, _device(int(os.environ.get('LOCAL_RANK', rank))), launched=_STORE_ENV not in os.environ)


def _device(local_rank: int) -> torch.device:
    use_cpu = os.environ.get('ACCELERATE_USE_CPU', '').lower() in ('1', 'true', 'yes')
    if torch.cuda.is_available() and not use_cpu:
        return torch.device('cuda', local_rank % torch.cuda.device_count())
    return torch.device('cpu')


def check_devices(world: int, device: torch.device) -> None:
    if device.type == 'cuda' and torch.cuda.device_count() < world:
        raise ValueError(f'schedule stage_parallel on GPU runs each of the {world} stages on its own GPU, but '
                         f'{torch.cuda.device_count()} GPU(s) are visible (NCCL cannot put two processes on one); '
                         f'use {world} GPUs, or run on CPU with ACCELERATE_USE_CPU=1')


def join(group: Group, timeout: float) -> None:
    """Join the process group (a process that a launcher or rank 0 started)."""
    if group.device.type == 'cuda':
        torch.cuda.set_device(group.device)
    backend = 'nccl' if group.device.type == 'cuda' else 'gloo'
    if group.launched:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    else:
        host, port = os.environ[_STORE_ENV].rsplit(':', 1)
        store = dist.TCPStore(host, int(port), group.world, False, timeout=timedelta(seconds=timeout))
        store.set(f'ready{group.rank}', '1')
        dist.init_process_group(backend, store=store, rank=group.rank, world_size=group.world,
                                timeout=timedelta(seconds=timeout))
    group.ctrl = dist.new_group(backend='gloo', timeout=timedelta(seconds=timeout))


def spawn(cfg, world: int, timeout: float) -> Group:
    """Rank 0 of a run started alone: start ranks 1..world-1 and form the group with them."""
    device = _device(0)
    check_devices(world, device)
    store = dist.TCPStore('127.0.0.1', 0, world, True, timeout=timedelta(seconds=timeout), wait_for_workers=False)
    import yaml
    fd, path = tempfile.mkstemp(prefix='hff-stage-parallel-', suffix='.yaml')
    settings = dict(cfg.to_dict(), experiment=cfg.run_name)
    with os.fdopen(fd, 'w') as f:
        yaml.safe_dump(settings, f, sort_keys=False)
    group = Group(0, world, device, launched=False, config_file=path)
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(store.port),
               **{_STORE_ENV: f'127.0.0.1:{store.port}'})
    if cfg.threads:
        env['OMP_NUM_THREADS'] = str(cfg.threads)
    for r in range(1, world):
        group.children.append(subprocess.Popen(
            [sys.executable, '-m', 'timm_hff.train', '--config', path],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
    try:
        _wait_ready(store, group, timeout)
        os.remove(path)   # every child has read its recipe by now
        group.config_file = None
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', store=store, rank=0, world_size=world,
                                timeout=timedelta(seconds=timeout))
        group.ctrl = dist.new_group(backend='gloo', timeout=timedelta(seconds=timeout))
    except BaseException:
        stop_children(group, grace=0)
        raise
    return group


def _wait_ready(store, group: Group, timeout: float) -> None:
    """Until every child has reached the store; a child that exits first is named at once."""
    deadline = time.time() + timeout
    waiting = set(range(1, group.world))
    while waiting:
        for r in sorted(waiting):
            if store.check([f'ready{r}']):
                waiting.discard(r)
            elif group.children[r - 1].poll() is not None:
                raise ConnectionError(f'stage-parallel {who(r)} exited with code {group.children[r - 1].returncode} '
                                      f'before joining the run (see its output above)')
        if waiting and time.time() > deadline:
            raise ConnectionError(f'stage-parallel {who(min(waiting))} did not start within {timeout:g} s '
                                  f'(stage_parallel_timeout)')
        time.sleep(0.05)


def stop_children(group: Group, grace: float = 30.0) -> List[Optional[int]]:
    """Wait up to ``grace`` seconds for the children to exit, then stop the ones still running; their exit codes."""
    deadline = time.time() + grace
    for p in group.children:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if group.config_file and os.path.exists(group.config_file):
        os.remove(group.config_file)
    return [p.returncode for p in group.children]


def leave(group: Optional[Group], failed: bool) -> None:
    """Leave the process group (without waiting on peers that are gone) and reap the children."""
    if dist.is_initialized():
        if not failed:
            dist.destroy_process_group()
        # after a failure a peer may be gone: destroying the group could wait on it, and exiting frees it anyway
    if group is not None and group.children:
        stop_children(group, grace=5.0 if failed else 60.0)
