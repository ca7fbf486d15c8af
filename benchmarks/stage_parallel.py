"""Stage-parallel training throughput: one process per stage against the best single process on the same cores.

    python -m benchmarks.stage_parallel            # the measurement: run it on an otherwise idle machine
    python -m benchmarks.stage_parallel --smoke    # a few steps of everything, to check that it runs
    python -m benchmarks.stage_parallel --equivalence --runs-dir output/stage_parallel_eq   # same values? (any load)

Three ways to train ``recipes/fashion_mnist_stage_parallel.yaml`` (2 stages), all on one cut (``--cut step``, the
default: the one ``balance='step'`` picks at the run's batch and layout; ``--cut recipe``: the recipe's), each a real
``hff-train`` run in its own processes, interleaved round by round so that load from elsewhere hits all alike:
``simultaneous`` with 1 thread, ``simultaneous`` with 2 threads (the best a single process does on 2 cores), and
``stage_parallel`` with 2 processes of 1 thread each. Throughput is the run's own ``train_img_per_s`` of its last epoch
(images trained / wall time of the epoch's training loop; for ``stage_parallel`` from the first batch on stage 1 to
the last step on stage 2, so the pipeline's fill and drain count), the best of the rounds (load only slows a run).
Targets: stage_parallel >= 1.35x the 2-thread process; against the 1-thread process the ideal is 2x.

Also measured, in this process with 1 thread: one training step of each stage alone (its slice of the backbone, its
head, backward, AdamW step; stage 1 also the batch transform) for the recipe's cut and for the cuts ``balance='time'``
and ``balance='step'`` choose, since the slowest stage caps a pipeline: balanced stages are the precondition of the
speed-up.

``--equivalence`` trains ``recipes/fashion_mnist_quick.yaml`` (4 stages, full Fashion-MNIST) with ``simultaneous``
and with ``stage_parallel`` (4 processes), without and with per-stage randomness (``drop_path_rate`` 0.1), reusing
finished runs in ``--runs-dir``: without randomness the final weights must be equal bit for bit, with it the
validation top-1 after the same epochs within 0.3 points (per-epoch gaps are listed beside those of two seeds of
``simultaneous``, the noise they should be compared with). Timing does not matter there, so any machine will do.

The load average is recorded before and after; a figure taken with load > 0.5 is marked as such. On a GPU
machine stage_parallel needs one GPU per stage (K processes sharing one GPU would measure contention, not the
schedule), so this benchmark runs on CPU only.
"""
import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch

from ._common import RESULTS_ROOT, Runtime, machine_info, markdown_table, new_figure, verdict, write_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, 'recipes', 'fashion_mnist_stage_parallel.yaml')
CONFIGS = [   # (name, schedule, threads per process, processes)
    ('simultaneous_1t', 'simultaneous', 1, 1),
    ('simultaneous_2t', 'simultaneous', 2, 1),
    ('stage_parallel_2x1t', 'stage_parallel', 1, 2),
]
_DEFAULT_OUT = os.path.join(RESULTS_ROOT, 'stage_parallel')
TARGET = 1.35   # stage_parallel images/s over the best single process on the same cores
PROTOCOL = ('each configuration is a real hff-train run of the recipe (its own processes), rounds interleaved; '
            'throughput = the run\'s train_img_per_s of its last epoch (stage_parallel: first batch on stage 1 to last '
            'step on stage 2, fill and drain included), best of the rounds. Stage step = one training step of a stage '
            'alone, 1 thread, median of interleaved rounds after one warm-up round.')
MODES = {   # train images per epoch, epochs (the last is measured), validation images, rounds
    'full': dict(train=12800, epochs=2, val=1000, rounds=3, step_rounds=12),
    'smoke': dict(train=512, epochs=1, val=200, rounds=1, step_rounds=2),
}


def run_once(name: str, schedule: str, threads: int, mode: Dict[str, int], out: str, extra: List[str]) -> float:
    """One ``hff-train`` run; its last epoch's training images per second."""
    args = [sys.executable, '-m', 'timm_hff.train', '--config', RECIPE, '--schedule', schedule, '--threads',
            str(threads), '--epochs', str(mode['epochs']), '--train-num-samples', str(mode['train']),
            '--val-num-samples', str(mode['val']), '--save-model', 'false', '--progress', 'false',
            '--output', out, '--experiment', name] + extra
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ['(no output)']
        raise RuntimeError(f'{name} failed: {tail[0]}')
    with open(os.path.join(out, name, 'metrics.json')) as f:
        return float(json.load(f)['epochs'][-1]['train_img_per_s'])


