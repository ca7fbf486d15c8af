"""What one stage process owns: its tensors, its EMA, its part of a checkpoint, its share of the final model.

A stage owns its slice of the backbone's parameters (the build-time probe's ``stage_param_names``), the buffers of the
modules that run inside the stage (norm statistics; from the probe's record of which module runs when) and its
prototype head. Only the owner's copy of a tensor is current, so checkpoints, the EMA and the final model take each
tensor from its owner.

A stage's part of a checkpoint is ``stage_K/``: ``model.safetensors`` (its tensors), ``optimizer.safetensors``,
``scheduler.safetensors``, ``random_states.safetensors``, and ``scaler.safetensors`` / ``ema.safetensors`` when used:
safetensors only (``state_files``), because a checkpoint folder may come from elsewhere and a pickle can run code.
Each is matched against what this stage expects before it is used.
Every rank writes its part into the checkpoint's temporary folder; rank 0 adds ``trainer_state.json`` and renames the
folder only once every rank has reported success, so a rank killed at any moment leaves the last checkpoint whole.
"""
import os
import random
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from ...checkpoint import checkpoint_paths, commit_checkpoint, read_state, state_error, unloadable
from ...state_files import check_optimizer_state, load_state_file, load_tensors_file, match_state, save_state_file
from ...optim import run_settings_kept, say_changes
from ...errors import first_line, reason
from ....hub import CheckpointError, CorruptCheckpointError

__all__ = ['PICKLED', 'QuietStop', 'StageEma', 'assemble', 'finish', 'load_checkpoint', 'load_stage', 'owned_keys',
           'owned_state', 'rng_state', 'save_checkpoint', 'save_stage', 'set_rng_state', 'stage_dir']

MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE = 'model.safetensors', 'optimizer.safetensors', 'scheduler.safetensors'
RNG_FILE, SCALER_FILE, EMA_FILE = 'random_states.safetensors', 'scaler.safetensors', 'ema.safetensors'
# the pickles of timm_hff 0.1's stage-parallel checkpoints: never opened, the checkpoint refused in one line
PICKLED = ('optimizer.bin', 'scheduler.bin', 'random_states.pkl', 'scaler.pt')


def stage_dir(ckpt: str, k: int) -> str:
    return os.path.join(ckpt, f'stage_{k}')


def owned_keys(model: nn.Module, part, k: int) -> List[str]:
    """The ``state_dict`` keys stage ``k`` owns: its backbone parameters, the buffers of the modules that run in it,
    and its head."""
    calls = part.calls
    tap_ends = [calls[t][0][1] for t in model.split.tap_names]
    keys = {f'backbone.{n}' for n in model.split.stage_param_names[k]}
    for name, module in model.backbone.named_modules():
        if not name or name not in calls:
            continue
        end = calls[name][0][1]
        stage = next((j for j, e in enumerate(tap_ends) if end <= e), len(tap_ends))
        if stage == k:
            keys |= {f'backbone.{name}.{b}' for b, _ in module.named_buffers(recurse=False)}
    state = model.state_dict()
    keys |= {n for n in state if n.startswith(f'heads.{k}.')}
    return sorted(n for n in keys if n in state)


def owned_state(module: nn.Module, keys: List[str]) -> Dict[str, torch.Tensor]:
    state = module.state_dict()
    return {n: state[n].detach().to('cpu', copy=True).contiguous() for n in keys}


