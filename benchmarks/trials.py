"""Collect training runs into one trial table: what each run changed, and its validation accuracy per stage.

    python -m benchmarks.trials runs/trials/* --base recipes/fashion_mnist.yaml --out benchmarks/results/greedy_trials

Reads each run folder's ``config.yaml`` and ``metrics.json`` (written by ``hff-train``) and writes ``trials.md`` and
``trials.json``: the settings that differ from the base recipe, epochs, training images/s, the last epoch's
validation top-1 of every stage, of the prediction, of the stage ensemble and of the EMA model. Only validation
figures are tabulated: settings are chosen on them; a run's test figure (if it has one) is listed apart.
"""
import argparse
import json
import os
from typing import Any, Dict, List

import yaml

_IGNORED = {'experiment', 'output', 'progress', 'resume', 'test_split', 'epochs'}


def _flatten(d: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ('hff', 'model_kwargs'):
            out.update(_flatten(v, f'{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def changed_settings(cfg: Dict[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    """Settings of ``cfg`` that differ from the base recipe (hff / model_kwargs key by key)."""
    flat, flat_base = _flatten(cfg), _flatten(base)
    return {k: v for k, v in flat.items() if k not in _IGNORED and flat_base.get(k, _MISSING) != v
            and not (k.startswith(('hff.', 'model_kwargs.')) and v is None and k not in flat_base)}


_MISSING = object()


def read_run(run_dir: str, base: Dict[str, Any]) -> Dict[str, Any]:
    with open(os.path.join(run_dir, 'config.yaml')) as f:
        cfg = yaml.safe_load(f)
    with open(os.path.join(run_dir, 'metrics.json')) as f:
        doc = json.load(f)
    epochs = doc['epochs'] if isinstance(doc, dict) else doc
    last = epochs[-1]
    stages = sorted(int(k.rsplit('stage', 1)[1]) for k in last if k.startswith('top1_stage'))
    speeds = [r['train_img_per_s'] for r in epochs]
    return dict(
        name=os.path.basename(os.path.normpath(run_dir)), method=cfg.get('method', 'hff'),
        changed=changed_settings(cfg, base), hff=cfg.get('hff'), model_kwargs=cfg.get('model_kwargs'),
        epochs_done=len(epochs), epochs=cfg.get('epochs'),
        img_per_s=sorted(speeds)[len(speeds) // 2], val_top1=last.get('top1'), val_ema_top1=last.get('ema_top1'),
        val_ensemble=last.get('top1_ensemble'), val_stages=[last[f'top1_stage{k}'] for k in stages],
        val_split=(doc.get('run') or {}).get('val_split') if isinstance(doc, dict) else None,
        stages=[dict(param_share=s['param_share'], flops_share=s['flops_share'])
                for s in (doc.get('run') or {}).get('stages') or []] if isinstance(doc, dict) else [],
        test_top1=(doc.get('test') or {}).get('top1') if isinstance(doc, dict) else None)


def _fmt(v: Any) -> str:
    return '–' if v is None else (f'{v:.2f}' if isinstance(v, float) else str(v))


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ['| run | method | changed settings (vs the base recipe) | epochs | img/s | val top-1 per stage | '
             'val top-1 | ensemble | EMA |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        changed = ', '.join(f'{k}={json.dumps(v)}' for k, v in r['changed'].items() if k != 'method') or '(base)'
        done = f"{r['epochs_done']}/{r['epochs']}" if r['epochs_done'] != r['epochs'] else str(r['epochs'])
        lines.append(f"| {r['name']} | {r['method']} | {changed} | {done} | {r['img_per_s']:.0f} | "
                     f"{' / '.join(f'{v:.2f}' for v in r['val_stages']) or '–'} | {_fmt(r['val_top1'])} | "
                     f"{_fmt(r['val_ensemble'])} | {_fmt(r['val_ema_top1'])} |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', help='run folders (output/<experiment>)')
    p.add_argument('--base', required=True, help='the recipe the trials vary')
    p.add_argument('--out', default=None, help='folder for trials.md / trials.json (default: print only)')
    args = p.parse_args(argv)
    from timm_hff.train import TrainConfig
    base = TrainConfig.from_yaml(args.base).to_dict()   # every setting, defaults filled in
    rows = [read_run(r, base) for r in args.runs if os.path.isfile(os.path.join(r, 'metrics.json'))]
    text = table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'trials.md'), 'w') as f:
            f.write(text)
        with open(os.path.join(args.out, 'trials.json'), 'w') as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
