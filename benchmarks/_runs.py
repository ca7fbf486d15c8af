"""Finished ``hff-train`` runs that a benchmark may reuse rather than repeat: same data, seed and training settings."""
import json
import os
from typing import IO, Any, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# settings that name or display a run but do not change what it trains
NOT_TRAINING = ('experiment', 'output', 'progress', 'resume', 'log_with', 'checkpoint_hist', 'save_model', 'val_every')
# the HFF settings a BP baseline uses (its small-input stem adaptation at HFF's cut); the heads' settings it ignores
BP_USES = ('small_input', 'stage_indices', 'num_stages', 'balance')
HFF_SETTINGS_USED = {'bp': BP_USES}   # a method that reads only these of the hff settings (the others: all of them)
# HFF settings that change what a trained model predicts, not what it learns (every run scores the last stage, each
# stage and the ensemble anyway)
PREDICTION_ONLY = ('predict_from', 'exit_rule', 'exit_thresholds', 'exit_patience', 'check_split')


def resolved(args: List[str]) -> Dict[str, Any]:
    """The TrainConfig hff-train resolves from ``args``, as a dict, less the settings that do not train."""
    from timm_hff.cli.train import build_parser, resolve_config
    ns = build_parser().parse_args(args)
    if ns.config and not os.path.isabs(ns.config):
        ns.config = os.path.join(REPO, ns.config)
    cfg = resolve_config(ns).to_dict()
    return {k: v for k, v in cfg.items() if k not in NOT_TRAINING}


def same_training(want: Dict[str, Any], got: Dict[str, Any]) -> bool:
    """``got`` (a stored config.yaml) trains what ``want`` does; a setting it lacks (added to TrainConfig later) must
    be at its default in ``want``."""
    from timm_hff.train import TrainConfig
    default = TrainConfig().to_dict()
    want, got = dict(want), dict(got)
    uses = HFF_SETTINGS_USED.get(want.get('method'))
    if uses is not None:
        for cfg in (want, got):
            cfg['hff'] = {k: v for k, v in (cfg.get('hff') or {}).items() if k in uses}
    for cfg in (want, got):   # FF's chunk_size only batches its scoring passes
        cfg['ff'] = {k: v for k, v in (cfg.get('ff') or {}).items() if k != 'chunk_size'}
        cfg['hff'] = {k: v for k, v in (cfg.get('hff') or {}).items() if k not in PREDICTION_ONLY}
    _unstretch(want, got)
    for key, value in want.items():
        if key in got:
            if got[key] != value:
                return False
        elif value != default.get(key):
            return False
    return True


def _unstretch(want: Dict[str, Any], got: Dict[str, Any]) -> None:
    """A run stretched by ``min_steps`` wrote its stretched epoch-counted settings (``optim.stretch_to_min_steps``):
    ``want``'s, multiplied by the same whole factor, are what it trained."""
    from timm_hff.train.optim import EPOCH_COUNTED
    if not want.get('min_steps') or got.get('min_steps') != want['min_steps'] or not want.get('epochs'):
        return
    factor, rest = divmod(got.get('epochs') or 0, want['epochs'])
    if factor > 1 and not rest and all(got.get(k) == (want.get(k) or 0) * factor or not want.get(k)
                                       for k in EPOCH_COUNTED):
        for k in EPOCH_COUNTED:
            if want.get(k):
                want[k] = got[k]


def start_or_resume(args: List[str], run_dir: str, log: str) -> Tuple[List[str], IO[str]]:
    """The hff-train command for ``run_dir`` and its log, opened with the command written first. A folder holding a
    complete checkpoint of a run that trains what ``args`` would is continued (``--resume auto``; a benchmark stopped
    after hours of training picks up there, its log appended to); anything else is cleared for a fresh start."""
    import shutil
    import sys
    import yaml
    from timm_hff.train.checkpoint import list_checkpoints
    cfg_path = os.path.join(run_dir, 'config.yaml')
    resume = False
    if list_checkpoints(run_dir) and os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            resume = same_training(resolved(args), yaml.safe_load(f))
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, '-m', 'timm_hff.train'] + list(args) + (['--resume', 'auto'] if resume else [])
    f = open(log, 'a' if resume else 'w')
    f.write(' '.join(cmd) + '\n')
    f.flush()
    return cmd, f


def finished_run(args: List[str], roots: List[str]) -> Optional[str]:
    """A finished run (test split scored) under any of ``roots`` that trains what ``args`` would."""
    import yaml
    want = resolved(args)
    for root in roots:
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            cfg_path, metrics_path = (os.path.join(root, name, f) for f in ('config.yaml', 'metrics.json'))
            if not (os.path.isfile(cfg_path) and os.path.isfile(metrics_path)):
                continue
            with open(metrics_path) as f:
                if not json.load(f).get('test'):
                    continue
            with open(cfg_path) as f:
                if same_training(want, yaml.safe_load(f)):
                    return os.path.join(root, name)
    return None