def rng_state() -> Dict:
    out = dict(random=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        out['cuda'] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Dict) -> None:
    random.setstate(state['random'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_stage(path: str, trainer) -> None:
    """Stage ``trainer.k``'s part of a checkpoint into ``path`` (a folder of the temporary checkpoint)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file(owned_state(trainer.model, trainer.keys), os.path.join(path, MODEL_FILE))
    save_state_file(trainer.optimizer.state_dict(), os.path.join(path, OPTIMIZER_FILE))
    save_state_file(trainer.scheduler.state_dict(), os.path.join(path, SCHEDULER_FILE))
    save_state_file(rng_state(), os.path.join(path, RNG_FILE))
    if trainer.scaler is not None:
        save_state_file(trainer.scaler.state_dict(), os.path.join(path, SCALER_FILE))
    if trainer.ema is not None:
        save_file(owned_state(trainer.ema.module, trainer.keys), os.path.join(path, EMA_FILE))
    for name in os.listdir(path):   # on disk before rank 0 declares the checkpoint complete
        with open(os.path.join(path, name), 'rb') as f:
            os.fsync(f.fileno())


def load_stage(path: str, trainer) -> None:
    """Restore stage ``trainer.k`` from its part of a checkpoint; a missing, damaged or foreign file raises one line
    naming it (``checkpoint.state_error``), before this stage's state is touched where the check can come first."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path} is missing')
    old = [n for n in PICKLED if os.path.exists(os.path.join(path, n))]
    if old:
        raise state_error(os.path.join(path, old[0]), 'is a pickle written by timm_hff 0.1, which is never opened '
                                                      '(unpickling can run any code); start a new experiment, '
                                                      'or finish the run with the version that wrote it')
    mine = owned_state(trainer.model, trainer.keys)
    model = load_tensors_file(os.path.join(path, MODEL_FILE), mine)
    optimizer = load_state_file(os.path.join(path, OPTIMIZER_FILE))
    check_optimizer_state(optimizer, trainer.optimizer, os.path.join(path, OPTIMIZER_FILE))
    scheduler = load_state_file(os.path.join(path, SCHEDULER_FILE), like=trainer.scheduler.state_dict())
    scaler = None if trainer.scaler is None else load_state_file(os.path.join(path, SCALER_FILE),
                                                                 like=trainer.scaler.state_dict())
    ema = None
    if trainer.ema is not None:
        if not os.path.isfile(os.path.join(path, EMA_FILE)):
            raise FileNotFoundError(f'model_ema is on but {os.path.join(path, EMA_FILE)} is missing')
        ema = load_tensors_file(os.path.join(path, EMA_FILE), mine)
    rng = load_state_file(os.path.join(path, RNG_FILE))
    like = rng_state()
    if not isinstance(rng, dict) or not set(like) - {'cuda'} <= set(rng) <= set(like) | {'cuda'}:
        raise state_error(os.path.join(path, RNG_FILE), 'is not an RNG state (random / numpy / torch)')
    match_state({k: rng[k] for k in like if k != 'cuda'}, {k: v for k, v in like.items() if k != 'cuda'},
                os.path.join(path, RNG_FILE))
    trainer.model.load_state_dict(model, strict=False)
    with run_settings_kept(trainer.optimizer, getattr(trainer, 'resume_changes', [])):
        trainer.optimizer.load_state_dict(optimizer)
    trainer.scheduler.load_state_dict(scheduler)
    if scaler is not None:
        trainer.scaler.load_state_dict(scaler)
    if ema is not None:
        trainer.ema.module.load_state_dict(ema, strict=False)
    set_rng_state(rng)


class QuietStop(Exception):
    """An error rank 0 reports; the other ranks stop without repeating it."""


def save_checkpoint(run, epoch: int) -> str:
    """Every rank writes ``stage_K/`` into the temporary folder; rank 0 renames it once all have succeeded."""
    root, tmp, final = checkpoint_paths(run.out_dir, epoch)
    if run.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    run.ctl.barrier('preparing a checkpoint')
    try:
        save_stage(stage_dir(tmp, run.k), run)
        error = None
    except (OSError, RuntimeError) as e:   # disk full, read-only, quota: torch reports these as RuntimeError
        error = f'stage {run.k + 1}: {reason(e)}'
    errors = [e for e in run.ctl.all_gather(error, 'writing the checkpoint') if e]
    if not errors and run.is_main:
        try:
            state = dict(epoch=epoch, updates=run.updates, history=run.history, identity=run.identity)
            commit_checkpoint(tmp, final, state, run.out_dir, run.cfg.checkpoint_hist)
        except OSError as e:
            errors = [reason(e)]
    errors = run.ctl.broadcast(errors, 'finishing the checkpoint')
    if errors:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f'cannot write checkpoint {final} ({errors[0]}); {run._kept()}: free disk space or fix '
                      f'permissions, then {run._go_on()}')
    return final


def load_checkpoint(run, ckpt: str) -> None:
    run.resume_changes = []
    try:
        load_stage(stage_dir(ckpt, run.k), run)
        error = None
    except CheckpointError as e:   # a file refused by name (state_files): its line as it is
        error = first_line(e)
    except Exception as e:   # anything else a foreign file causes; the identity was already checked
        error = f'{type(e).__name__}: {first_line(e)}'
    errors = [e for e in run.ctl.all_gather(error, 'loading the checkpoint') if e]
    if errors:
        if not run.is_main:
            raise QuietStop(errors[0])
        if errors[0].startswith('--resume: '):
            raise CorruptCheckpointError(errors[0])
        raise unloadable(ckpt, RuntimeError(errors[0]))
    state = read_state(ckpt)
    run.start_epoch, run.updates = int(state['epoch']) + 1, int(state['updates'])
    run.history = list(state['history'])
    run.print(f'resumed from {ckpt} (epoch {state["epoch"] + 1} done){say_changes(run.resume_changes)}')


def finish(run, last: Dict[str, Any], test: Optional[Dict[str, Any]]) -> None:
    """Assemble the model on rank 0 (each tensor from its owner) and save it as a single-process run would."""
    if not run.cfg.save_model:
        run.ctl.barrier('finishing')
        return
    parts = run.ctl.gather(_owned_parts(run), 'collecting the trained stages')
    if not run.is_main:
        run.ctl.barrier('saving the model')
        return
    try:
        models = {'': assemble(run.model, [p[0] for p in parts])}
        if run.ema is not None:
            models['ema_'] = assemble(run.ema.module, [p[1] for p in parts])
        run.save_final(models, last, test)
    finally:
        run.ctl.barrier('saving the model')


def _owned_parts(run):
    ema = owned_state(run.ema.module, run.keys) if run.ema is not None else None
    return owned_state(run.model, run.keys), ema


class StageEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` over the tensors this stage owns (``keys``; set once the stage is known): the rest of
    the copy is never current here, and averaging it would cost as much as the stage's own."""
    keys: List[str] = []

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        ema, live = self.module.state_dict(), model.state_dict()
        for n in self.keys:
            if not ema[n].is_floating_point():
                ema[n].copy_(live[n])
        floats = [n for n in self.keys if ema[n].is_floating_point()]
        self._foreach_lerp_([ema[n] for n in floats], [live[n] for n in floats], weight=1. - decay)


def assemble(module: nn.Module, parts: List[Dict[str, torch.Tensor]]) -> nn.Module:
    """``module`` with every stage's tensors taken from the stage that owns them; all parameters trainable again."""
    for part in parts:
        module.load_state_dict(part, strict=False)
    for p in module.parameters():
        p.requires_grad_(True)
    return module
