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

__all__ = ['StageSteps']


class StageSteps:
    """Mixin of ``StageParallelTrainer``: ``train_epoch`` and ``evaluate`` for this process's stage."""

    def _inputs(self, phase: str, sizes: List[int], what: str, source=None):
        """(stage input, rest of the message) per batch: images from ``source`` on rank 0, else from the inbox."""
        if self.k == 0:
            for x, y in source:
                yield x, [y]
            return
        layout = self.part.input_layout
        n = len(layout.specs)
        for msg in self.inbox.stream(self.specs_in[phase], sizes, what):
            yield layout.build(msg[:n]), msg[n:]

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.train()
        self.method.train_mode(model, cfg, epoch)
        sizes = self.plan['train']
        what = f'epoch {epoch + 1} training'
        source = None
        if self.k == 0:
            self.train_iterable.sampler.set_epoch(epoch)   # the order of epoch e: (seed, e) only
            source = self._train_batches()
        flags = torch.zeros(len(sizes), dtype=torch.bool, device=self.device)
        losses = torch.zeros(len(sizes), device=self.device)
        bar = self._bar(f'epoch {epoch + 1}/{self.total_epochs}')
        start = time.time()
        head = model.heads[self.k]
        for step, (inp, rest) in enumerate(self._inputs('train', sizes, what, source)):
            target, batch = rest[0], sizes[step]
            h, handed = self.part.run(inp, batch)
            if self.outbox is not None:
                self.outbox.send(self.specs_out['train'], flatten(handed) + [target], batch,
                                 f'receiving {what}, step {step + 1}')
            with self.autocast():   # the head's fused loss, as the one-process schedules use: the same bits
                loss, _ = head.forward_loss(h, target)
            self._backward(loss / cfg.grad_accum_steps)
            if (step + 1) % cfg.grad_accum_steps == 0 or step + 1 == len(sizes):
                self._step(epoch)
            losses[step] = loss.detach().float()
            flags[step] = ~torch.isfinite(losses[step])
            if (step + 1) % FINITE_CHECK_EVERY == 0 or step + 1 == len(sizes):
                self._check_finite(flags[:step + 1], losses, epoch)
            if bar is not None:
                bar.update(1)
        if self.outbox is not None:
            self.outbox.flush()
        end = time.time()
        if bar is not None:
            bar.close()
        return dict(stage=self.k, loss=losses.sum().item() / max(len(sizes), 1), start=start, end=end,
                    images=sum(sizes), lr=self.optimizer.param_groups[0]['lr'])

    def _train_batches(self):
        device = self.device
        transform = self.train_loader.transform
        for x, y in take(self.train_iterable, len(self.plan['train'])):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield make_targets(transform(x), y, self.mixup, self.cfg.smoothing, self.num_classes)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _step(self, epoch: int) -> None:
        """One update of this stage: clip, step, zero the gradients, the schedule and the EMA (as Accelerate's
        ``accumulate`` + ``step`` do for the single-process schedules)."""
        cfg = self.cfg
        if cfg.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.stage_parameters(self.k) if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.lr_at(epoch, self.updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)

    def _check_finite(self, flags: torch.Tensor, losses: torch.Tensor, epoch: int) -> None:
        if not bool(flags.any()):
            return
        step = int(flags.nonzero()[0])
        raise FloatingPointError(
            f'stage {self.k} loss is {losses[step].item()} at epoch {epoch + 1}, step {step + 1} of '
            f'{len(self.plan["train"])} on stage-parallel rank {self.k}; training stopped without saving and '
            f'{self._kept()}: lower lr, set clip_grad or check the data, then {self._go_on()}')

    def _bar(self, desc: str):
        if not (self.cfg.progress and self.k == 0 and on_terminal()):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=len(self.plan['train']), desc=desc, leave=False, dynamic_ncols=True)

    @torch.no_grad()
    def evaluate(self, ema: bool = False, split: str = 'val') -> Dict[str, Any]:
        """Top-1 / top-5 of every stage, the ensemble and the prediction on ``split`` (the same row on every rank)."""
        module, part = (self.ema.module, self.ema_part) if ema else (self.model, self.part)
        module.eval()
        sizes = self.plan[split]
        what = f'{"EMA " if ema else ""}evaluation on {split}'
        source = self._eval_batches(split) if self.k == 0 else None
        hits1: Optional[torch.Tensor] = None
        hits5: Optional[torch.Tensor] = None
        total = 0
        topk = min(5, self.num_classes)
        for i, (inp, rest) in enumerate(self._inputs('eval', sizes, what, source)):
            y, logits = rest[0], list(rest[1:])
            h, handed = part.run(inp, sizes[i])
            with self.autocast():
                logits.append(module.heads[self.k](h))
            if self.outbox is not None:
                self.outbox.send(self.specs_out['eval'], flatten(handed) + [y] + logits, sizes[i],
                                 f'receiving {what}, batch {i + 1}')
                continue
            heads = logits + [log_probs_mean(logits), module.predict_from_stages(logits)]
            c1, c5 = topk_hits(heads, y, topk)
            hits1 = c1.sum(0) if hits1 is None else hits1 + c1.sum(0)
            hits5 = c5.sum(0) if hits5 is None else hits5 + c5.sum(0)
            total += c1.shape[0]
        if self.outbox is not None:
            self.outbox.flush()
        row = None
        if self.last:
            row = accuracy_row(hits1.cpu(), hits5.cpu(), total, self.num_stages, self.num_classes, hff=True,
                               prefix='ema_' if ema else '', images_key=f'{split}_images')
        return self.ctl.broadcast(row, f'sharing the {what} result', src=self.num_stages - 1)

    def _eval_batches(self, split: str):
        loader, iterable = ((self.val_loader, self.val_iterable) if split == 'val'
                            else (self.test_loader, self.test_iterable))
        for x, y in iterable:
            yield loader.transform(x.to(self.device)), y.to(self.device)
