"""Coverage: how many of timm's model modules (families) wrap into HFF and train one step.

For every module in ``timm.list_modules()`` it takes one small model of that module, builds it with
``timm_hff.create_model`` (which runs the build-time split checks), and runs one training step in
simultaneous mode. It prints a Markdown table and writes ``coverage.json`` and ``coverage.md``.

    python -m benchmarks.coverage [--out benchmarks/results/coverage] [--modules resnet vit ...]
"""
import argparse
import json
import os
import re
import signal
import time
import traceback
from typing import Dict, List, Optional

import timm
import torch

import timm_hff

# Names that suggest a small variant, best first: the report wants one cheap model per family.
_SMALL_HINTS = ['test', 'pico', 'atto', 'femto', 'nano', 'xxs', 'tiny', 'mini', 'small', 'xs', '_s', 'b0', '050',
                '18', 'lite', 'base']


def pick_model(module: str) -> Optional[str]:
    names = [n for n in timm.list_models(module=module) if not n.startswith('hff_')]
    if not names:
        return None

    def rank(n: str):
        hint = next((i for i, h in enumerate(_SMALL_HINTS) if h in n), len(_SMALL_HINTS))
        size = int(m.group(1)) if (m := re.search(r'_(\d{3})$', n)) else 224
        return hint, size, len(n), n
    return sorted(names, key=rank)[0]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _build_small(name: str, num_classes: int):
    """Build at 64 (or 112) px where the family allows it (timm's img_size, else a probe at that size), else at its
    default size.

    Coverage asks whether a family wraps, not how fast: small inputs keep the whole sweep within minutes.
    """
    errors = []
    # 112 = 16 * 7: a size for patch-14 models that 64 does not divide
    attempts = [dict(img_size=64), dict(check_img_size=64), dict(img_size=112), dict(check_img_size=112)]
    default = timm.get_pretrained_cfg(name)
    if default is None or max(default.input_size[1:]) <= 384:   # a 1024 px default would need ~20 GB here
        attempts.append(dict())
    for kwargs in attempts:
        torch.manual_seed(0)
        try:
            return timm_hff.create_model(name, num_classes=num_classes, **kwargs)
        except _Timeout:
            raise
        except Exception as e:
            errors.append(e)
    raise errors[-1]


def try_model(name: str, num_classes: int = 10, timeout_s: int = 120) -> Dict:
    """Build + one training step; returns a row with status, stages, layouts, seconds, error."""
    row = dict(model=name, ok=False, stages=None, layouts=None, img_size=None, seconds=None, error='')
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    t0 = time.perf_counter()
    try:
        model = _build_small(name, num_classes)
        size = model.split.probe_img_size
        x = torch.randn(2, model.in_chans, size, size)
        y = torch.randint(0, num_classes, (2,))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        model.train()
        out = model(x, y)
        out.loss.backward()
        opt.step()
        if not torch.isfinite(out.loss):
            raise RuntimeError(f'loss is {out.loss.item()}')
        row.update(ok=True, stages=model.num_stages, layouts='/'.join(model.split.layouts), img_size=size)
    except _Timeout:
        row['error'] = f'timeout after {timeout_s}s'
    except Exception as e:  # the report records every failure kind, one line each
        msg = str(e).splitlines()[0] if str(e) else ''
        row['error'] = f'{type(e).__name__}: {msg}'[:200]
        if os.environ.get('HFF_COVERAGE_TRACE'):
            traceback.print_exc()
    finally:
        signal.alarm(0)
    row['seconds'] = round(time.perf_counter() - t0, 2)
    return row


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='benchmarks/results/coverage')
    parser.add_argument('--modules', nargs='*', default=None, help='only these timm modules')
    parser.add_argument('--timeout', type=int, default=120, help='seconds per model')
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # timm lists our own registry as a module too; it is not a timm family
    modules = args.modules or [m for m in timm.list_modules() if m != '_registry']
    rows = []
    for module in modules:
        name = pick_model(module)
        if name is None:
            rows.append(dict(module=module, model=None, ok=False, error='no model in this module'))
            continue
        row = dict(module=module, **try_model(name, timeout_s=args.timeout))
        rows.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {module:28s} {name:40s} {row['seconds']:7.2f}s {row['error']}",
              flush=True)
    ok = sum(r['ok'] for r in rows)
    summary = dict(timm_version=timm.__version__, torch_version=torch.__version__, modules=len(rows), wrapped=ok,
                   percent=round(100 * ok / max(1, len(rows)), 1), rows=rows)
    lines = [f"# HFF coverage of timm {timm.__version__}: {ok}/{len(rows)} modules ({summary['percent']}%)", '',
             '| module | model | ok | stages | layouts | px | s | error |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['module']} | {r.get('model')} | {'yes' if r['ok'] else 'no'} | {r.get('stages') or ''} | "
                     f"{r.get('layouts') or ''} | {r.get('img_size') or ''} | {r.get('seconds') or ''} | "
                     f"{r.get('error', '')} |")
    table = '\n'.join(lines)
    os.makedirs(args.out, exist_ok=True)
    for fname, text in (('coverage.json', json.dumps(summary, indent=2)), ('coverage.md', table + '\n')):
        tmp = os.path.join(args.out, fname + '.tmp')
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, fname))
    print(table)
    print(f"\nwrapped {ok}/{len(rows)} timm modules ({summary['percent']}%)")
    return summary


if __name__ == '__main__':
    main()
