"""Aten ops dispatched per eager training step, HFF against BP: the CPU measure of a step's launch cost.

    python -m benchmarks.train_ops                     # resnet18 @ 32 (small-input stem) and resnet50 @ 224
    python -m benchmarks.train_ops --models resnet18_32 --methods hff_simultaneous bp

Short GPU steps are bound by kernel launches, not FLOPs (H200: HFF's step-time ratio to BP tracked its op ratio, see
docs/results.md), and every op a step dispatches on a CPU is a kernel launch on a GPU. The count is exact and the
same on every machine: one AdamW step (forward, local losses or BP's loss, backward, optimizer step) at batch 2,
counted by a ``TorchDispatchMode`` after one warm-up step. Writes ``train_ops.md`` / ``.json`` under ``--out``.
"""
import argparse
import collections
import json
import os
import sys
import time
from typing import Any, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._common import PRESETS, build_for_method, get_spec, make_runtime, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('bp', 'hff_simultaneous', 'hff_memory_efficient', 'hff_balanced')
MODELS = ('resnet18_32', 'resnet50_224')
# the targets of issue 25 (simultaneous step, eager): HFF / BP ops
TARGETS = {'resnet18_32': 1.5, 'resnet50_224': 1.2}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(method: str, preset: str, num_classes: int = 10) -> Dict[str, Any]:
    spec = get_spec(preset)
    torch.manual_seed(0)
    model = build_for_method(method, spec, num_classes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, foreach=True)
    runtime = make_runtime(argparse.Namespace(device='cpu', threads=1, seed=0, no_amp=True, no_channels_last=True))
    step = make_train_step(method, model, opt, runtime)
    x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size)
    y = torch.tensor([0, 1])
    step(x, y)   # warm-up: lazy state (optimizer moments) is not part of a step
    counter = OpCounter()
    with counter:
        step(x, y)
    return dict(ops=sum(counter.ops.values()), top=counter.ops.most_common(8),
                params=sum(1 for _ in model.parameters()))


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=sorted(PRESETS))
    p.add_argument('--methods', nargs='+', default=list(METHODS))
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'train_ops'))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    rows = []
    for preset in args.models:
        counts = {m: count_step(m, preset) for m in dict.fromkeys(['bp', *args.methods])}
        bp = counts['bp']['ops']
        for method, c in counts.items():
            rows.append(dict(model=preset, method=method, ops=c['ops'], vs_bp=round(c['ops'] / bp, 3),
                             params=c['params'], top_ops=c['top']))
    lines = ['| model | method | aten ops per step | vs BP | target (simultaneous) | parameters |',
             '|---|---|---|---|---|---|']
    for r in rows:
        target = TARGETS.get(r['model']) if r['method'] == 'hff_simultaneous' else None
        verdict = '' if target is None else f"<= {target}x: {'met' if r['vs_bp'] <= target else 'missed'}"
        lines.append(f"| {r['model']} | {r['method']} | {r['ops']} | {r['vs_bp']:.2f}x | {verdict} | {r['params']} |")
    command = 'python -m benchmarks.train_ops ' + ' '.join(argv if argv is not None else sys.argv[1:])
    result = dict(benchmark='train_ops', command=command.strip(), seconds=round(time.time() - started),
                  torch=torch.__version__, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'train_ops.json'), 'w') as f:
        json.dump(result, f, indent=1)
    md = (f"### Aten ops per training step (`{result['command']}`)\n\nOne eager AdamW step at batch 2 on the CPU "
          f"(torch {torch.__version__}), counted by a TorchDispatchMode after a warm-up step.\n\n" + '\n'.join(lines)
          + '\n')
    with open(os.path.join(args.out, 'train_ops.md'), 'w') as f:
        f.write(md)
    print(md)
    return result


if __name__ == '__main__':
    main()
