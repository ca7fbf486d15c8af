"""HFF vs backprop vs Forward-Forward at a recipe's own budget, FF's settings chosen on validation.

    python -m benchmarks.accuracy --recipe recipes/fashion_mnist.yaml             # CPU: hours per FF setting
    python -m benchmarks.accuracy --recipe recipes/fashion_mnist.yaml --jobs 6    # a GPU: the runs side by side

Three methods on the recipe's backbone, data, hold-out, data order, augmentation, epochs and EMA, each a plain
``hff-train`` run: HFF (the recipe), BP (``--baseline bp``) and FF (``--baseline ff``: Forward-Forward at HFF's
stage cut). FF gets a small sweep of its learning rate and goodness threshold (``--ff-lr``, ``--ff-threshold``); the
setting with the best validation top-1 at the last epoch is FF's row, the others are listed with their validation
figures only. Every run scores the test split once, after its last epoch; no test figure chooses anything.

A run whose resolved configuration equals a finished run's (under ``--work`` or a stored folder named by
``--adopt``, e.g. the greedy recipe's own runs) is not repeated: same data, seed and settings. Settings that do not
change what is trained (output folder, run name, progress bar) are left out of that comparison. A run stopped part-way
(its folder under ``--work`` holds an epoch checkpoint of the same settings) continues from its latest checkpoint
rather than starting again. Each run's config, metrics and log are kept under ``--out``/runs/, with the machine it
ran on.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from ._runs import finished_run, start_or_resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FF_LR = (0.003, 0.01)
FF_THRESHOLD = (1.0, 4.0)


def machine() -> str:
    import torch
    if torch.cuda.is_available():
        return f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}'
    from ._common import cpu_name
    return f'{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}'


def launch(args: List[str], run_dir: str, log: str) -> subprocess.Popen:
    """Start (or, from its latest checkpoint, continue) one run."""
    cmd, f = start_or_resume(args, run_dir, log)
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def read(run_dir: str) -> Dict[str, Any]:
    with open(os.path.join(run_dir, 'metrics.json')) as f:
        doc = json.load(f)
    last, test = doc['epochs'][-1], doc.get('test') or {}
    speeds = sorted(r['train_img_per_s'] for r in doc['epochs'])
    n = len([k for k in last if k.startswith('top1_stage')])
    return dict(epochs=len(doc['epochs']), val_top1=last['top1'], val_ema_top1=last.get('ema_top1'),
                val_stages=[last[f'top1_stage{k}'] for k in range(n)], test_top1=test.get('top1'),
                test_ema_top1=test.get('ema_top1'), test_stages=[test.get(f'top1_stage{k}') for k in range(n)],
                test_ensemble=test.get('top1_ensemble'), train_img_per_s=speeds[len(speeds) // 2],
                stages=doc['run'].get('stages'), num_classes=doc['run'].get('num_classes'))


def store(run_dir: str, log: str, out: str, name: str, where: str) -> str:
    """Keep a run's config, metrics, log and machine under ``out/runs/<name>``; returns the machine."""
    keep = os.path.join(out, 'runs', name)
    os.makedirs(keep, exist_ok=True)
    for fname in ('metrics.json', 'metrics.csv', 'config.yaml'):
        shutil.copy(os.path.join(run_dir, fname), keep)
    if os.path.isfile(log):
        shutil.copy(log, os.path.join(keep, 'train.log'))
    machine_path = os.path.join(run_dir, 'machine.txt')   # written beside the run by whoever trained it
    text = open(machine_path).read() if os.path.isfile(machine_path) else where
    with open(os.path.join(keep, 'machine.txt'), 'w') as f:
        f.write(text.strip() + '\n')
    return text.strip()


def inference_mflops(config_path: str, num_classes: Optional[int] = None) -> Optional[float]:
    """Forward FLOPs per image of the model a run's config builds (FF: its C passes), counted on the CPU, at the
    run's class count (its metrics.json header; older runs: the config's); None where neither says."""
    import torch
    import yaml
    from timm_hff.train import TrainConfig
    from timm_hff.train import build_model
    from ._common import count_flops
    with open(config_path) as f:
        cfg = TrainConfig.from_dict({k: v for k, v in yaml.safe_load(f).items() if k in TrainConfig().to_dict()})
    num_classes = num_classes or cfg.num_classes or (len(cfg.label_names) if cfg.label_names else None)
    if num_classes is None:
        return None
    model = build_model(cfg, num_classes).eval()
    x = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        return count_flops(lambda: model(x)) / 1e6


