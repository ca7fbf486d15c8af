"""timm's own model tests over every registered ``hff_*`` model: which parts of timm's model contract HFF keeps.

    python -m benchmarks.timm_contract                       # every test function of timm's file, -k hff_
    python -m benchmarks.timm_contract --tests test_model_forward test_model_backward

Runs ``tests/timm_upstream/test_models.py``, timm's ``tests/test_models.py`` vendored unedited from the timm release
this project pins for its tests (README.md there), in its own pytest process (``tests/timm_upstream/conftest.py``
imports ``timm_hff`` and adds the ``hff_*`` names to the lists timm picks by module). Counts pass / fail / skip per
timm test function and writes ``timm_contract.md`` / ``.json`` and the full log under ``--out``.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.join(REPO, 'tests', 'timm_upstream')
VENDORED_TIMM = '1.0.31'   # the release whose tests/test_models.py is vendored (tests/timm_upstream/README.md)


def run_upstream(tests: Optional[List[str]] = None, timeout: int = 3000, extra: Optional[List[str]] = None):
    """(return code, pytest's output, per-case outcome {(test, case): outcome}) of timm's file over ``hff_*``."""
    select = 'hff_' if not tests else 'hff_ and (' + ' or '.join(tests) + ')'
    if tests and not any('torchscript' in t for t in tests):   # -k matches substrings: test_model_forward_torchscript
        select += ' and not torchscript'
    cmd = [sys.executable, '-m', 'pytest', '-c', os.devnull, '--rootdir', UPSTREAM, '--confcutdir', UPSTREAM,
           '-p', 'no:cacheprovider', '-rA', '-q', '-W', 'ignore', '--tb=line', 'test_models.py', 'test_hff_non_std.py',
           '-k', select]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    done = subprocess.run(cmd + (extra or []), cwd=UPSTREAM, capture_output=True, text=True, timeout=timeout, env=env)
    out = done.stdout + done.stderr
    outcomes = {}
    for line in out.splitlines():   # -rA: one "OUTCOME test_models.py::test[case] ..." line per case
        m = re.match(r'^(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (test_\w+)\.py::(test_\w+)\[([^\]]*)\]', line)
        if m:
            outcomes[(m.group(3), m.group(4))] = m.group(1)
    return done.returncode, out, outcomes


def summarise(outcomes: Dict) -> Dict[str, Dict[str, Any]]:
    by = collections.defaultdict(collections.Counter)
    failing = collections.defaultdict(list)
    for (test, case), outcome in sorted(outcomes.items()):
        by[test][outcome] += 1
        if outcome in ('FAILED', 'ERROR'):
            failing[test].append(case.split('-', 1)[-1])
    return {t: dict(passed=c['PASSED'], failed=c['FAILED'] + c['ERROR'], skipped=c['SKIPPED'],
                    failing=failing[t]) for t, c in by.items()}


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tests', nargs='+', default=None, help='timm test functions to run (default: all)')
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'timm_contract'))
    args = p.parse_args(argv)
    import timm
    started = time.time()
    code, out, outcomes = run_upstream(args.tests)
    summary = summarise(outcomes)
    result = dict(benchmark='timm_contract', timm=timm.__version__, vendored=VENDORED_TIMM,
                  command='python -m benchmarks.timm_contract ' + ' '.join(argv or sys.argv[1:]),
                  seconds=round(time.time() - started), returncode=code, tests=summary,
                  passed=sum(s['passed'] for s in summary.values()), failed=sum(s['failed'] for s in summary.values()))
    md = [f"timm {timm.__version__}'s tests/test_models.py, `-k hff_`: **{result['passed']} passed, "
          f"{result['failed']} failed** ({result['seconds']} s, `{result['command']}`)", '',
          '| timm test | passed | failed | skipped | failing models |', '|---|---|---|---|---|']
    for test, s in summary.items():
        md.append(f"| {test} | {s['passed']} | {s['failed']} | {s['skipped']} | {', '.join(s['failing']) or '–'} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'timm_contract.json'), 'w') as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, 'timm_contract.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    with open(os.path.join(args.out, 'pytest.log'), 'w') as f:
        f.write(out)
    print('\n'.join(md))
    return result


if __name__ == '__main__':
    main()
