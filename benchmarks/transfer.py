"""Transfer on a class split of Fashion-MNIST: does ``recipes/transfer_hff.yaml`` beat training from scratch?

    python -m benchmarks.transfer --candidates            # the transfer settings compared on validation (choose)
    python -m benchmarks.transfer                         # the shipped recipe vs HFF and BP from scratch (report)

Source: the greedy recipe (``recipes/fashion_mnist.yaml``) trained on classes 0-4 (their 30,000 training images, its
own class-balanced hold-out for validation). Target: classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) relabelled
0-4, with N training images per class, a validation set of 200 other training images per class (never trained on),
and the 5,000 test images of those classes. For each N, three runs of the same budget: the transfer recipe from the
source model, HFF from scratch (the greedy recipe) and BP from scratch (its backbone). The budget is images seen, the
same for every run of one N (``--budget-images``, default 64,000: 128 epochs of 500 images, 26 of 2,500), never fewer
epochs than the recipe's own: a few epochs of a few hundred images would leave the from-scratch runs untrained and
make the comparison meaningless. Each run validates every epoch and evaluates the test split once, at the end.
``--candidates`` runs instead the transfer settings compared on the target's validation split to choose the recipe's
defaults (their test figures are stored but never used to choose) and writes ``candidates.md`` / ``.json``; the
default run writes ``transfer.md`` / ``transfer.json``, both under ``--out`` (default ``benchmarks/results/transfer``)
with each run's metrics. A run whose configuration (its resolved ``config.yaml``) trains what a finished run's did is
not repeated (same data, seed and training settings; ``benchmarks._runs``): when the shipped recipe is the candidate
chosen on validation, its row is that candidate's run, and the table's run column says so.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np

from timm_hff.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_idx_arrays

from ._runs import finished_run, start_or_resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
VAL_PER_CLASS = 200
# transfer settings compared on the target's validation split (the shipped recipe is one of them)
CANDIDATES = {
    'head_only': dict(freeze_stages=[], head_only=True),
    'freeze_0_1': dict(freeze_stages=[0, 1], lr=0.001),
    'finetune_all_lr3e-4': dict(freeze_stages=[], lr=0.0003),
    'finetune_all_lr1e-3': dict(freeze_stages=[], lr=0.001),
    'finetune_all_lr3e-3': dict(freeze_stages=[], lr=0.003),
}
BUDGET_IMAGES = 64_000
METHODS = ('transfer recipe', 'HFF from scratch', 'BP from scratch')


def write_idx(path: str, array: np.ndarray) -> None:
    """An uncompressed IDX file (uint8 images or labels)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'wb') as f:   # renamed into place: a run reading the file never sees half of it
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def make_split(root: str, out: str, classes, per_class=None, val_per_class: int = 0, seed: int = 0) -> int:
    """IDX files of ``classes`` (relabelled 0..k-1): train = ``per_class`` images of each class (all when None)
    followed by ``val_per_class`` other ones; test = every test image of the classes. Returns the train rows."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = load_idx_arrays(root, 'train')
    train_idx, val_idx = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx) - val_per_class if per_class is None else per_class
        train_idx.append(idx[:n])
        val_idx.append(idx[n:n + val_per_class])
    order = np.concatenate([rng.permutation(np.concatenate(train_idx)), np.concatenate(val_idx)]).astype(int)
    relabel = np.zeros(256, dtype=np.uint8)
    relabel[list(classes)] = np.arange(len(classes))
    write_idx(os.path.join(out, 'train-images-idx3-ubyte'), x[order])
    write_idx(os.path.join(out, 'train-labels-idx1-ubyte'), relabel[y[order]])
    xt, yt = load_idx_arrays(root, 'test')
    keep = np.isin(yt, classes)
    write_idx(os.path.join(out, 't10k-images-idx3-ubyte'), xt[keep])
    write_idx(os.path.join(out, 't10k-labels-idx1-ubyte'), relabel[yt[keep]])
    return int(sum(len(i) for i in train_idx))


def hff_train(args: List[str], log: str, run_dir: str) -> str:
    """Run hff-train into ``run_dir``; returns the run folder, which is an earlier finished run of the very same
    configuration when there is one (a rerun would repeat it: same data, seed and settings)."""
    same = finished_run(args, [os.path.dirname(run_dir)])
    if same:
        return same
    cmd, f = start_or_resume(args, run_dir, log)
    with f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    return run_dir


def names(classes) -> str:
    return json.dumps([FASHION_MNIST_CLASSES[c] for c in classes])


def read(run_dir: str) -> Dict[str, Any]:
    with open(os.path.join(run_dir, 'metrics.json')) as f:
        doc = json.load(f)
    last, test = doc['epochs'][-1], doc.get('test') or {}
    stages = [k for k in last if k.startswith('top1_stage')]   # the last stage's own head, whatever predict_from
    return dict(val_last_stage_top1=last[f'top1_stage{len(stages) - 1}'] if stages else last['top1'],
                val_top1=last['top1'], val_ema_top1=last.get('ema_top1'), val_ensemble_top1=last.get('top1_ensemble'),
                test_top1=test.get('top1'), test_ema_top1=test.get('ema_top1'),
                test_ensemble_top1=test.get('top1_ensemble'), epochs=len(doc['epochs']),
                train_images=doc['run']['train_images'])


def store(run_dir: str, work: str, out: str) -> None:
    """Keep a run's config, per-epoch metrics and log under ``out/runs/<run name>``."""
    keep = os.path.join(out, 'runs', os.path.basename(run_dir))
    os.makedirs(keep, exist_ok=True)
    for fname in ('metrics.json', 'metrics.csv', 'config.yaml'):
        shutil.copy(os.path.join(run_dir, fname), keep)
    log = os.path.join(work, f'{os.path.basename(run_dir)}.log')
    if os.path.isfile(log):
        shutil.copy(log, os.path.join(keep, 'train.log'))


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=FASHION_MNIST_DIR)
    p.add_argument('--sizes', type=int, nargs='+', default=[100, 500], help='target training images per class')
    p.add_argument('--source-epochs', type=int, default=10)
    p.add_argument('--budget-images', type=int, default=BUDGET_IMAGES,
                   help='training images seen by every run of one target size (epochs = budget / train images)')
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                   help='the runs of the table to make (finished runs of the same command are kept, not rerun)')
    p.add_argument('--candidates', action='store_true',
                   help='run the transfer settings compared on validation (to choose the recipe) instead of the table')
    p.add_argument('--only', nargs='+', default=None, choices=list(CANDIDATES),
                   help='with --candidates: run only these (e.g. to split the runs over processes)')
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'transfer'))
    p.add_argument('--work', default=os.path.join(REPO, 'output', 'transfer_benchmark'))
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args(argv)
    common = ['--threads', str(args.threads), '--progress', 'false', '--output', os.path.join(args.work, 'runs')]
    data = os.path.join(args.work, 'data')
    started = time.time()

    source_dir = os.path.join(data, 'source')
    make_split(args.data_dir, source_dir, SOURCE_CLASSES)
    source_run = os.path.join(args.work, 'runs', 'source')
    source_args = ['--config', 'recipes/fashion_mnist.yaml', '--data_dir', source_dir, '--label_names',
                   names(SOURCE_CLASSES), '--epochs', str(args.source_epochs), '--experiment', 'source'] + common
    source_run = hff_train(source_args, os.path.join(args.work, 'source.log'), source_run)
    rows = [dict(target='source (classes 0-4)', method='HFF, greedy recipe', run=os.path.basename(source_run),
                 **read(source_run))]
    store(source_run, args.work, args.out)

    import yaml
    with open(os.path.join(REPO, 'recipes', 'transfer_hff.yaml')) as f:
        recipe = yaml.safe_load(f)
    for n in args.sizes:
        target = os.path.join(data, f'target_{n}')
        rows_n = make_split(args.data_dir, target, TARGET_CLASSES, per_class=n, val_per_class=VAL_PER_CLASS)
        epochs = max(recipe['epochs'], -(-args.budget_images // rows_n))
        split = ['--epochs', str(epochs), '--dataset', 'idx', '--data_dir', target, '--train_split',
                 f'train[:{rows_n}]', '--val_split', f'train[{rows_n}:]', '--val_fraction', '0', '--test_split',
                 'test', '--num_classes', str(len(TARGET_CLASSES)), '--label_names', names(TARGET_CLASSES),
                 '--val_num_samples', 'null'] + common
        transfer = ['--config', 'recipes/transfer_hff.yaml', '--model', f'local-dir:{source_run}/model']
        if args.candidates:
            runs = {f'candidate {name}': transfer + [a for k, v in over.items() for a in (f'--{k}', json.dumps(v))]
                    for name, over in CANDIDATES.items() if args.only is None or name in args.only}
        else:
            runs = {'transfer recipe': transfer, 'HFF from scratch': ['--config', 'recipes/fashion_mnist.yaml']}
            runs['BP from scratch'] = runs['HFF from scratch'] + ['--baseline', 'bp']
            runs = {k: v for k, v in runs.items() if k in args.methods}
        for method, run_args in runs.items():
            exp = f"n{n}_{method.replace(' ', '_')}"
            run_dir = hff_train(run_args + split + ['--experiment', exp], os.path.join(args.work, f'{exp}.log'),
                                os.path.join(args.work, 'runs', exp))
            rows.append(dict(target=f'classes 5-9, {n} images per class', method=method,
                             run=os.path.basename(run_dir), **read(run_dir)))
            store(run_dir, args.work, args.out)
            print(rows[-1], flush=True)
    name = 'candidates' if args.candidates else 'transfer'
    result = dict(benchmark='transfer', command='python -m benchmarks.transfer ' + ' '.join(argv or sys.argv[1:]),
                  seconds=round(time.time() - started), budget_images=args.budget_images, transfer_recipe=recipe,
                  candidates=CANDIDATES if args.candidates else None, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    md = ['| target | method | run | train images | epochs | val top-1 | val top-1, stage ensemble | test top-1 | '
          'test top-1, stage ensemble | test top-1 (EMA) |', '|---|---|---|---|---|---|---|---|---|---|']
    fmt = (lambda v: '–' if v is None else f'{v:.2f}')
    for r in rows:
        md.append(f"| {r['target']} | {r['method']} | {r['run']} | {r['train_images']} | {r['epochs']} | "
                  f"{fmt(r['val_top1'])} | {fmt(r['val_ensemble_top1'])} | {fmt(r['test_top1'])} | "
                  f"{fmt(r['test_ensemble_top1'])} | "
                  f"{fmt(r['test_ema_top1'])} |")
    if args.candidates and args.only is None:
        # the choice: the best mean validation top-1 over the target sizes, predicting from the model's last stage or
        # from the stage ensemble (both scored on the same runs)
        mean_val = {}
        for c in CANDIDATES:
            mine = [r for r in rows if r['method'] == f'candidate {c}']
            mean_val[f'{c}, last stage'] = float(np.mean([r['val_last_stage_top1'] for r in mine]))
            mean_val[f'{c}, stage ensemble'] = float(np.mean([r['val_ensemble_top1'] for r in mine]))
        result['mean_val_top1'] = mean_val
        result['chosen'] = max(mean_val, key=mean_val.get)
        md += ['', 'Mean validation top-1 over the target sizes: ' + '; '.join(f'{c} {v:.2f}' for c, v in
                                                                               mean_val.items()),
               '', f"Chosen on validation: **{result['chosen']}** (the test figures above were not used)."]
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, f'{name}.md'), 'w') as f:
        f.write(f"### Transfer on a class split of Fashion-MNIST (`{result['command']}`)\n\n" + '\n'.join(md) + '\n')
    print('\n'.join(md))
    return result


if __name__ == '__main__':
    main()
