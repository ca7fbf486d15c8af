"""The two pipelines of a stage-parallel run, as seen by one stage process: a training epoch and an evaluation.

Training, for each batch: take the images (rank 0: the loader, ``BatchTransform``, mixup) or the previous stage's
output and the labels (other ranks), run this stage, hand its detached output and the labels on, then the local loss,
backward and optimizer step. The hand-off goes out before the backward, so the next stage starts while this one
finishes the batch. Evaluation hands on the stage output, the labels and every stage's logits so far; the last rank
scores all heads and sends the row to everyone.
"""
import time
from typing import Any, Dict, List, Optional

import torch

from ....heads import log_probs_mean
from ...evaluate import accuracy_row, topk_hits
from ..accelerate.steps import FINITE_CHECK_EVERY, on_terminal, take
from ...targets import make_targets
from .part import flatten

__all__ = ['evaluate', 'stage_inputs', 'train_epoch']


def stage_inputs(run, phase: str, sizes: List[int], what: str, source=None):
    """(stage input, rest of the message) per batch: images from ``source`` on rank 0, else from the inbox."""
    if run.k == 0:
        for x, y in source:
            yield x, [y]
        return
    layout = run.part.input_layout
    n = len(layout.specs)
    for msg in run.inbox.stream(run.specs_in[phase], sizes, what):
        yield layout.build(msg[:n]), msg[n:]


def train_epoch(run, epoch: int) -> Dict[str, Any]:
    cfg, model = run.cfg, run.model
    model.train()
    run.method.train_mode(model, cfg, epoch)
    sizes = run.plan['train']
    what = f'epoch {epoch + 1} training'
    source = None
    if run.k == 0:
        run.train_iterable.sampler.set_epoch(epoch)   # the order of epoch e: (seed, e) only
        source = _train_batches(run)
    flags = torch.zeros(len(sizes), dtype=torch.bool, device=run.device)
    losses = torch.zeros(len(sizes), device=run.device)
    bar = _bar(run, f'epoch {epoch + 1}/{run.total_epochs}')
    start = time.time()
    head = model.heads[run.k]
    for step, (inp, rest) in enumerate(stage_inputs(run, 'train', sizes, what, source)):
        target, batch = rest[0], sizes[step]
        h, handed = run.part.run(inp, batch)
        if run.outbox is not None:
            run.outbox.send(run.specs_out['train'], flatten(handed) + [target], batch,
                             f'receiving {what}, step {step + 1}')
        with run.autocast():   # the head's fused loss, as the one-process schedules use: the same bits
            loss, _ = head.forward_loss(h, target)
        _backward(run, loss / cfg.grad_accum_steps)
        if (step + 1) % cfg.grad_accum_steps == 0 or step + 1 == len(sizes):
            _step(run, epoch)
        losses[step] = loss.detach().float()
        flags[step] = ~torch.isfinite(losses[step])
        if (step + 1) % FINITE_CHECK_EVERY == 0 or step + 1 == len(sizes):
            _check_finite(run, flags[:step + 1], losses, epoch)
        if bar is not None:
            bar.update(1)
    if run.outbox is not None:
        run.outbox.flush()
    end = time.time()
    if bar is not None:
        bar.close()
    return dict(stage=run.k, loss=losses.sum().item() / max(len(sizes), 1), start=start, end=end,
                images=sum(sizes), lr=run.optimizer.param_groups[0]['lr'])


def _train_batches(run):
    device = run.device
    transform = run.train_loader.transform
    for x, y in take(run.train_iterable, len(run.plan['train'])):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield make_targets(transform(x), y, run.mixup, run.cfg.smoothing, run.num_classes)


def _backward(run, loss: torch.Tensor) -> None:
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()


def _step(run, epoch: int) -> None:
    """One update of this stage: clip, step, zero the gradients, the schedule and the EMA (as Accelerate's
    ``accumulate`` + ``step`` do for the single-process schedules)."""
    cfg = run.cfg
    if cfg.clip_grad:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        params = [p for p in run.model.stage_parameters(run.k) if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.updates += 1
    run.lr_at(epoch, run.updates)
    if run.ema is not None:
        run.ema.update(run.model, step=run.updates)


def _check_finite(run, flags: torch.Tensor, losses: torch.Tensor, epoch: int) -> None:
    if not bool(flags.any()):
        return
    step = int(flags.nonzero()[0])
    raise FloatingPointError(
        f'stage {run.k} loss is {losses[step].item()} at epoch {epoch + 1}, step {step + 1} of '
        f'{len(run.plan["train"])} on stage-parallel rank {run.k}; training stopped without saving and '
        f'{run._kept()}: lower lr, set clip_grad or check the data, then {run._go_on()}')


def _bar(run, desc: str):
    if not (run.cfg.progress and run.k == 0 and on_terminal()):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=len(run.plan['train']), desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(run, ema: bool = False, split: str = 'val') -> Dict[str, Any]:
    """Top-1 / top-5 of every stage, the ensemble and the prediction on ``split`` (the same row on every rank)."""
    module, part = (run.ema.module, run.ema_part) if ema else (run.model, run.part)
    module.eval()
    sizes = run.plan[split]
    what = f'{"EMA " if ema else ""}evaluation on {split}'
    source = _eval_batches(run, split) if run.k == 0 else None
    hits1: Optional[torch.Tensor] = None
    hits5: Optional[torch.Tensor] = None
    total = 0
    topk = min(5, run.num_classes)
    for i, (inp, rest) in enumerate(stage_inputs(run, 'eval', sizes, what, source)):
        y, logits = rest[0], list(rest[1:])
        h, handed = part.run(inp, sizes[i])
        with run.autocast():
            logits.append(module.heads[run.k](h))
        if run.outbox is not None:
            run.outbox.send(run.specs_out['eval'], flatten(handed) + [y] + logits, sizes[i],
                             f'receiving {what}, batch {i + 1}')
            continue
        heads = logits + [log_probs_mean(logits), module.predict_from_stages(logits)]
        c1, c5 = topk_hits(heads, y, topk)
        hits1 = c1.sum(0) if hits1 is None else hits1 + c1.sum(0)
        hits5 = c5.sum(0) if hits5 is None else hits5 + c5.sum(0)
        total += c1.shape[0]
    if run.outbox is not None:
        run.outbox.flush()
    row = None
    if run.last:
        row = accuracy_row(hits1.cpu(), hits5.cpu(), total, run.num_stages, run.num_classes, hff=True,
                           prefix='ema_' if ema else '', images_key=f'{split}_images')
    return run.ctl.broadcast(row, f'sharing the {what} result', src=run.num_stages - 1)


def _eval_batches(run, split: str):
    loader, iterable = ((run.val_loader, run.val_iterable) if split == 'val'
                        else (run.test_loader, run.test_iterable))
    for x, y in iterable:
        yield loader.transform(x.to(run.device)), y.to(run.device)
