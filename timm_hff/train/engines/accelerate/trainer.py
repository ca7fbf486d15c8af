"""The Accelerate engine of the run sequence: one process, or data-parallel ones under ``accelerate launch``.

    TrainConfig -> data (datasets + timm transforms) -> the method's model -> timm optimizer / scheduler
      -> accelerator.prepare -> ``RunSequence.fit``: per epoch the method's step under the schedule, evaluation of
      every stage, a checkpoint -> the test split once -> the method's save

Written once for any number of processes (DDP) and for mixed precision ('no' | 'bf16' | 'fp16'). Checkpoints are
``accelerator.save_state`` plus ``trainer_state.json`` (and ``ema.safetensors``), completed by a rename.
"""
import logging
import math
import os
import shutil

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ...checkpoint import (check_compatible, check_files, checkpoint_paths, commit_checkpoint, find_resume,
                         open_run_folder, read_state)
from ...checkpoint import EMA_FILE, unloadable
from ...checks import check_device_precision
from ...data import build_data, build_loaders, steps_per_epoch
from ...errors import os_error, reason
from ...evaluate import accuracy_row, topk_hits
from ...exits import adaptive_point, calibrate, check_calibration_size, describe_point
from ...optim import build_optimizer, build_scheduler, run_settings_kept, say_changes, stretch_to_min_steps
from ...registry import get_method, get_schedule
from ...run import RunSequence
from ...state_files import check_accelerate_state, load_tensors_file
from .steps import train_steps
from ...targets import build_mixup

__all__ = ['Trainer', 'train']

_logger = logging.getLogger(__name__)


