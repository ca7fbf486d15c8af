"""Fixed-seed short runs of every schedule and method: the final weights' sha256 and the metrics, to hold a change of
the training code to bitwise the same behaviour.

    python -m benchmarks.equivalence --out benchmarks/results/equivalence/before.json    # on the old code
    python -m benchmarks.equivalence --out benchmarks/results/equivalence/after.json     # on the new code
    python -m benchmarks.equivalence --compare before.json after.json

Each run is ``recipes/fashion_mnist_quick.yaml`` (``recipes/fashion_mnist_stage_parallel.yaml`` for the two-process
``stage_parallel`` run) for 2 epochs on the first 4,096 training images, validated on 1,000 test images, with the data
settings pinned on the command line so a later change of the recipe's split protocol does not change the run. Timings
are dropped from the metrics; everything else (losses, accuracies per stage, the saved files) must match exactly.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ['--train_num_samples', '4096', '--val_split', 'test', '--val_fraction', '0', '--test_split', 'null',
        '--val_num_samples', '1000', '--epochs', '2', '--threads', '1', '--progress', 'false']
RUNS = {
    'hff_simultaneous': ['--config', 'recipes/fashion_mnist_quick.yaml'],
    'hff_memory_efficient': ['--config', 'recipes/fashion_mnist_quick.yaml', '--schedule', 'memory_efficient'],
    'hff_sequential': ['--config', 'recipes/fashion_mnist_quick.yaml', '--schedule', 'sequential', '--epochs', '1'],
    'hff_ema_mixup': ['--config', 'recipes/fashion_mnist_quick.yaml', '--model_ema', 'true', '--model_ema_decay',
                      '0.99', '--mixup', '0.2', '--smoothing', '0.1', '--stage_lr', '[1, 1, 2, 2]'],
    'hff_stage_parallel': ['--config', 'recipes/fashion_mnist_stage_parallel.yaml'],
    'bp': ['--config', 'recipes/fashion_mnist_quick.yaml', '--baseline', 'bp'],
    'ff': ['--config', 'recipes/fashion_mnist_quick.yaml', '--baseline', 'ff'],
}
TIMES = ('train_time_s', 'eval_time_s', 'train_img_per_s', 'seconds')


def _sha(path: str) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes, in name order), not of the file: safetensors writes a
    header with more than one metadata key in a random order, so equal weights can make unequal files."""
    from safetensors.torch import load_file
    h = hashlib.sha256()
    for name, t in sorted(load_file(path).items()):
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)}:'.encode())
        h.update(t.contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
    return h.hexdigest()


def torch_uint8():
    import torch
    return torch.uint8


def _untimed(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _untimed(x) for k, x in v.items() if k not in TIMES}
    if isinstance(v, list):
        return [_untimed(x) for x in v]
    return v


def run_all(work: str, only=None, train: bool = True) -> Dict[str, Any]:
    out = {}
    for name, args in RUNS.items():
        if only and name not in only:
            continue
        run_dir = os.path.join(work, name)
        t = time.time()
        if train:
            subprocess.run(['rm', '-rf', run_dir], check=True)
            cmd = [sys.executable, '-m', 'timm_hff.train'] + args + DATA + ['--output', work, '--experiment', name]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f'{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}')
        files = {}
        for sub in ('model', 'model_ema'):
            folder = os.path.join(run_dir, sub)
            if os.path.isdir(folder):
                for f in sorted(os.listdir(folder)):
                    if f.endswith('.safetensors'):
                        files[f'{sub}/{f}'] = _sha(os.path.join(folder, f))
        with open(os.path.join(run_dir, 'metrics.json')) as f:
            metrics = _untimed(json.load(f))
        out[name] = dict(weights=files, metrics=metrics, seconds=round(time.time() - t, 1))
        print(name, files, flush=True)
    return out


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    same = True
    for name in a:
        if name not in b:
            print(f'{name}: missing in the second file')
            same = False
            continue
        w = a[name]['weights'] == b[name]['weights']
        m = a[name]['metrics'] == b[name]['metrics']
        print(f"{name}: weights {'identical' if w else 'DIFFER'}, metrics {'identical' if m else 'DIFFER'}")
        same &= w and m
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'equivalence', 'runs.json'))
    p.add_argument('--work', default=os.path.join(REPO, 'output', 'equivalence'))
    p.add_argument('--only', nargs='+', default=None, choices=list(RUNS))
    p.add_argument('--compare', nargs=2, default=None, metavar=('A', 'B'))
    p.add_argument('--no-train', action='store_true', help='read the runs already in --work (hash them again)')
    args = p.parse_args(argv)
    if args.compare:
        docs = []
        for path in args.compare:
            with open(path) as f:
                docs.append(json.load(f)['runs'])
        return 0 if compare(*docs) else 1
    import platform
    rev = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()
    runs = run_all(os.path.abspath(args.work), args.only, train=not args.no_train)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(dict(commit=rev, machine=platform.processor() or platform.machine(), command=' '.join(sys.argv),
                       runs=runs), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