def run(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog='python -m benchmarks.accuracy --recipe', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--recipe', required=True)
    p.add_argument('--methods', nargs='+', default=['hff', 'bp', 'ff'], choices=['hff', 'bp', 'ff'])
    p.add_argument('--ff-lr', type=float, nargs='+', default=list(FF_LR))
    p.add_argument('--ff-threshold', type=float, nargs='+', default=list(FF_THRESHOLD))
    p.add_argument('--ff-chunk', type=int, default=None,
                   help="FF's (image, label) rows per backbone call when scoring (FFConfig.chunk_size); a GPU takes "
                        "validation_batch_size x classes at once")
    p.add_argument('--jobs', type=int, default=1, help='runs side by side (a GPU takes several)')
    p.add_argument('--adopt', nargs='*', default=[os.path.join(REPO, 'benchmarks', 'results', 'greedy_recipe')],
                   help='folders of stored finished runs to reuse when their configuration matches')
    p.add_argument('--set', default='', metavar='"FLAGS"',
                   help='extra hff-train settings for every run, one string (e.g. --set="--epochs 2 --seed 1")')
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'accuracy_recipe'))
    p.add_argument('--work', default=os.path.join(REPO, 'output', 'accuracy_recipe'))
    args = p.parse_args(argv)
    args.work, args.out = os.path.abspath(args.work), os.path.abspath(args.out)
    if args.jobs < 1:
        p.error(f'--jobs must be >= 1, got {args.jobs}')
    runs_root = os.path.join(args.work, 'runs')
    common = ['--config', args.recipe, '--progress', 'false', '--output', runs_root] + shlex.split(args.set)
    planned: Dict[str, List[str]] = {}
    if 'hff' in args.methods:
        planned['hff'] = list(common)
    if 'bp' in args.methods:
        planned['bp'] = common + ['--baseline', 'bp']
    if 'ff' in args.methods:
        for lr in args.ff_lr:
            for th in args.ff_threshold:
                ff = dict(threshold=th, **({'chunk_size': args.ff_chunk} if args.ff_chunk else {}))
                planned[f'ff_lr{lr:g}_th{th:g}'] = common + ['--baseline', 'ff', '--lr', repr(lr),
                                                            '--ff', json.dumps(ff)]
    started = time.time()
    done: Dict[str, str] = {}
    todo = []
    for name, a in planned.items():
        a = a + ['--experiment', name]
        same = finished_run(a, [runs_root] + list(args.adopt))
        if same:
            print(f'{name}: reusing the finished run {os.path.relpath(same, REPO)}', flush=True)
            done[name] = same
        else:
            todo.append((name, a))
    os.makedirs(runs_root, exist_ok=True)
    here = machine()
    active: Dict[str, subprocess.Popen] = {}
    failed = []
    while todo or active:
        while todo and len(active) < args.jobs:
            name, a = todo.pop(0)
            print(f'{name}: training ({" ".join(a)})', flush=True)   # "--resume auto" added when continuing
            active[name] = launch(a, os.path.join(runs_root, name), os.path.join(args.work, f'{name}.log'))
        time.sleep(2)
        for name, proc in list(active.items()):
            if proc.poll() is None:
                continue
            del active[name]
            run_dir = os.path.join(runs_root, name)
            if proc.returncode != 0:
                failed.append(name)
                print(f'{name}: FAILED (exit {proc.returncode}); see {args.work}/{name}.log', flush=True)
                continue
            with open(os.path.join(run_dir, 'machine.txt'), 'w') as f:
                f.write(here + '\n')
            done[name] = run_dir
            print(f'{name}: done', flush=True)
    rows = {}
    for name, run_dir in done.items():
        adopted = not run_dir.startswith(os.path.abspath(runs_root))
        where = f'stored run {os.path.relpath(run_dir, REPO)} (its README names the machine)' if adopted else here
        log = os.path.join(run_dir, 'train.log') if adopted else os.path.join(args.work, f'{name}.log')
        kept = run_dir if adopted else os.path.join(args.out, 'runs', name)   # where a reader finds it afterwards
        shown = os.path.relpath(kept, REPO) if os.path.abspath(kept).startswith(REPO + os.sep) else kept
        row = read(run_dir)
        rows[name] = dict(run=shown, **row, machine=store(run_dir, log, args.out, name, where),
                          mflops=inference_mflops(os.path.join(run_dir, 'config.yaml'), row['num_classes']))
    ff = {k: v for k, v in rows.items() if k.startswith('ff_')}
    chosen = max(ff, key=lambda k: ff[k]['val_top1']) if ff else None
    result = dict(benchmark='accuracy_recipe', recipe=args.recipe, command='python -m benchmarks.accuracy ' + ' '.join(
        sys.argv[1:] if argv is None else argv), seconds=round(time.time() - started), ff_chosen=chosen,
                  failed=failed, rows=rows)
    md = render(result)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(md + '\n')
    print(md)
    return result


