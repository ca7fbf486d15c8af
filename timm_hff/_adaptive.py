"""Adaptive (anytime) inference: the batch runs stage by stage and each image leaves at the first stage that is sure.

Every HFF stage ends in a calibrated classifier, so the forward can stop for an image as soon as its stage is
confident (``_exit_rule``). ``run_stages`` takes a ``route`` callback that scores stage k's head and returns the
rows that go on; the tap hook hands only those rows downstream, so the rest of timm's own forward runs on a smaller
batch and ends once every image has left. Nothing is re-run: an image that left costs no later stage.
"""
import warnings
from typing import List, Optional, Sequence

import torch

from ._config import HFFConfig
from ._exit_rule import ExitRule, replay_exits, scored_stages
from ._profile import exit_flops
from ._probe import check_shrink

__all__ = ['AdaptiveExit']


class AdaptiveExit:
    """HFFModel's adaptive-exit surface (a mixin, so the model module stays one concept). It uses the model's
    ``heads``, ``split``, ``backbone``, ``hff_cfg``, ``_run``, ``_check_input``, ``_need_heads`` and
    ``forward_stages``."""

    def forward_adaptive(self, x: torch.Tensor, return_flops: bool = False):
        """Predict with early exit: each image leaves at the first stage whose confidence passes that stage's
        threshold (``exit_rule``, ``exit_thresholds``), with that stage's logits.

        The batch runs stage by stage through the backbone's own forward; after each stage the images that left are
        dropped, so the later stages run only on the rest and the forward ends once every image has left. For
        inference: call it in eval mode (in train mode the norm layers would see a different batch at every stage).

        Returns:
            ``(logits, exit_stage)``: logits (B, num_classes) and each image's 0-based exit stage (B,); with
            ``return_flops``, also the FLOPs spent on each image (B,), from ``torch.utils.flop_counter`` counts of
            one image (the backbone stages and the heads it went through; a stage whose threshold is 1 runs no
            head, as nobody may leave there).
        """
        self._need_heads('adaptive exit')
        self._check_input(x)
        rule = self._exit_rule()
        n, batch = self.num_stages, x.shape[0]
        problem = check_shrink(self.backbone, self.split, self.in_chans)
        if problem:   # the backbone cannot drop rows mid-forward: same exits from a full forward, nothing saved
            warnings.warn(f'{self.model_name or type(self.backbone).__name__} cannot drop images mid-forward '
                          f'({problem}), so adaptive exit runs every stage: same predictions, no compute saved')
            logits, exit_stage = replay_exits(rule, self.forward_stages(x))
            return (logits, exit_stage, self._flops_of(x, torch.full_like(exit_stage, n - 1))) if return_flops \
                else (logits, exit_stage)
        out: List[Optional[torch.Tensor]] = [None]
        alive: List[Optional[torch.Tensor]] = [None]   # original rows still running (None: all of them, in order)
        exit_stage = torch.full((batch,), n - 1, dtype=torch.long, device=x.device)

        def settle(k: int, logits: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
            """Record the rows of the current batch (None: all) that leave after stage k; index ops, as boolean
            masks cost a nonzero each and batch 1 is all overhead."""
            if rows is None and alive[0] is None:   # the whole batch leaves at once
                out[0] = logits
                exit_stage.fill_(k)
                return
            idx = alive[0] if rows is None else (rows if alive[0] is None else alive[0][rows])
            if out[0] is None:
                out[0] = logits.new_empty(batch, logits.shape[-1])
            out[0].index_copy_(0, idx, (logits if rows is None else logits[rows]).to(out[0].dtype))
            exit_stage.index_fill_(0, idx, k)

        scored = scored_stages(rule.rule, n, rule.thresholds)

        def route(k: int, h: torch.Tensor) -> Optional[torch.Tensor]:
            if not scored[k]:   # threshold 1: no image can leave here, so its head is not run
                return None
            logits = self.heads[k](h)
            leave = rule.leave(k, logits)
            leaving = int(leave.sum())
            if leaving == 0:
                return None
            if leaving == leave.shape[0]:
                settle(k, logits)
                return leave.new_empty(0, dtype=torch.long)   # no row left: the forward ends here
            rows = (~leave).nonzero().squeeze(1)
            settle(k, logits, leave.nonzero().squeeze(1))
            alive[0] = rows if alive[0] is None else alive[0][rows]
            rule.keep(rows)
            return rows

        def last_stage(k: int, h: torch.Tensor) -> None:   # the images that ran the whole backbone
            if k == n - 1:
                settle(k, self.heads[k](h))

        self._run(x, on_stage=last_stage, route=route, keep=False)   # keep=False: no stage output outlives its use
        logits = out[0] if out[0] is not None else x.new_empty(0, self.num_classes)
        return (logits, exit_stage, self._flops_of(x, exit_stage, scored)) if return_flops else (logits, exit_stage)

    def _exit_rule(self) -> ExitRule:
        cfg = self.hff_cfg
        if cfg.exit_rule != 'patience' and cfg.exit_thresholds is None:
            raise ValueError(f"adaptive exit with exit_rule='{cfg.exit_rule}' needs exit_thresholds (one per stage "
                             f"but the last); fit them with timm_hff.calibrate_exits(model, val_loader) or "
                             f"model.set_exits(thresholds=...)")
        return ExitRule(cfg.exit_rule, self.num_stages, cfg.exit_thresholds, cfg.exit_patience)

    def set_exits(self, thresholds: Optional[Sequence[float]] = None, rule: Optional[str] = None,
                  patience: Optional[int] = None) -> None:
        """Set the adaptive-exit settings (saved with the model); arguments left None keep their value."""
        old = self.hff_cfg.to_dict()
        new = dict(old, check_split=False)
        for key, value in (('exit_thresholds', thresholds), ('exit_rule', rule), ('exit_patience', patience)):
            if value is not None:
                new[key] = value
        cfg = HFFConfig(**new)
        self._check_exit_settings(cfg)
        self.hff_cfg.exit_thresholds, self.hff_cfg.exit_rule = cfg.exit_thresholds, cfg.exit_rule
        self.hff_cfg.exit_patience = cfg.exit_patience

    def _check_exit_settings(self, cfg: HFFConfig) -> None:
        """Thresholds fitted for another cut (a config edited, or saved from another model) are refused here,
        where the stage count is known."""
        t = cfg.exit_thresholds
        if t is not None and len(t) != self.num_stages - 1:
            raise ValueError(f'exit_thresholds lists {len(t)} threshold(s) but this model has {self.num_stages} '
                             f'stages, so it needs {self.num_stages - 1} (one per stage but the last); refit them '
                             f'with timm_hff.calibrate_exits, or set exit_thresholds to null')

    def _flops_of(self, x: torch.Tensor, exit_stage: torch.Tensor, scored: Optional[Sequence[bool]] = None
                  ) -> torch.Tensor:
        key = (tuple(x.shape[-2:]), tuple(scored) if scored is not None else None)
        if key not in self._exit_flops:
            self._exit_flops[key] = torch.tensor(exit_flops(self, key[0], scored), dtype=torch.long)
        return self._exit_flops[key].to(exit_stage.device)[exit_stage]
