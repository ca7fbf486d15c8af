"""The run sequence, written once: whatever the method (hff, bp, ff), the schedule or the engine, a run is

    set-up (the engine) -> for each epoch: train, validate (every ``val_every``), lr step, metrics, checkpoint
      -> adaptive exits fitted on validation (``calibrate_exits``) -> the test split, once -> the final model(s)

Two engines fill it in (``engines/``): ``accelerate.Trainer`` (HF Accelerate, one process or data-parallel ones) and
``stage_parallel.StageParallelTrainer`` (one process per stage). An engine sets up the attributes listed in
``RunSequence`` and implements its step, its evaluation, its checkpoints and how it hands over the final model; the
method and the schedule objects (``registry``) supply everything that differs between methods and schedules.
"""
import logging
import os
import time
from typing import Any, Dict, List, Optional

from ..core import atomic_write_text
from .checkpoint import list_checkpoints, run_identity
from .metrics import final_metrics, summary_line, write_metrics

__all__ = ['RunSequence']


class RunSequence:
    """The order of a run and what every engine shares; ``fit()`` runs it and returns the last epoch's metrics (on
    validation) plus, with a test split, the test evaluation under ``test_*`` keys.

    Set by the engine's set-up: ``cfg``, ``out_dir``, ``method``, ``schedule``, ``num_stages``, ``num_classes``,
    ``num_processes``, ``total_epochs``, ``start_epoch``, ``updates``, ``history``, ``resume_from``, ``scheduler``,
    ``ema``, ``profile`` and, on the main process, ``train_data`` / ``val_data`` / ``test_data``, their loaders
    (``train_loader``, ...), ``data_cfg`` and ``steps_per_epoch``.
    """
    exits: Dict[str, Any] = {}   # '' / 'ema_' -> the fitted ExitCalibration (calibrate_exits)
    _log = None                  # the run folder's train.log (main process), open from start() to the end
    _log_handler = None

    # ----- what an engine implements -----
    @property
    def is_main(self) -> bool:
        raise NotImplementedError

    @property
    def has_test(self) -> bool:
        raise NotImplementedError

    def print(self, text: str) -> None:
        raise NotImplementedError

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        raise NotImplementedError

    def training_row(self, stats: Dict[str, Any]) -> Dict[str, Any]:
        """The epoch's training figures from what ``train_epoch`` returned (after validation and the lr step)."""
        return stats

    def evaluate_model(self, prefix: str, split: str) -> Dict[str, Any]:
        """The live model's (``''``) or the EMA's (``'ema_'``) metrics on ``split``, the same row on every process."""
        raise NotImplementedError

    def save_checkpoint(self, epoch: int) -> str:
        raise NotImplementedError

    def finish(self, last: Dict[str, Any], test: Optional[Dict[str, Any]]) -> None:
        """Hand the final model(s) to ``save_final`` (the main process), with what the engine must do around it."""
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        """Release the run folder (and the engine's processes or trackers)."""

    def log(self, row: Dict[str, Any], step: int) -> None:
        """Extra trackers (Accelerate's ``log_with``)."""

    def calibrate_exits(self) -> None:
        """``calibrate_exits``: fit the exits on validation (engines that support it)."""

    def test_exits(self, test: Dict[str, Any]) -> List[str]:
        """Score fitted exits on the test split into ``test``; returns the lines to print."""
        return []

    def plan_detail(self) -> str:
        return ''

    def plan_processes(self) -> str:
        return f' on {self.num_processes} process(es)'

    def run_info_extra(self) -> Dict[str, Any]:
        return {}

    # ----- written once -----
    def fit(self) -> Dict[str, Any]:
        cfg, failed = self.cfg, True
        try:
            self.start()
            if self.resume_from and self.start_epoch >= self.total_epochs:
                done = self.finished()
                self.say(f'nothing left to train: {self.resume_from} completed all {self.total_epochs} epochs; to '
                           f'train longer, resume with --epochs N (N > {cfg.epochs})'
                           + ('' if done else '; finishing the run (test split, saved model)'))
                if done:
                    failed = False
                    return dict(self.history[-1]) if self.history else {}
            for epoch in range(self.start_epoch, self.total_epochs):
                self.run_epoch(epoch)
            last = dict(self.history[-1]) if self.history else {}
            self.calibrate_exits()
            test = self.evaluate_test()
            self.finish(last, test)
            failed = False
            return {**last, **{k if k.startswith('test_') else f'test_{k}': v for k, v in (test or {}).items()}}
        finally:
            self._close_log()
            self.close(failed)

    def start(self) -> None:
        if self.is_main:
            self._open_log()
            atomic_write_text(os.path.join(self.out_dir, 'config.yaml'), config_yaml(self.cfg))
            self.print_plan()

    def say(self, text: str) -> None:
        """Print on the main process, and keep it in the run folder's ``train.log``."""
        self.print(text)
        if self._log is not None:
            self._log.write(text + '\n')
            self._log.flush()

    def _open_log(self) -> None:
        """``train.log`` in the run folder: what the run prints and the warnings it logs (appended on resume)."""
        self._log = open(os.path.join(self.out_dir, 'train.log'), 'a', encoding='utf-8')
        self._log_handler = logging.StreamHandler(self._log)
        self._log_handler.setLevel(logging.WARNING)
        self._log_handler.setFormatter(logging.Formatter('%(levelname)s %(name)s: %(message)s'))
        logging.getLogger().addHandler(self._log_handler)

    def _close_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def run_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        row = dict(epoch=epoch + 1)
        stats = self.train_epoch(epoch)
        t = time.time()
        validated: Dict[str, Any] = {}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == self.total_epochs:
            validated.update(self.evaluate_model('', 'val'))
            if self.ema is not None:
                validated.update(self.evaluate_model('ema_', 'val'))
            validated['eval_time_s'] = time.time() - t
        self.lr_at(epoch + 1, self.updates)
        row.update(self.training_row(stats))
        row.update(validated)
        self.history.append(row)
        if self.is_main:
            write_metrics(self.out_dir, self.history, run=self.run_info())
            self.say(summary_line(row, self.num_stages, self.method.per_stage, self.val_data.split) if validated
                       else f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, {row['train_img_per_s']:.0f} img/s")
        self.log(row, epoch + 1)
        self.save_checkpoint(epoch)

    def evaluate_test(self) -> Optional[Dict[str, Any]]:
        """The test split, once, after the last epoch: the live model and the EMA (None without test_split); with
        fitted exits, also their adaptive operating point."""
        if not self.has_test:
            return None
        t = time.time()
        test = self.evaluate_model('', 'test')
        if self.ema is not None:
            test.update(self.evaluate_model('ema_', 'test'))
        lines = self.test_exits(test)
        test['eval_time_s'] = time.time() - t
        if self.is_main:
            write_metrics(self.out_dir, self.history, run=self.run_info(), test=test)
            self.say(summary_line(dict(test, epoch='test'), self.num_stages, self.method.per_stage,
                                    self.test_data.split))
            for line in lines:
                self.say(line)
        return test

    def finished(self) -> bool:
        """The run's end already happened: the final model was saved (and the test split evaluated, if any)."""
        import json
        if self.cfg.save_model and not os.path.isfile(os.path.join(self.out_dir, 'model', 'config.json')):
            return False
        if not self.has_test:
            return True
        try:
            with open(os.path.join(self.out_dir, 'metrics.json')) as f:
                return bool(json.load(f).get('test'))
        except (OSError, ValueError, AttributeError):
            return False

    def save_final(self, models: Dict[str, Any], last: Dict[str, Any], test: Optional[Dict[str, Any]]) -> None:
        """The method's save of the live model into ``model/`` and of the EMA (``'ema_'``) into ``model_ema/``, each
        with its own figures (validation, and test when there is one) and the exits fitted on it."""
        cfg = self.cfg
        splits = dict(split=self.test_data.split if test is not None else self.val_data.split,
                      val_split=self.val_data.split)
        saved = self.method.save(models[''], os.path.join(self.out_dir, 'model'), cfg, self.train_data,
                                 {**final_metrics(last, test), **self._exit_metrics('', test), **splits}, self.data_cfg)
        if saved and models.get('ema_') is not None:
            self.method.save(models['ema_'], os.path.join(self.out_dir, 'model_ema'), cfg, self.train_data,
                             {**final_metrics(last, test, ema=True), **self._exit_metrics('ema_', test), **splits},
                             self.data_cfg)
        self.say(f'weights: {saved}' if saved else 'weights: not saved (see the warning above)')

    def _exit_metrics(self, prefix: str, test: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The validation operating point of a model's fitted exits, named as ``final_metrics`` names validation
        figures (``val_*`` beside a test split, plain without one); the test point is in ``test`` already."""
        cal = self.exits.get(prefix)
        return cal.metrics('val_adaptive_' if test is not None else 'adaptive_') if cal is not None else {}

    # ----- shared helpers -----
    @property
    def identity(self) -> Dict[str, Any]:
        """What a checkpoint must match to be resumed by this run."""
        return run_identity(self.cfg, self.num_classes, self.num_processes, self.method.identity(self.cfg))

    def lr_at(self, epoch: int, updates: int) -> None:
        if self.scheduler is None:
            return
        if self.cfg.sched_on_updates:
            self.scheduler.step_update(updates)
        else:
            self.scheduler.step(epoch)

    def _kept(self) -> str:
        found = list_checkpoints(self.out_dir)
        return f'the last good checkpoint {found[-1]} is kept' if found else 'no checkpoint had been written yet'

    def _go_on(self) -> str:
        return 'continue with --resume' if list_checkpoints(self.out_dir) else 'start the run again'

    def run_info(self) -> Dict[str, Any]:
        """What the run is (metrics.json's header): model, method, splits, and how local each stage is."""
        cfg = self.cfg
        info = dict(model=cfg.model, method=cfg.method, schedule=cfg.schedule, num_stages=self.num_stages,
                    num_classes=self.num_classes, dataset=self.train_data.name, train_split=self.train_data.split,
                    train_images=self.train_loader.num_samples, val_split=self.val_data.split,
                    val_images=self.val_loader.num_samples,
                    test_split=self.test_data.split if self.test_data is not None else None,
                    test_images=self.test_loader.num_samples if self.test_loader is not None else None)
        info.update(self.run_info_extra())
        if self.profile is not None:
            info['stages'] = self.profile
        for prefix, cal in self.exits.items():   # fitted on validation: the setting and its operating point
            info[f'{prefix}adaptive_exit'] = cal.to_dict()
        return info

    def print_plan(self) -> None:
        from ..model import format_profile
        cfg = self.cfg
        tl, vl, test = self.train_loader, self.val_loader, self.test_data
        at_end = (f'; test {test.split} ({self.test_loader.num_samples} images) once at the end' if test is not None
                  else '; no test split')
        every = 'every epoch' if cfg.val_every == 1 else f'every {cfg.val_every} epochs'
        self.say(
            f'{cfg.method.upper()} {cfg.model} ({self.num_stages} stage(s), schedule {cfg.schedule}{self.plan_detail()}'
            f') on {self.train_data.name}: train {self.train_data.split} ({tl.num_samples} images, {tl.kind} loader), '
            f'validation {self.val_data.split} ({vl.num_samples} images) {every}{at_end}; {self.num_classes} classes, '
            f'input {self.data_cfg["input_size"]}; {self.total_epochs} epochs x {self.steps_per_epoch} steps'
            f'{self.plan_processes()}, mixed precision {cfg.mixed_precision}'
            f'{", the step replayed as a CUDA graph" if cfg.cuda_graphs else ""}; output {self.out_dir}')
        if getattr(self, 'stretched', ''):
            self.say(self.stretched)
        if self.profile is not None:
            self.say('how local each stage is (backbone shares; FLOPs of one forward):\n'
                       + format_profile(self.profile))


def config_yaml(cfg) -> str:
    import yaml
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
