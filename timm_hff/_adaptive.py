"""Adaptive (anytime) inference: the batch runs stage by stage and each image leaves at the first stage that is sure.

Every HFF stage ends in a calibrated classifier, so the forward can stop for an image as soon as its stage is
confident (``_exit_rule``). ``run_stages`` takes a ``route`` callback that scores stage k's head and returns the
rows that go on; the tap hook hands only those rows downstream, so the rest of timm's own forward runs on a smaller
batch and ends once every image has left. Nothing is re-run: an image that left costs no later stage.
"""
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from ._config import HFFConfig
from ._exit_rule import ExitRule, replay_exits, scored_stages
from ._profile import exit_flops
from ._probe import check_shrink

__all__ = ['AdaptiveExit']


class AdaptiveExit:
    """The adaptive forward of an ``HFFModel``, which owns one (``model._exits``) and hands itself in: the exit rule
    from the model's ``hff_cfg``, and the FLOPs per exit stage, cached per input size (the only state here). It uses
    the model's public surface: ``heads``, ``backbone``, ``split``, ``run_stages``, ``forward_stages``."""

    def __init__(self) -> None:
        self._flops: Dict[tuple, torch.Tensor] = {}   # (H, W), scored stages -> FLOPs per image of leaving at stage k

    def clear(self) -> None:
        """Forget the FLOPs per exit (the heads changed: their cost depends on the class count)."""
        self._flops.clear()

    def forward(self, model, x: torch.Tensor, return_flops: bool = False):
        """``HFFModel.forward_adaptive`` (which checks the input and the heads first): see there."""
        rule = self.rule(model.hff_cfg, model.num_stages)
        n, batch = model.num_stages, x.shape[0]
        problem = check_shrink(model.backbone, model.split, model.in_chans)
        if problem:   # the backbone cannot drop rows mid-forward: same exits from a full forward, nothing saved
            warnings.warn(f'{model.model_name or type(model.backbone).__name__} cannot drop images mid-forward '
                          f'({problem}), so adaptive exit runs every stage: same predictions, no compute saved')
            logits, exit_stage = replay_exits(rule, model.forward_stages(x))
            return (logits, exit_stage, self._flops_of(model, x, torch.full_like(exit_stage, n - 1))) \
                if return_flops else (logits, exit_stage)
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
            logits = model.heads[k](h)
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
                settle(k, model.heads[k](h))

        model.run_stages(x, on_stage=last_stage, route=route, keep=False)   # keep=False: no stage output outlives use
        logits = out[0] if out[0] is not None else x.new_empty(0, model.num_classes)
        return (logits, exit_stage, self._flops_of(model, x, exit_stage, scored)) if return_flops \
            else (logits, exit_stage)

    @staticmethod
    def rule(cfg: HFFConfig, num_stages: int) -> ExitRule:
        """The exit rule ``cfg`` sets for ``num_stages`` stages; a one-line refusal when it has nothing to exit on."""
        if cfg.exit_rule != 'patience' and cfg.exit_thresholds is None:
            raise ValueError(f"adaptive exit with exit_rule='{cfg.exit_rule}' needs exit_thresholds (one per stage "
                             f"but the last); fit them with timm_hff.calibrate_exits(model, val_loader) or "
                             f"model.set_exits(thresholds=...)")
        return ExitRule(cfg.exit_rule, num_stages, cfg.exit_thresholds, cfg.exit_patience)

    @staticmethod
    def check_settings(cfg: HFFConfig, num_stages: int) -> None:
        """Thresholds fitted for another cut (a config edited, or saved from another model) are refused here,
        where the stage count is known."""
        t = cfg.exit_thresholds
        if t is not None and len(t) != num_stages - 1:
            raise ValueError(f'exit_thresholds lists {len(t)} threshold(s) but this model has {num_stages} '
                             f'stages, so it needs {num_stages - 1} (one per stage but the last); refit them '
                             f'with timm_hff.calibrate_exits, or set exit_thresholds to null')

    def _flops_of(self, model, x: torch.Tensor, exit_stage: torch.Tensor, scored: Optional[Sequence[bool]] = None
                  ) -> torch.Tensor:
        key = (tuple(x.shape[-2:]), tuple(scored) if scored is not None else None)
        if key not in self._flops:
            self._flops[key] = torch.tensor(exit_flops(model, key[0], scored), dtype=torch.long)
        return self._flops[key].to(exit_stage.device)[exit_stage]