class Trainer(RunSequence):
    """Owns one run: call ``fit()``; the result is the last epoch's metrics (validation) plus, with a test split,
    the test evaluation under ``test_*`` keys."""

    def __init__(self, cfg):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        self.cfg, self.out_dir = cfg, cfg.output_dir
        self.method, self.schedule = get_method(cfg.method), get_schedule(cfg.schedule)
        if self.schedule.own_trainer:
            raise ValueError(f"schedule {cfg.schedule!r} runs one process per stage, which this Accelerate trainer "
                             f"does not: use hff-train or timm_hff.train.create_trainer(cfg)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        needs_unused = self.schedule.unused_parameters or cfg.head_warmup_epochs > 0   # parameters with no gradient
        self._ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=needs_unused)
        project = dict(project_dir=self.out_dir) if cfg.log_with else {}
        handlers = [self._ddp_kwargs]
        if cfg.cuda_graphs:   # a weight cast cached by autocast must not outlive a captured region
            from accelerate.utils import AutocastKwargs
            handlers.append(AutocastKwargs(cache_enabled=False))
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=cfg.log_with, kwargs_handlers=handlers, step_scheduler_with_optimizer=False, **project)
        acc = self.accelerator
        check_device_precision(cfg.mixed_precision, acc.device)
        self.num_processes = acc.num_processes
        fewer_processes_warning(acc.num_processes)
        if cfg.cuda_graphs:
            from .. import cuda_graphs
            cuda_graphs.check_device(acc.device, acc.num_processes)
        for reason_ in (self.method.processes_reason, self.schedule.processes_reason):
            if reason_ and acc.num_processes > 1:
                raise ValueError(reason_)
        self.lock = open_run_folder(self.out_dir) if acc.is_main_process else None
        try:
            self._setup(needs_unused)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _setup(self, needs_unused: bool) -> None:
        from accelerate.utils import set_seed
        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()
        self.resume_from = find_resume(cfg, self.out_dir)
        set_seed(cfg.seed)   # the same initial weights on every process (DDP also broadcasts rank 0's)
        self.train_data, self.val_data, self.test_data = build_data(cfg, acc)
        self.num_classes = self.train_data.num_classes
        if self.resume_from:   # refuse another run's or a damaged checkpoint before building anything
            state = read_state(self.resume_from)
            check_compatible(state, self.identity, self.resume_from)
            check_files(self.resume_from, state)
        model = self.method.build_model(cfg, self.num_classes, self.train_data.label_names)
        if self.method.unused_parameters(model) and not needs_unused:
            self._ddp_kwargs.find_unused_parameters = True
        self.num_stages = self.method.num_stages(model)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:   # with schedule memory_efficient: checkpointing inside each stage as well
            model.set_grad_checkpointing(True)
        self.profile = self.method.profile(model, cfg.img_size)
        self._check_channels()
        self.data_cfg, self.train_loader, self.val_loader, self.test_loader = build_loaders(
            cfg, model, self.train_data, self.val_data, acc, self.test_data)
        check_calibration_size(cfg, self.val_loader.num_samples)   # before training, not after it
        self.total_epochs = self.schedule.total_epochs(cfg.epochs, self.num_stages)
        if cfg.calibrate_exits is not None and self.val_loader.sharded and acc.num_processes > 1:
            raise ValueError('calibrate_exits fits thresholds on the whole validation split, which a streamed split '
                             'spreads over the processes; run on one process, or calibrate the saved model afterwards '
                             'with timm_hff.calibrate_exits')
        self.exits = {}
        optimizer = build_optimizer(cfg, model, self.method.head_parameter_names(model), acc.device.type)
        loaders = [self.train_loader, self.val_loader] + ([self.test_loader] if self.test_loader else [])
        prepared = acc.prepare(model, optimizer, *[ld.loader for ld in loaders if not ld.sharded])
        self.model, self.optimizer = prepared[0], prepared[1]
        rest = list(prepared[2:])
        iterables = [ld.loader if ld.sharded else rest.pop(0) for ld in loaders]
        self.train_iterable, self.val_iterable = iterables[0], iterables[1]
        self.test_iterable = iterables[2] if self.test_loader else None
        # batches per process: known only once Accelerate has sharded the loader
        self.steps_per_epoch = steps_per_epoch(self.train_loader, self.train_iterable, cfg, acc.num_processes)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum_steps)
        self.stretched = stretch_to_min_steps(cfg, self.updates_per_epoch,
                                              self.schedule.total_epochs(1, self.num_stages))
        self.total_epochs = self.schedule.total_epochs(cfg.epochs, self.num_stages)
        self.scheduler = build_scheduler(cfg, optimizer, self.updates_per_epoch,
                                         *self.schedule.lr_cycles(cfg.epochs, self.num_stages))
        self.ema = None
        if cfg.model_ema:   # after prepare: a copy of the (broadcast) weights every process shares
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(acc.unwrap_model(self.model), decay=cfg.model_ema_decay,
                                  use_warmup=cfg.model_ema_warmup)
        if cfg.torchcompile:   # after the EMA copy (which stays eager: it only evaluates), in place under DDP
            self.method.compile(acc.unwrap_model(self.model), cfg)
        self.mixup = build_mixup(cfg, self.num_classes)
        self.captured = None   # cuda_graphs: the step as a replayed CUDA graph
        if cfg.cuda_graphs:
            from .. import cuda_graphs
            self.captured = cuda_graphs.CapturedStep(self.optimizer, list(acc.unwrap_model(self.model).parameters()),
                                                     acc.device)
        set_seed(cfg.seed, device_specific=True)   # from here on, each process draws its own augmentation
        self.start_epoch, self.updates, self.history = 0, 0, []
        if self.resume_from:
            self._load(self.resume_from)
        self.lr_at(self.start_epoch, self.updates)

    def _check_channels(self) -> None:
        """Images of another channel count than ``in_chans`` are converted (as PIL's ``convert`` does): say so in one
        line, with the normalisation they get, rather than train on a silent conversion."""
        cfg = self.cfg
        native = self.train_data.native_channels()
        if native is None or native == cfg.in_chans:
            return
        kind = {1: 'grayscale', 3: 'RGB', 4: 'RGBA'}.get(native, f'{native}-channel')
        norm = ('the mean / std you gave' if cfg.mean is not None else "the model's default mean / std, not the "
                "data's: set mean and std")
        _logger.warning(f'{self.train_data.name} has {kind} images but in_chans={cfg.in_chans}: they are converted to '
                        f'{cfg.in_chans} channel(s) and normalised with {norm}; set in_chans: {native} to train on '
                        f'them as they are')

    # ----- the engine's side of the run sequence -----
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def has_test(self) -> bool:
        return self.test_loader is not None

    def print(self, text: str) -> None:
        self.accelerator.print(text)

    def start(self) -> None:
        if self.cfg.log_with:
            from ...config import flat_config
            self.accelerator.init_trackers(self.cfg.run_name, config=flat_config(self.cfg))
        super().start()

    def log(self, row: Dict[str, Any], step: int) -> None:
        if self.cfg.log_with:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self, failed: bool) -> None:
        if self.cfg.log_with:
            self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()

    def evaluate_model(self, prefix: str, split: str) -> Dict[str, Any]:
        module = self.ema.module if prefix else self.accelerator.unwrap_model(self.model)
        return self.evaluate(module, prefix=prefix, split=split)

    # ----- checkpoints -----
    def save_checkpoint(self, epoch: int) -> str:
        acc = self.accelerator
        root, tmp, final = checkpoint_paths(self.out_dir, epoch)
        if acc.is_main_process:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(tmp, safe_serialization=True)
            acc.wait_for_everyone()   # every process's files (its RNG state) are in tmp before it becomes final
            if acc.is_main_process:
                if self.ema is not None:
                    from safetensors.torch import save_file
                    save_file({k: v.contiguous() for k, v in self.ema.module.state_dict().items()},
                              os.path.join(tmp, EMA_FILE))
                state = dict(epoch=epoch, updates=self.updates, history=self.history, identity=self.identity)
                commit_checkpoint(tmp, final, state, self.out_dir, self.cfg.checkpoint_hist)
        except (OSError, RuntimeError) as e:   # disk full, read-only, quota: torch reports these as RuntimeError
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(e, f'cannot write checkpoint {final} ({reason(e)}); {self._kept()}: free disk space '
                              f'or fix permissions, then {self._go_on()}') from None
        acc.wait_for_everyone()
        return final

    def _load(self, ckpt: str) -> None:
        state, changes = read_state(ckpt), []
        check_accelerate_state(ckpt, self.model, self.optimizer.optimizer, self.num_processes)
        try:
            with run_settings_kept(self.optimizer, changes):
                self.accelerator.load_state(ckpt)
        except Exception as e:   # truncated or foreign files, or (before identities named them) other settings
            raise unloadable(ckpt, e) from None
        if self.ema is not None:
            path = os.path.join(ckpt, EMA_FILE)
            if not os.path.isfile(path):
                raise ValueError(f'--resume {ckpt}: model_ema is on but the checkpoint has no {EMA_FILE}')
            self.ema.module.load_state_dict(load_tensors_file(path, self.ema.module.state_dict()))
        self.start_epoch = int(state['epoch']) + 1
        self.updates = int(state['updates'])
        self.history = list(state['history'])
        self.accelerator.print(f'resumed from {ckpt} (epoch {state["epoch"] + 1} done){say_changes(changes)}')

    # ----- one epoch -----
    def _sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's norm statistics everywhere (DDP broadcasts them at each forward; do it before eval / save)."""
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist
            for b in module.buffers():
                dist.broadcast(b.data, src=0)

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        return train_steps(self, epoch)

    def _check_finite(self, first_bad: torch.Tensor, bad_value: torch.Tensor, trained, epoch: int) -> None:
        """Stop at the first NaN / inf stage loss of any process, naming the stage and the step; nothing is saved,
        so the last checkpoint on disk stays the last good one. Every process calls this at the same steps."""
        acc = self.accelerator
        n = len(trained)
        if acc.num_processes > 1:
            first_bad = acc.gather(first_bad).view(acc.num_processes, n)
            bad_value = acc.gather(bad_value).view(acc.num_processes, n)
        else:
            first_bad, bad_value = first_bad.view(1, n), bad_value.view(1, n)
        bad = first_bad >= 0
        if not bool(bad.any()):
            return
        earliest = torch.where(bad, first_bad, torch.iinfo(torch.long).max).flatten().argmin().item()
        rank, j = divmod(int(earliest), n)
        what = f'stage {trained[j]} loss' if self.method.per_stage else 'loss'
        on = f' on process {rank}' if acc.num_processes > 1 else ''
        raise FloatingPointError(
            f'{what} is {bad_value[rank, j].item()} at epoch {epoch + 1}, step {int(first_bad[rank, j]) + 1} of '
            f'{self.steps_per_epoch}{on}; training stopped without saving and {self._kept()}: lower lr, set '
            f'clip_grad or check the data, then {self._go_on()}')

    @torch.no_grad()
    def evaluate(self, module: nn.Module, prefix: str = '', split: str = 'val') -> Dict[str, Any]:
        """Top-1 / top-5 of every stage and of the model's prediction over the whole split ('val' or 'test'), each
        image once."""
        acc = self.accelerator
        loader, iterable = ((self.val_loader, self.val_iterable) if split == 'val'
                            else (self.test_loader, self.test_iterable))
        self._sync_buffers(module)
        module.eval()
        k = min(5, self.num_classes)
        n_heads = self.num_stages + 2 if self.method.per_stage else 1
        correct1 = torch.zeros(n_heads, dtype=torch.long, device=acc.device)
        correct5 = torch.zeros(n_heads, dtype=torch.long, device=acc.device)
        total = torch.zeros((), dtype=torch.long, device=acc.device)
        gather = not loader.sharded   # map-style: gather_for_metrics drops the padding of the last batch
        for x, y in iterable:
            x, y = loader.transform(x.to(acc.device)), y.to(acc.device)
            with acc.autocast():
                heads = self.method.heads(module, x)
            c1, c5 = topk_hits(heads, y, k)
            if gather:
                c1, c5 = acc.gather_for_metrics((c1, c5))
            correct1 += c1.sum(0)
            correct5 += c5.sum(0)
            total += c1.shape[0]
        if not gather:
            correct1, correct5, total = (acc.reduce(t, reduction='sum') for t in (correct1, correct5, total))
        return accuracy_row(correct1, correct5, int(total), self.num_stages, self.num_classes,
                            hff=self.method.per_stage, prefix=prefix, images_key=f'{split}_images')

    # ----- the end of the run -----
    def calibrate_exits(self) -> None:
        """``calibrate_exits``: fit the exit thresholds of the live model (and the EMA) on the validation split;
        they are saved with the model, and the operating point goes to metrics.json's ``run``."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.calibrate_exits is None or not self.method.exits:
            return
        for prefix, module in self._models():
            self._sync_buffers(module)
            with acc.autocast():
                self.exits[prefix] = calibrate(module, self._batches('val'), cfg.calibrate_exits, self._gather('val'),
                                               cfg.exit_confidence)
            self.say(f'validation ({self.val_data.split}){" EMA" if prefix else ""}: {self.exits[prefix].describe()}')
        if acc.is_main_process:
            from ...metrics import write_metrics
            write_metrics(self.out_dir, self.history, run=self.run_info())

    def test_exits(self, test: Dict[str, Any]) -> List[str]:
        models = dict(self._models())
        for prefix in self.exits:
            with self.accelerator.autocast():
                test.update(adaptive_point(models[prefix], self._batches('test'), self._gather('test'),
                                           prefix=prefix))
        return [f'test ({self.test_data.split}){" EMA" if p else ""}: {describe_point(test, p)}' for p in self.exits]

    def _models(self):
        """(prefix, module): the live model and the EMA."""
        live = [('', self.accelerator.unwrap_model(self.model))]
        return live + ([('ema_', self.ema.module)] if self.ema is not None else [])

    def _batches(self, split: str):
        """The split's batches, transformed for the model, on the device."""
        loader, iterable = ((self.val_loader, self.val_iterable) if split == 'val'
                            else (self.test_loader, self.test_iterable))
        device = self.accelerator.device
        for x, y in iterable:
            yield loader.transform(x.to(device)), y.to(device)

    def _gather(self, split: str):
        loader = self.val_loader if split == 'val' else self.test_loader
        return None if loader.sharded else self.accelerator.gather_for_metrics

    def finish(self, last: Dict[str, Any], test: Optional[Dict[str, Any]]) -> None:
        acc = self.accelerator
        self._sync_buffers(acc.unwrap_model(self.model))
        if self.cfg.save_model and acc.is_main_process:
            self.save_final(dict(self._models()), last, test)
        acc.wait_for_everyone()