def render(result: Dict[str, Any]) -> str:
    rows, chosen = result['rows'], result['ff_chosen']
    fmt = (lambda v: '-' if v is None else f'{v:.2f}')
    fmt1 = (lambda v: '-' if v is None else f'{v:.1f}')
    main = [(n, rows[n]) for n in ('hff', 'bp') if n in rows] + ([(chosen, rows[chosen])] if chosen else [])
    n_st = max((len(r['test_stages']) for _, r in main), default=0)
    lines = [f"### HFF vs BP vs FF at the recipe's budget (`{result['command']}`)", '',
             f"Recipe `{result['recipe']}`; FF's learning rate and threshold chosen on validation (below).", '',
             '| method | run | val top-1 | test top-1 (EMA) | ' + ' | '.join(f'stage {k + 1}' for k in range(n_st))
             + ' | inference MFLOPs/img | train img/s (median epoch) | machine |',
             '|---|---|---|---|' + '---|' * n_st + '---|---|---|']
    label = dict(hff='HFF (the recipe)', bp='BP (--baseline bp)')
    for name, r in main:
        st = [fmt(v) for v in r['test_stages']] + ['-'] * (n_st - len(r['test_stages']))
        lines.append(f"| {label.get(name, f'FF ({name})')} | {r['run']} | {fmt(r['val_top1'])} | "
                     f"{fmt(r['test_top1'])} ({fmt(r['test_ema_top1'])}) | {' | '.join(st)} | {fmt1(r['mflops'])} | "
                     f"{r['train_img_per_s']:.0f} | {r['machine']} |")
    stages = rows.get('hff', {}).get('stages')
    if stages:
        lines += ['', "HFF's stages, share of the backbone: params " + ' / '.join(
            f"{s['param_share'] * 100:.1f}" for s in stages) + '%, forward FLOPs ' + ' / '.join(
            f"{s['flops_share'] * 100:.1f}" for s in stages) + "%. FF's stage k is its own goodness alone, its "
            "prediction sums the goodness of stages 2.. over C passes (Hinton's rule); BP has one exit."]
    ff = {k: v for k, v in rows.items() if k.startswith('ff_')}
    if ff:
        lines += ['', 'FF sweep (validation top-1 at the last epoch; the best is FF\'s row):', '',
                  '| setting | val top-1 | val top-1 per stage |', '|---|---|---|']
        for name, r in ff.items():
            mark = ' (chosen)' if name == chosen else ''
            lines.append(f"| {name}{mark} | {fmt(r['val_top1'])} | {' / '.join(fmt(v) for v in r['val_stages'])} |")
    if result['failed']:
        lines += ['', f"Failed runs (see their logs): {', '.join(result['failed'])}."]
    lines += ['', "Speeds are per run and per machine: compare them only within one machine "
              "(`python -m benchmarks.recipe_cost` times HFF and BP side by side)."]
    return '\n'.join(lines)
