"""``schedule: stage_parallel``: one process per stage, all stages training at once, nothing sent backward.

Local learning's promise for systems: stage k never waits for stage k+1's backward. Rank 0 reads the data (the same
loaders, ``BatchTransform`` and mixup as the Accelerate trainer, from the same seeds) and runs stage 1; every rank k
runs stage k+1 on what rank k-1 handed on, its local loss, its backward and its own optimizer step, then hands its
detached output on. Each rank owns its stage's slice of the timm backbone, its prototype head, optimizer, scheduler,
grad scaler / autocast and EMA. A rank works on batch b with the weights it had after batch b-1, and stage k+1
receives stage k's output of batch b computed before stage k's step on b, exactly as ``simultaneous`` (forward all
stages, then step) does: the pipeline changes timing, not values, so on CPU the final weights equal
``simultaneous``'s bit for bit when no stage draws random numbers (dropout, drop-path).

Evaluation runs the same pipeline: each rank scores its own head on the same validation / test batches, the stage
logits travel with the stage output to the last rank, which scores the ensemble and the prediction. Checkpoints hold
one folder per stage (``stage_K``), all written into a temporary folder that rank 0 renames once every rank has
finished, so a dead rank never leaves a half checkpoint. The final model is assembled on rank 0 and saved as any run's.

Composition with data parallelism (several processes per stage) is not supported yet.
"""
import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ...checks import check_device_precision
from ...checkpoint import check_compatible, check_files, find_resume, open_run_folder, read_state
from ...data import build_data, build_loaders
from ...optim import build_optimizer, build_scheduler, stretch_to_min_steps
from ...registry import get_method, get_schedule
from ...run import RunSequence
from ...targets import build_mixup
from .handoff import Control, Inbox, Outbox, PeerLost
from .launch import Group, check_devices, from_environment, join, leave, spawn
from .part import StagePart, TensorSpec
from . import state as stage_state, steps as stage_steps
from .state import StageEma, QuietStop, owned_keys
from .checks import check_settings

__all__ = ['StageParallelTrainer']


class _Solo:
    """What ``build_data`` / ``build_loaders`` read of an Accelerator: rank 0 alone reads the data."""
    process_index, num_processes, is_main_process = 0, 1, True

    def main_process_first(self):
        import contextlib
        return contextlib.nullcontext()