def throughput(mode: Dict[str, int], extra: List[str]) -> Dict[str, Dict[str, Any]]:
    """Images/s of every configuration, rounds interleaved."""
    runs: Dict[str, List[float]] = {name: [] for name, *_ in CONFIGS}
    tmp = tempfile.mkdtemp(prefix='hff-stage-parallel-bench-')
    try:
        for r in range(mode['rounds']):
            for name, schedule, threads, _ in CONFIGS:
                print(f'  round {r + 1}/{mode["rounds"]}: {name} ...', file=sys.stderr, flush=True)
                runs[name].append(run_once(f'{name}_{r}', schedule, threads, mode, tmp, extra))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: dict(images_per_s=max(v), median_images_per_s=statistics.median(v), rounds=v)
            for name, v in runs.items()}


def stage_step_times(rounds: int, extra_hff: Dict[str, Any]) -> Dict[str, Any]:
    """Milliseconds of one training step of each stage alone (1 thread, interleaved rounds) for the recipe's network
    cut as ``extra_hff`` says."""
    from timm.optim import create_optimizer_v2
    from timm_hff import run_stages
    from timm_hff.data import BatchTransform
    from timm_hff.train import TrainConfig, build_model
    from timm_hff.train.engines.stage_parallel.part import StagePart

    cfg = TrainConfig.from_yaml(RECIPE)
    hff = {**cfg.hff, **extra_hff}
    cfg = TrainConfig.from_dict({**cfg.to_dict(), 'hff': hff})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg, 10).to(memory_format=torch.channels_last)
        size, b = cfg.img_size, cfg.batch_size
        data_cfg = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), input_size=(cfg.in_chans, size, size))
        transform = BatchTransform(data_cfg, True, cfg.aug_config(), channels_last=True)
        images = torch.randint(0, 256, (b, cfg.in_chans, size, size), dtype=torch.uint8)
        labels = torch.randint(0, 10, (b,))
        raw: List[Any] = []
        with torch.no_grad():
            run_stages(model.backbone, model.split, transform(images), raw=raw)
        steps = [_stage_step(copy.deepcopy(model), k, raw, transform, images, labels, size, create_optimizer_v2,
                             StagePart) for k in range(model.num_stages)]
        times: List[List[float]] = [[] for _ in steps]
        for _ in range(rounds + 1):   # the first round warms up
            for k, step in enumerate(steps):
                t = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    med = [statistics.median(t[1:]) * 1000 for t in times]
    return dict(cut=[c for c in model.split.feature_indices], median_ms=med, min_ms=[min(t[1:]) * 1000 for t in times],
                imbalance=max(med) / min(med))


