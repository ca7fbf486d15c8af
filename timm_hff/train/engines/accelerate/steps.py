"""One training epoch of the Accelerate engine: the schedule's freezing, the method's step per batch, the NaN / inf
watch, the progress bar, and the epoch's training figures."""
import time
from typing import Any, Dict

import torch

__all__ = ['FINITE_CHECK_EVERY', 'on_terminal', 'take', 'train_steps']

# Stage losses are checked for NaN / inf at every step on the device; the host reads the verdict (one sync, and
# one gather under DDP, so that every process stops together) every this many steps and at the end of an epoch.
FINITE_CHECK_EVERY = 16


def train_steps(run, epoch: int) -> Dict[str, Any]:
    """``run``: a ``trainer.Trainer``. Returns the epoch's training row (loss, lr, time, per-stage losses)."""
    cfg, acc, method = run.cfg, run.accelerator, run.method
    model, unwrapped = run.model, acc.unwrap_model(run.model)
    stage = run.schedule.active_stage(epoch, cfg.epochs, run.num_stages)
    run.schedule.before_epoch(unwrapped, epoch, cfg.epochs, run.num_stages)
    if cfg.head_warmup_epochs:
        method.set_trainable(unwrapped, cfg, epoch)
    model.train()
    method.train_mode(unwrapped, cfg, epoch)
    if run.train_loader.kind == 'stream':
        run.train_loader.loader.dataset.set_epoch(epoch)
    else:
        run.train_iterable.set_epoch(epoch)
    transform = run.train_loader.transform
    clip_groups = method.clip_groups(unwrapped, run.num_stages)
    trained = ([stage] if stage is not None else [k for k in range(run.num_stages)
                                                   if k not in getattr(unwrapped, 'frozen_stages', [])])
    from tqdm.auto import tqdm
    bar = tqdm(total=run.steps_per_epoch, desc=f'epoch {epoch + 1}/{run.total_epochs}', leave=False,
               disable=not (cfg.progress and acc.is_local_main_process and on_terminal()), dynamic_ncols=True)
    loss_sum = torch.zeros((), device=acc.device)
    stage_sum = torch.zeros(run.num_stages, device=acc.device)
    first_bad = torch.full((len(trained),), -1, dtype=torch.long, device=acc.device)   # step of a NaN / inf
    bad_value = torch.zeros(len(trained), device=acc.device)
    seen, steps, start, last_print = 0, 0, time.time(), time.time()
    batches = take(run.train_iterable, run.steps_per_epoch, restart=run.train_loader.kind == 'stream')
    captured = getattr(run, 'captured', None)   # cuda_graphs
    counts = dict(captured.counts) if captured is not None else None
    batch_step = _batch_step(run, unwrapped, stage, clip_groups, captured)
    for step, (x, y) in enumerate(batches):
        x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
        x, target = _targets(run, transform(x), y)
        loss, stage_losses = batch_step(x, target)
        if acc.sync_gradients:
            run.updates += 1
            run.lr_at(epoch, run.updates)
            if run.ema is not None:
                run.ema.update(unwrapped, step=run.updates)
        step_losses = torch.stack([s.float() for s in stage_losses])
        newly_bad = ~torch.isfinite(step_losses) & (first_bad < 0)   # no host sync: flags stay on the device
        first_bad = torch.where(newly_bad, step, first_bad)
        bad_value = torch.where(newly_bad, step_losses, bad_value)
        if (step + 1) % FINITE_CHECK_EVERY == 0:
            run._check_finite(first_bad, bad_value, trained, epoch)
        loss_sum += loss.detach().float()
        stage_sum[trained] += step_losses
        seen += x.shape[0]
        steps += 1
        bar.update(1)
        if bar.disable is False and (time.time() - last_print > 1.0 or step + 1 == run.steps_per_epoch):
            last_print = time.time()
            bar.set_postfix(loss=f'{loss_sum.item() / (step + 1):.4f}',
                            img_s=f'{seen * acc.num_processes / (time.time() - start):.0f}',
                            lr=f"{run.optimizer.param_groups[0]['lr']:.3g}")
    bar.close()
    run._check_finite(first_bad, bad_value, trained, epoch)
    steps = max(steps, 1)
    elapsed = time.time() - start
    totals = acc.reduce(torch.cat([loss_sum.view(1), stage_sum]), reduction='mean') / steps
    row = dict(train_loss=totals[0].item(), lr=run.optimizer.param_groups[0]['lr'],
               train_time_s=elapsed, train_img_per_s=seen * acc.num_processes / max(elapsed, 1e-9))
    if method.per_stage:
        for k in trained:
            row[f'train_loss_stage{k}'] = totals[1 + k].item()
    if stage is not None:
        row['active_stage'] = stage
    if captured is not None:   # this epoch's steps by how they ran: did the graph replay?
        row.update({f'cuda_graph_{k}': captured.counts[k] - counts[k] for k in counts})
    return row


def _batch_step(run, unwrapped, stage, clip_groups, captured):
    """One batch's step, ``(x, target) -> (loss, stage losses)``: eager under ``accelerator.accumulate``, or with
    ``cuda_graphs`` one replay of the captured whole step (one process, no accumulation: the refusals)."""
    cfg, acc, method, model = run.cfg, run.accelerator, run.method, run.model

    def whole_step(x, target):   # what cuda_graphs captures: forward, backward, clipping, optimizer step
        out = method.step(acc, model, unwrapped, x, target, stage, run.schedule.forward_mode)
        if acc.sync_gradients and cfg.clip_grad:
            acc.unscale_gradients()
            for params in clip_groups:   # each stage's own gradient norm: their losses are separate
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.clip_grad)
        run.optimizer.step()
        return out

    if captured is not None:
        # what the captured step does depends on the epoch's trained stage, trainable parameters, train / eval modes
        key = (stage, tuple(p.requires_grad for p in unwrapped.parameters()),
               tuple(m.training for m in unwrapped.modules()))
        return lambda x, target: captured(whole_step, (x, target), key)

    def eager(x, target):
        with acc.accumulate(model):
            out = whole_step(x, target)
            run.optimizer.zero_grad(set_to_none=True)
        return out
    return eager


def on_terminal() -> bool:
    """A progress bar is for a person watching: none in a redirected log (it would fill it with bar redraws)."""
    import sys
    return sys.stderr.isatty()


def _targets(run, x, y):
    from ...targets import make_targets
    return make_targets(x, y, run.mixup, run.cfg.smoothing, run.num_classes)


def take(iterable, n: int, restart: bool = False):
    """The first n batches; a stream that runs dry restarts, so every process does exactly n steps (DDP)."""
    done = 0
    while done < n:
        produced = False
        for batch in iterable:
            produced = True
            yield batch
            done += 1
            if done >= n:
                return
        if not restart or not produced:
            return