class StageParallelTrainer(RunSequence):
    """One stage of a stage-parallel run (this process's rank); ``fit()`` on every rank trains the whole model. Its
    epoch and evaluation are ``steps``' functions, its checkpoints and final model ``state``'s, each handed this
    trainer (as the Accelerate engine's ``steps.train_steps`` is)."""

    def __init__(self, cfg):
        check_settings(cfg)
        self.cfg, self.out_dir = cfg, cfg.output_dir
        self.method, self.schedule = get_method(cfg.method), get_schedule(cfg.schedule)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.timeout = cfg.stage_parallel_timeout
        self.group: Optional[Group] = from_environment()
        self.lock = None
        try:
            if self.group is not None:
                check_devices(self.group.world, self.group.device)
                join(self.group, self.timeout)
            self.ctl = None
            if self.group is None or self.group.rank == 0:
                self._setup_rank0()
            else:
                self._setup_rank()
        except BaseException as e:
            if self.lock is not None:
                self.lock.release()
            leave(self.group, failed=True)
            if isinstance(e, QuietStop):
                raise SystemExit(2) from None
            raise

    # ----- set-up -----
    def _setup_rank0(self) -> None:
        cfg = self.cfg
        self.lock = open_run_folder(self.out_dir)
        try:
            plan, model = self._build()
        except BaseException as e:
            if self.group is not None:   # the other ranks wait for the plan: tell them to stop quietly
                self._control().broadcast(dict(error=str(e)), 'sending the run plan')
            raise
        if self.group is None:
            self.group = spawn(cfg, plan['num_stages'], self.timeout)
        self._control().broadcast((plan, model), 'sending the run plan and the model')
        self._setup_stage(plan, model)

    def _setup_rank(self) -> None:
        got = self._control().broadcast(None, 'waiting for the run plan and the model')
        if isinstance(got, dict) and 'error' in got:
            raise QuietStop(got['error'])
        self._setup_stage(*got)

    def _control(self) -> Control:
        if self.ctl is None:
            self.ctl = Control(self.group.rank, self.group.world, self.timeout, self.group.ctrl)
        return self.ctl

    def _build(self):
        """Rank 0: data, model and loaders exactly as the Accelerate trainer builds them (same seeds, same order)."""
        from accelerate.utils import set_seed
        cfg, solo = self.cfg, _Solo()
        self.resume_from = find_resume(cfg, self.out_dir)
        set_seed(cfg.seed)
        self.train_data, self.val_data, self.test_data = build_data(cfg, solo)
        self.num_classes = self.train_data.num_classes
        model = self.method.build_model(cfg, self.num_classes, self.train_data.label_names)
        k = self.num_processes = model.num_stages
        if self.resume_from:
            state = read_state(self.resume_from)
            check_compatible(state, self.identity, self.resume_from)
            check_files(self.resume_from, state)
        world = self.group.world if self.group is not None else k
        if world != k or k < 2:
            raise ValueError(_count_error(k, world))
        empty = [s + 1 for s in range(k) if not model.split.stage_param_names[s]]
        if empty:
            raise ValueError(f'stage {empty[0]} of {cfg.model} holds no backbone parameters (the cut '
                             f'{list(model.split.feature_indices)} leaves it empty), so its process would train only a '
                             f'head; move hff.stage_indices so that every stage holds at least one block')
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.profile = self.method.profile(model, cfg.img_size)
        self.data_cfg, self.train_loader, self.val_loader, self.test_loader = build_loaders(
            cfg, model, self.train_data, self.val_data, solo, self.test_data)
        self.train_iterable, self.val_iterable = self.train_loader.loader, self.val_loader.loader
        self.test_iterable = self.test_loader.loader if self.test_loader else None
        evs = cfg.validation_batch_size or cfg.batch_size
        plan = dict(num_stages=k, num_classes=self.num_classes, img_size=tuple(self.data_cfg['input_size'][1:]),
                    train=_sizes(self.train_loader.num_samples, cfg.batch_size, cfg.mixup > 0 or cfg.cutmix > 0),
                    val=_sizes(self.val_loader.num_samples, evs, False),
                    test=_sizes(self.test_loader.num_samples, evs, False) if self.test_loader else None,
                    resume=self.resume_from)
        return plan, model

    def _setup_stage(self, plan: Dict[str, Any], model: nn.Module) -> None:
        """Every rank: own stage ``rank``'s parameters, optimizer, scheduler, EMA; stub the earlier stages."""
        from accelerate.utils import set_seed
        cfg, g = self.cfg, self.group
        self.plan, self.k, self.num_stages = plan, g.rank, plan['num_stages']
        self.num_processes, self.resume_from = self.num_stages, plan['resume']
        self.num_classes, self.device = plan['num_classes'], g.device
        self.last = self.k == self.num_stages - 1
        model = model.to(g.device)
        owned = {id(p) for p in model.stage_parameters(self.k)}
        for p in model.parameters():
            p.requires_grad_(id(p) in owned)
        self.model = model
        check_device_precision(cfg.mixed_precision, g.device)
        self.autocast = _autocast(cfg.mixed_precision, g.device)
        self.ema = None
        if cfg.model_ema:   # before the stubs: the EMA copy gets its own
            self.ema = StageEma(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        self.part = StagePart(model, self.k, plan['img_size'], g.device, self.autocast, cfg.channels_last)
        self.part.install()
        self.keys = owned_keys(model, self.part, self.k)
        if self.ema is not None:
            self.ema.keys = self.keys
            self.ema_part = StagePart(self.ema.module, self.k, plan['img_size'], g.device, self.autocast,
                                      cfg.channels_last)
            self.ema_part.install()
        # over this stage's parameters: the others need no grad
        self.optimizer = build_optimizer(cfg, model, self.method.head_parameter_names(model))
        self.steps_per_epoch = len(plan['train'])
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum_steps)
        self.stretched = stretch_to_min_steps(cfg, self.updates_per_epoch)
        self.total_epochs = self.schedule.total_epochs(cfg.epochs, self.num_stages)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.updates_per_epoch,
                                         *self.schedule.lr_cycles(cfg.epochs, self.num_stages))
        self.scaler = torch.amp.GradScaler(g.device.type) if cfg.mixed_precision == 'fp16' else None
        self.mixup = build_mixup(cfg, self.num_classes) if self.k == 0 else None
        soft = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.smoothing > 0
        label = TensorSpec((self.num_classes,), torch.float32) if soft else TensorSpec((), torch.int64)
        self.specs_in = self._specs(self.k - 1, label) if self.k else None
        self.specs_out = self._specs(self.k, label) if not self.last else None
        kw = dict(depth=cfg.stage_parallel_queue, timeout=self.timeout, device=g.device)
        self.inbox = Inbox(self.k - 1, **kw) if self.k else None
        self.outbox = Outbox(self.k + 1, **kw) if not self.last else None
        set_seed(cfg.seed + self.k)   # as Accelerate's device_specific seed: rank 0 draws the augmentation
        self.start_epoch, self.updates, self.history = 0, 0, []
        if plan['resume']:
            stage_state.load_checkpoint(self, plan['resume'])
        self.lr_at(self.start_epoch, self.updates)

    def _specs(self, stage: int, label: TensorSpec) -> Dict[str, List[TensorSpec]]:
        """What stage ``stage`` hands on: its tap's tensors and the labels (training), plus every stage's logits so
        far (evaluation)."""
        tap = self.part.layouts[stage].specs
        return dict(train=tap + [label], eval=tap + [TensorSpec((), torch.int64)] + self.part.logit_spec[:stage + 1])

    @property
    def is_main(self) -> bool:
        return self.k == 0

    # ----- the engine's side of the run sequence -----
    @property
    def has_test(self) -> bool:
        return self.plan['test'] is not None

    def print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def fit(self) -> Dict[str, Any]:
        try:
            return super().fit()
        except PeerLost as e:
            raise PeerLost(f'{e}; {self._kept()}: {self._go_on()} (every stage process)') from None

    def close(self, failed: bool) -> None:
        if self.lock is not None:
            self.lock.release()
        leave(self.group, failed)

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        return stage_steps.train_epoch(self, epoch)

    def evaluate(self, ema: bool = False, split: str = 'val') -> Dict[str, Any]:
        return stage_steps.evaluate(self, ema, split)

    def evaluate_model(self, prefix: str, split: str) -> Dict[str, Any]:
        return self.evaluate(ema=bool(prefix), split=split)

    def save_checkpoint(self, epoch: int) -> str:
        return stage_state.save_checkpoint(self, epoch)

    def finish(self, last: Dict[str, Any], test: Optional[Dict[str, Any]]) -> None:
        stage_state.finish(self, last, test)

    def training_row(self, stats: Dict[str, Any]) -> Dict[str, Any]:
        return self._train_row(self.ctl.all_gather(stats, 'sharing the epoch\'s training figures'))

    def _train_row(self, stats: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The epoch's training figures of all stages: summed loss, per-stage losses, rank 0's lr, and the pipeline's
        throughput (first batch in on rank 0 to last step done on any rank)."""
        elapsed = max(s['end'] for s in stats) - min(s['start'] for s in stats)
        row = dict(train_loss=sum(s['loss'] for s in stats), lr=stats[0]['lr'], train_time_s=elapsed,
                   train_img_per_s=stats[0]['images'] / max(elapsed, 1e-9))
        for s in stats:
            row[f"train_loss_stage{s['stage']}"] = s['loss']
        return row

    # ----- reporting -----
    def plan_detail(self) -> str:
        return (f': one process per stage on {self.device.type}, hand-off queue {self.cfg.stage_parallel_queue}')

    def plan_processes(self) -> str:
        return ''

    def run_info_extra(self) -> Dict[str, Any]:
        return dict(stage_parallel=dict(processes=self.num_stages, queue=self.cfg.stage_parallel_queue,
                                        device=str(self.device)))


def _sizes(n: int, batch: int, drop_last: bool) -> List[int]:
    """The batch sizes a map-style loader yields over ``n`` images (every rank plans its receives from them)."""
    sizes = [batch] * (n // batch)
    if n % batch and not drop_last:
        sizes.append(n % batch)
    return sizes


def _count_error(stages: int, processes: int) -> str:
    if stages < 2:
        return ("schedule 'stage_parallel' runs one process per stage, and this model has 1 stage; cut it into 2 or "
                "more (hff.num_stages / hff.stage_indices), or use schedule simultaneous")
    cut = f', or cut the model into {processes} stages' if processes >= 2 else ''
    were = 'processes were' if processes != 1 else 'process was'
    return (f"schedule 'stage_parallel' runs one process per stage: this model has {stages} stages but {processes} "
            f"{were} launched; launch {stages} (accelerate launch --multi_gpu --num_processes {stages} / torchrun "
            f"--nproc_per_node {stages}), or start hff-train alone (it starts one process per stage){cut}")


def _autocast(precision: str, device: torch.device):
    import contextlib
    if precision == 'no':
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)