def _stage_step(model, k, raw, transform, images, labels, size, create_optimizer_v2, StagePart):
    owned = {id(p) for p in model.stage_parameters(k)}
    for p in model.parameters():
        p.requires_grad_(id(p) in owned)
    model.train()
    part = StagePart(model, k, (size, size), 'cpu', contextlib.nullcontext, channels_last=True)
    part.install()
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    handed = raw[k - 1].detach() if k else None

    def step():
        h, _ = part.run(transform(images) if k == 0 else handed, images.shape[0])
        loss = model.heads[k].loss(model.heads[k](h), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def render(result: Dict[str, Any], command: str) -> str:
    rows = result['throughput']
    table = markdown_table(['configuration', 'processes x threads', 'img/s (best)', 'img/s (median)', 'rounds'], [
        [name, f'{procs} x {threads}', f"{rows[name]['images_per_s']:.0f}", f"{rows[name]['median_images_per_s']:.0f}",
         ', '.join(f'{v:.0f}' for v in rows[name]['rounds'])] for name, _, threads, procs in CONFIGS])
    t = result['targets']
    ttable = markdown_table(['target', 'measured', 'verdict'], [[x['target'], x['value'], x['verdict']] for x in t])
    cuts = markdown_table(['cut', 'how', 'stage step ms (median)', 'slowest / fastest'], [
        [str(c['cut']), c['how'], ' / '.join(f'{v:.0f}' for v in c['median_ms']), f"{c['imbalance']:.2f}"]
        for c in result['stage_steps']])
    load = result['load']
    quiet = max(load['before'], load['after']) < 0.5
    lines = [f'### Stage-parallel training throughput (`{command}`)', '',
             f"Machine: {result['machine']['cpu']} ({result['machine']['cpu_count']} cores); load average "
             f"{load['before']:.2f} before, {load['after']:.2f} after" + ('' if quiet else
                                                                          ' (NOT idle: figures are indicative only)'),
             '', f"Cut trained by every configuration: {result['cut']['stage_indices']} ({result['cut']['how']})", '',
             table, '', ttable, '', 'One training step of each stage alone (1 thread):', '', cuts, '',
             f'Protocol: {PROTOCOL}']
    return '\n'.join(lines)


QUICK = os.path.join(ROOT, 'recipes', 'fashion_mnist_quick.yaml')
EQUIVALENCE = [   # (run name, schedule, drop_path_rate, seed); the last: how far two seeds of one schedule land apart
    ('simultaneous', 'simultaneous', None, 42), ('stage_parallel', 'stage_parallel', None, 42),
    ('simultaneous_droppath', 'simultaneous', 0.1, 42), ('stage_parallel_droppath', 'stage_parallel', 0.1, 42),
    ('simultaneous_droppath_seed1', 'simultaneous', 0.1, 1),
]
ACCURACY_TOLERANCE = 0.3   # top-1 points after equal epochs, with per-stage randomness


def equivalence(runs_dir: str, out: str) -> Dict[str, Any]:
    """The quick recipe both ways (runs reused when finished): bitwise weights, top-1 per epoch."""
    from safetensors.torch import load_file
    histories, weights = {}, {}
    for name, schedule, drop_path, seed in EQUIVALENCE:
        run = os.path.join(runs_dir, name)
        if not os.path.isfile(os.path.join(run, 'model', 'model.safetensors')):
            print(f'  training {name} ...', file=sys.stderr, flush=True)
            shutil.rmtree(run, ignore_errors=True)
            extra = ['--model-kwargs', f'{{drop_path_rate: {drop_path}}}'] if drop_path else []
            done = subprocess.run([sys.executable, '-m', 'timm_hff.train', '--config', QUICK, '--schedule', schedule,
                                   '--seed', str(seed), '--output', runs_dir, '--experiment', name, '--progress',
                                   'false'] + extra, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f'{name} failed: {(done.stderr.strip() or done.stdout.strip()).splitlines()[-1]}')
        with open(os.path.join(run, 'metrics.json')) as f:
            histories[name] = json.load(f)['epochs']
        weights[name] = load_file(os.path.join(run, 'model', 'model.safetensors'))
        os.makedirs(os.path.join(out, 'runs'), exist_ok=True)
        shutil.copyfile(os.path.join(run, 'metrics.json'), os.path.join(out, 'runs', f'{name}.json'))
    a, b = weights['simultaneous'], weights['stage_parallel']
    differ = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k])) + sorted(set(b) - set(a))

    def gaps(x, y):
        return [abs(p['top1'] - q['top1']) for p, q in zip(histories[x], histories[y])]
    schedules = gaps('simultaneous_droppath', 'stage_parallel_droppath')
    seeds = gaps('simultaneous_droppath', 'simultaneous_droppath_seed1')
    targets = [dict(target='no per-stage randomness: final weights equal simultaneous\'s bit for bit',
                    value=f'{len(a) - len(differ)} of {len(a)} tensors equal', met=not differ),
               dict(target=f'drop_path_rate 0.1: top-1 after equal epochs within {ACCURACY_TOLERANCE} points',
                    value=f'{schedules[-1]:.2f} points', met=schedules[-1] <= ACCURACY_TOLERANCE)]
    for t in targets:
        t['verdict'] = verdict(t['met'])
    return dict(runs={n: [dict(epoch=r['epoch'], top1=r['top1'], train_loss=r['train_loss'],
                               train_img_per_s=r['train_img_per_s']) for r in h] for n, h in histories.items()},
                differing_tensors=differ, top1_gaps_schedules=schedules, top1_gaps_seeds=seeds, targets=targets)