def launcher_cmdline() -> List[str]:
    """The command line of the process that started this one (``accelerate launch ...``), or []."""
    try:
        import psutil
        return psutil.Process(os.getppid()).cmdline()
    except Exception:   # no psutil, no parent, no permission: nothing to check against
        return []


def fewer_processes_warning(num_processes: int) -> Optional[str]:
    """Warn (and return the line) when ``accelerate launch --num_processes N`` started fewer processes than N:
    with ``--cpu`` it starts one unless MPI is set up, and the run would otherwise look data-parallel."""
    cmd = launcher_cmdline()
    if 'launch' not in cmd or not any('accelerate' in part for part in cmd[:3]):
        return None
    asked = None
    for i, part in enumerate(cmd):
        for flag in ('--num_processes', '--num-processes'):
            if part == flag and i + 1 < len(cmd):
                asked = cmd[i + 1]
            elif part.startswith(flag + '='):
                asked = part.split('=', 1)[1]
    if asked is None or not asked.isdigit() or int(asked) <= num_processes:
        return None
    line = (f'accelerate launch asked for {asked} processes but {num_processes} started (with --cpu it starts one '
            f'unless MPI is set up): this run trains on {num_processes}; for CPU data parallelism use '
            f'ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {asked} ...')
    _logger.warning(line)
    return line


def train(cfg) -> Dict[str, Any]:
    """Run a whole training; returns the last epoch's metrics."""
    from ...registry import get_schedule as _schedule
    return _schedule(cfg.schedule).create_trainer(cfg).fit()