def render_equivalence(result: Dict[str, Any], command: str) -> str:
    runs = result['runs']
    epochs = len(next(iter(runs.values())))
    table = markdown_table(['run', 'schedule', 'drop_path_rate', 'seed'] + [f'top-1 epoch {e + 1}'
                                                                           for e in range(epochs)], [
        [name, schedule, drop_path or 0, seed] + [f"{r['top1']:.2f}" for r in runs[name]]
        for name, schedule, drop_path, seed in EQUIVALENCE])
    gaps = markdown_table(['drop_path_rate 0.1, top-1 gap per epoch', 'points'], [
        ['stage_parallel vs simultaneous (seed 42)', ' / '.join(f'{g:.2f}' for g in result['top1_gaps_schedules'])],
        ['simultaneous seed 42 vs seed 1 (the noise)', ' / '.join(f'{g:.2f}' for g in result['top1_gaps_seeds'])]])
    ttable = markdown_table(['target', 'measured', 'verdict'],
                            [[t['target'], t['value'], t['verdict']] for t in result['targets']])
    return '\n'.join([f'### Stage-parallel vs simultaneous: the same training (`{command}`)', '',
                      f'Recipe: recipes/fashion_mnist_quick.yaml (4 stages, 4 epochs; stage_parallel: 4 processes of 1 '
                      f'thread; validation = the 10k test split). Machine: {result["machine"]["cpu"]}.', '', table,
                      '', gaps, '', ttable])


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--smoke', action='store_true', help='a few steps of everything (checks that it runs)')
    parser.add_argument('--out', default=_DEFAULT_OUT, help='output folder')
    parser.add_argument('--data-dir', default=None, help="Fashion-MNIST IDX folder (default: the recipe's)")
    parser.add_argument('--cut', choices=('step', 'recipe'), default='step',
                        help="the cut all three configurations train: the one balance='step' picks (default) or the "
                             "recipe's own stage_indices")
    parser.add_argument('--equivalence', action='store_true',
                        help='instead: the quick recipe with simultaneous and stage_parallel, same values?')
    parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'output', 'stage_parallel_equivalence'),
                        help='--equivalence: where the four runs are (finished ones are reused)')
    args = parser.parse_args(argv)
    command = ('python -m benchmarks.stage_parallel ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()
    info = machine_info(Runtime(torch.device('cpu'), amp=False, channels_last=True))
    if args.equivalence:
        out = args.out if args.out != _DEFAULT_OUT else os.path.join(RESULTS_ROOT, 'stage_parallel_equivalence')
        result = dict(equivalence(args.runs_dir, out), benchmark='stage_parallel_equivalence', command=command,
                      machine=info)
        md = render_equivalence(result, command)
        paths = write_outputs(out, md, result)
        print(md)
        print(f"\n(wrote {', '.join(paths.values())})")
        return result
    mode = MODES['smoke' if args.smoke else 'full']
    extra = ['--data-dir', args.data_dir] if args.data_dir else []
    before = os.getloadavg()[0]
    print('measuring each stage\'s step time ...', file=sys.stderr, flush=True)
    steps = [dict(stage_step_times(mode['step_rounds'], {}), how='the recipe (measured per stage)'),
             dict(stage_step_times(mode['step_rounds'], dict(stage_indices=None, balance='time', num_stages=2)),
                  how="balance='time', num_stages=2"),
             dict(stage_step_times(mode['step_rounds'], dict(stage_indices=None, balance='step', num_stages=2)),
                  how="balance='step', num_stages=2 (at the run's batch, channels_last)")]
    cut = steps[0]['cut'] if args.cut == 'recipe' else steps[2]['cut']
    extra += ['--hff', json.dumps(dict(stage_indices=cut))]   # every configuration trains the same cut
    print(f'training runs on the cut {cut} ...', file=sys.stderr, flush=True)
    rows = throughput(mode, extra)
    after = os.getloadavg()[0]
    sp, one, two = (rows[n]['images_per_s'] for n in ('stage_parallel_2x1t', 'simultaneous_1t', 'simultaneous_2t'))
    targets = [dict(target=f'stage_parallel 2 x 1 thread >= {TARGET}x simultaneous 1 x 2 threads',
                    value=f'{sp / two:.2f}x', met=sp / two >= TARGET),
               dict(target='stage_parallel 2 x 1 thread vs simultaneous 1 x 1 thread (ideal 2x)',
                    value=f'{sp / one:.2f}x', met=None)]
    for t in targets:
        t['verdict'] = verdict(t['met']) if t['met'] is not None else '-'
    result = dict(benchmark='stage_parallel', mode='smoke' if args.smoke else 'full', command=command, machine=info,
                  load=dict(before=before, after=after), recipe=os.path.relpath(RECIPE, ROOT), settings=mode,
                  throughput=rows, targets=targets, stage_steps=steps, cut=dict(how=args.cut, stage_indices=cut),
                  speedup=dict(vs_2_threads=sp / two, vs_1_thread=sp / one))
    md = render(result, command)
    paths = write_outputs(args.out, md, result, _plot(rows))
    print(md)
    print(f"\n(wrote {', '.join(paths.values())})")
    return result


def _plot(rows):
    fig, (ax,) = new_figure(width=6.0)
    names = [n for n, *_ in CONFIGS]
    ax.bar(range(len(names)), [rows[n]['images_per_s'] for n in names], color=['#999', '#666', '#2a7'])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(['1 process\n1 thread', '1 process\n2 threads', '2 stage processes\n1 thread each'])
    ax.set_ylabel('training images / s (best round)')
    ax.set_title('stage_parallel on 2 cores')
    return fig


if __name__ == '__main__':
    main()
