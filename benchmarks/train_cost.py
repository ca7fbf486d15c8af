"""Training cost: step time and peak memory of HFF (simultaneous, memory_efficient) vs backprop variants.

    python -m benchmarks.train_cost --quick           # narrow ResNet-18 @ 28 px, ResNet-50 @ 112 px, CPU
    python -m benchmarks.train_cost                   # ResNet-18 @ 32 px (small-input stem), ResNet-50 @ 224 px
    python -m benchmarks.train_cost --device cuda     # GPU: bf16 autocast, channels_last, CUDA events

Methods, all on one backbone and one batch: HFF ``simultaneous`` (sum of stage losses, one backward), HFF
``memory_efficient`` (each stage's backward as soon as it has run), HFF ``memory_efficient`` with gradient
checkpointing inside the stages (each head's backward recomputes its stage's checkpointed blocks), BP (timm
classifier, cross-entropy), BP with timm's gradient checkpointing, BP with gradient accumulation (4 micro-batches,
equal effective batch). One optimiser (SGD, momentum 0.9) for all. Two memory-only diagnostic rows: HFF's stage 1
trained alone (the floor of ``memory_efficient``'s peak, since that mode holds one stage's graph at a time), and
``memory_efficient`` with ``aux='none'`` (heads pool first, so no full-resolution aux activations).

``--cuda-graphs`` (CUDA only) adds three time-only rows whose whole step (zero_grad, forward, backward, SGD step) is
captured once as a CUDA graph and replayed (``timm_hff.train.engines.cuda_graphs.CapturedStep``, what ``hff-train
cuda_graphs: true`` uses): HFF simultaneous, HFF memory_efficient on the balanced cut, and BP. Their SGD is torch's
fused one (a graph needs the optimizer step on the device) and autocast runs without its weight-cast cache; each is
compared with BP's captured step.

Step time: every method's model is built in one process and timed in interleaved rounds (so load from other
processes hits all alike); the fastest step is reported (load only adds time), the median is in the JSON.
Peak memory: on CPU each method runs in a fresh subprocess (glibc told to mmap every allocation >= 64 KiB, so
freed tensors leave the resident set), the peak resident set (VmHWM, reset after set-up) minus the resident set
after set-up; on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated memory after set-up, one method
alive at a time. Set-up = model, optimiser state and batch in memory, one warm-up step done, gradients freed;
so the peak counts activations, gradients and workspaces.
"""
import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import torch

from ._common import (ACCUM_DEFAULT, BALANCED_STAGES, METHOD_LABELS, ROWS, add_common_args, build_for_method, get_spec,
                      machine_info, machine_line, make_runtime, make_train_step, markdown_table, median, method_label,
                      mode_of, new_figure, split_accum, time_calls, verdict, write_outputs)

# mode -> [(preset, batch)]
SIZES = {
    'quick': [('tiny_resnet_28', 64), ('resnet50_112', 8)],
    'full': [('resnet18_32', 64), ('resnet50_224', 16)],
    'cuda': [('resnet18_32', 512), ('resnet50_224', 128)],
}
# mode -> (warm-up steps, interleaved rounds, steps per round)
STEPS = {'quick': (1, 3, 1), 'full': (1, 3, 1), 'cuda': (5, 3, 10)}
TIMING_S = {'quick': 20.0, 'full': 90.0, 'cuda': 0.0}   # keep adding rounds until this long (CPU noise)
MAX_ROUNDS = 12
METHODS = ('hff_simultaneous', 'hff_memory_efficient', 'hff_me_ckpt', 'hff_balanced', 'hff_balanced_ckpt',
           'hff_balanced_cheap', 'hff_compiled', 'bp', 'bp_ckpt', 'bp_accum')
DIAGNOSTICS = ('hff_stage1', 'hff_me_noaux')   # memory only: HFF's stage 1 alone; memory_efficient with aux='none'
# --cuda-graphs: time-only rows, the whole step (zero_grad, forward, backward, fused SGD step) captured as one CUDA
# graph and replayed (timm_hff.train.engines.cuda_graphs.CapturedStep); BP captured the same way: their ratio is
# like with like
GRAPHED = {name: row.graphed for name, row in ROWS.items() if row.graphed}
GRAPHED_TARGETS = {'hff_simultaneous_graphed': 1.15, 'hff_balanced_graphed': 1.3}   # x BP's captured step
ACCUM_STEPS = ACCUM_DEFAULT   # micro-batches of the plain 'bp_accum' row (split_accum)
# --frontier (issue 35): every BP memory technique beside HFF's settings, for the memory / time Pareto set
FRONTIER = ('bp', 'bp_ckpt', 'bp_accum2', 'bp_accum4', 'bp_accum8', 'bp_ckpt_accum4', 'hff_simultaneous',
            'hff_memory_efficient', 'hff_balanced', 'hff_balanced_cheap', 'hff_balanced_ckpt',
            'hff_balanced_cheap_accum2', 'hff_balanced_cheap_accum4')
TIME_TARGET = 1.15        # HFF simultaneous (and balanced memory_efficient) step time <= 1.15x BP
MEMORY_TARGET = 0.45      # HFF memory_efficient peak <= 0.45x BP (4+ stages), and below BP + checkpointing
CKPT_MEMORY_TARGET = 0.3  # the balanced cut with checkpointing as well
MALLOC_ENV = dict(MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')


def _setup(method: str, preset: str, batch: int, runtime, seed: int):
    spec = get_spec(preset)
    torch.manual_seed(seed)
    base = GRAPHED.get(method, method)
    model = runtime.model(build_for_method(base, spec, num_classes=10).train())
    import timm.optim
    fused = {}
    if method in GRAPHED:   # the fused SGD step, which a graph can hold; autocast without its weight-cast cache
        from timm_hff.train.engines.cuda_graphs import optimizer_kwargs
        fused = optimizer_kwargs('sgd', runtime.device.type)
        runtime = dataclasses.replace(runtime, autocast_cache=False)
    opt = timm.optim.create_optimizer_v2(model, 'sgd', lr=0.01, momentum=0.9, weight_decay=1e-4, **fused)
    x = runtime.input(torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size))
    y = torch.randint(0, 10, (batch,), device=runtime.device)
    step = make_train_step(base, model, opt, runtime, accum_steps=ACCUM_STEPS)
    if method in GRAPHED:
        from timm_hff.train.engines.cuda_graphs import CapturedStep
        captured, eager = CapturedStep(opt, list(model.parameters()), runtime.device), step

        def step(x, y):   # warm-up steps, then the capture, then replays
            return captured(eager, (x, y))
    return model, opt, step, x, y


# ----- memory -----
def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')   # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_memory(method: str, preset: str, batch: int, runtime, seed: int, steps: int = 1) -> Dict[str, Any]:
    """Peak memory of ``steps`` training steps above the post-set-up level, in MiB (run in a fresh process on CPU)."""
    model, opt, step, x, y = _setup(method, preset, batch, runtime, seed)
    step(x, y)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if runtime.is_cuda:
        runtime.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(runtime.device)
        torch.cuda.reset_peak_memory_stats(runtime.device)
        for _ in range(steps):
            step(x, y)
        runtime.sync()
        peak = torch.cuda.max_memory_allocated(runtime.device)
        out = dict(peak_mib=(peak - base) / 2 ** 20, total_peak_mib=peak / 2 ** 20, base_mib=base / 2 ** 20,
                   how='torch.cuda.max_memory_allocated')
    else:
        reset = _reset_peak_rss()
        base = _rss_kib('VmRSS')
        for _ in range(steps):
            step(x, y)
        if reset:
            peak, how = _rss_kib('VmHWM'), 'VmHWM (reset via clear_refs)'
        else:   # no clear_refs: lifetime peak (set-up transients included)
            import resource
            peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'ru_maxrss'
        out = dict(peak_mib=(peak - base) / 1024, total_peak_mib=peak / 1024, base_mib=base / 1024, how=how)
    del model, opt, step
    gc.collect()
    if runtime.is_cuda:
        torch.cuda.empty_cache()
    return out


def memory_in_subprocess(method: str, preset: str, batch: int, args) -> Dict[str, Any]:
    job = dict(method=method, preset=preset, batch=batch, seed=args.seed, threads=args.threads)
    env = {**os.environ, **MALLOC_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.train_cost', '--worker', json.dumps(job)],
                          cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ['(no output)']
        raise RuntimeError(f'memory worker for {method} on {preset} failed: {tail[0]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    if job.get('threads'):
        torch.set_num_threads(int(job['threads']))
    from ._common import Runtime
    runtime = Runtime(torch.device('cpu'), amp=False, channels_last=False)
    print(json.dumps(measure_memory(job['method'], job['preset'], int(job['batch']), runtime, int(job['seed']))))


# ----- profile: where the activations are -----
def saved_activation_profile(preset: str, batch: int, runtime, seed: int) -> Dict[str, Any]:
    """MiB of activations autograd saves for backward, per HFF stage (backbone slice + its head) and for BP.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` over unique storages during one training forward,
    parameters left out (their gradients are listed apart: ``stage_param_mib``, ``bp_param_mib``). Always in fp32:
    under autocast the saved bf16 copies of weights would pass for activations; the shares are what matter.
    memory_efficient mode holds one stage's saved tensors at a time, so the largest stage's share of BP's total
    is (up to gradients and workspaces) the lowest peak ratio it can reach.
    """
    from timm_hff import run_stages
    import torch.nn.functional as F
    spec = get_spec(preset)
    torch.manual_seed(seed)
    x = runtime.input(torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size))
    y = torch.randint(0, 10, (batch,), device=runtime.device)
    owner: Dict[int, Any] = {}     # storage -> the bucket that saved it first
    sizes: Dict[int, int] = {}
    cur: List[Any] = [('stage', 0)]
    params: set = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in owner:   # weights saved for backward are parameters, not activations
            owner[ptr], sizes[ptr] = cur[0], t.untyped_storage().nbytes()
        return t

    def mib(key) -> float:
        return sum(sizes[p] for p, k in owner.items() if k == key) / 2 ** 20

    hff = runtime.model(build_for_method('hff_simultaneous', spec, 10).train())
    params.update(p.untyped_storage().data_ptr() for p in hff.parameters())
    param_mib = [sum(p.numel() * p.element_size() for p in hff.stage_parameters(k)) / 2 ** 20
                 for k in range(hff.num_stages)]

    def on_stage(k, h):
        cur[0] = ('head', k)
        hff.heads[k](h)
        cur[0] = ('stage', k + 1)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_stages(hff.backbone, hff.split, x, on_stage=on_stage)
    heads = [mib(('head', k)) for k in range(hff.num_stages)]
    stages = [mib(('stage', k)) + heads[k] for k in range(hff.num_stages)]
    hff = None   # free it before BP is built
    bp = runtime.model(build_for_method('bp', spec, 10).train())
    params.clear()
    params.update(p.untyped_storage().data_ptr() for p in bp.parameters())
    bp_param_mib = sum(p.numel() * p.element_size() for p in bp.parameters()) / 2 ** 20
    owner.clear()
    cur[0] = 'bp'
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(bp(x), y)
    bp_total = mib('bp')
    del bp
    return dict(stage_saved_mib=stages, head_saved_mib=heads, bp_saved_mib=bp_total,
                stage_share_of_bp=[v / bp_total for v in stages], head_share_of_bp=[v / bp_total for v in heads],
                stage_param_mib=param_mib, bp_param_mib=bp_param_mib)


# ----- FLOPs: the noise-free part of the step-time comparison -----
FLOP_BATCH = 4   # smallest batch the accumulation baseline can split


def train_flops_per_image(method: str, preset: str, runtime, seed: int) -> float:
    """FLOPs of one training step (forward + backward, convolutions and matmuls) per image, by FlopCounterMode.

    Norms, activations and the optimiser are not counted: the ratio to BP isolates the heads' extra compute and
    what the cut saves (no input gradient at a stage boundary).
    """
    from torch.utils.flop_counter import FlopCounterMode
    model, opt, step, x, y = _setup(method, preset, FLOP_BATCH, runtime, seed)
    counter = FlopCounterMode(display=False)
    with counter:
        step(x, y)
    return counter.get_total_flops() / FLOP_BATCH


# ----- time -----
def measure_times(methods: List[str], preset: str, batch: int, runtime, seed: int, mode: str,
                  timing_s: float) -> Dict[str, float]:
    warmup, rounds, per_round = STEPS[mode]
    setups = {m: _setup(m, preset, batch, runtime, seed) for m in methods}
    fns = {m: (lambda s=s: s[2](s[3], s[4])) for m, s in setups.items()}
    from timm_hff.train.engines.cuda_graphs import WARMUP_STEPS
    for m, fn in fns.items():   # a captured row: its warm-up steps, the capture and a replay before timing
        for _ in range(max(warmup, WARMUP_STEPS + 2) if m in GRAPHED else warmup):
            fn()
    times: Dict[str, List[float]] = {m: [] for m in methods}
    start, done = time.perf_counter(), 0
    while done < rounds or (time.perf_counter() - start < timing_s and done < MAX_ROUNDS):
        for m, fn in fns.items():
            times[m] += time_calls(fn, runtime, warmup=0, iters=per_round)
        done += 1
    del setups, fns
    gc.collect()
    if runtime.is_cuda:
        torch.cuda.empty_cache()
    return {m: (min(t), median(t)) for m, t in times.items()}   # best of: load from others only adds time


def run_model(preset: str, batch: int, methods: List[str], runtime, args, mode: str) -> List[Dict[str, Any]]:
    spec = get_spec(preset)
    print(f'  {preset}: timing {len(methods)} methods ...', file=sys.stderr, flush=True)
    timing_s = TIMING_S[mode] if args.timing_seconds is None else args.timing_seconds
    times = measure_times(methods, preset, batch, runtime, args.seed, mode, timing_s)
    # FLOPs per image: a row's micro-batches do its base row's work in pieces (and FLOP_BATCH is below their count)
    flops = {m: train_flops_per_image(split_accum(GRAPHED.get(m, m))[0], preset, runtime, args.seed) for m in methods}
    rows = []
    all_methods = [m for m in methods if m not in GRAPHED] + list(DIAGNOSTICS)   # captured rows: time only
    print(f'  {preset}: memory of {len(all_methods)} configurations ...', file=sys.stderr, flush=True)
    if runtime.is_cuda:   # one process, one method alive at a time
        mems = [measure_memory(m, preset, batch, runtime, args.seed) for m in all_methods]
    else:   # each process measures only its own resident set, so the workers may run side by side
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
            mems = list(pool.map(lambda m: memory_in_subprocess(m, preset, batch, args), all_methods))
    mems = dict(zip(all_methods, mems))
    for m in [m for m in methods if m in GRAPHED]:
        mems[m] = dict(peak_mib=None, total_peak_mib=None, base_mib=None, how='not measured (captured step)')
    for m, mem in mems.items():
        rows.append(dict(model=preset, spec=spec.describe(), method=m, label=method_label(m), batch=batch,
                         micro_batch=batch // split_accum(m)[1],
                         step_s=times[m][0] if m in times else None, median_step_s=times[m][1] if m in times else None,
                         images_per_s=batch / times[m][0] if m in times else None,
                         train_gflops_per_image=flops[m] / 1e9 if m in flops else None, **mem))
    profile = saved_activation_profile(preset, batch, runtime, args.seed)
    by = {r['method']: r for r in rows}
    for r in rows:   # a captured row against BP's captured step
        bp = by.get('bp_graphed' if r['method'] in GRAPHED else 'bp')
        r['time_vs_bp'] = r['step_s'] / bp['step_s'] if bp and r['step_s'] and bp['step_s'] else None
        r['flops_vs_bp'] = (r['train_gflops_per_image'] / bp['train_gflops_per_image']
                            if bp and r['train_gflops_per_image'] else None)
        r['memory_vs_bp'] = (r['peak_mib'] / bp['peak_mib'] if bp and r['peak_mib'] is not None and bp['peak_mib']
                             and bp['peak_mib'] > 0 else None)
    return rows, profile


def targets(rows: List[Dict[str, Any]], num_stages: Dict[str, int]) -> List[Dict[str, Any]]:
    out = []
    for model in dict.fromkeys(r['model'] for r in rows):
        by = {r['method']: r for r in rows if r['model'] == model}
        if 'bp' not in by:
            continue
        if 'hff_simultaneous' in by:
            ratio, fl = by['hff_simultaneous']['time_vs_bp'], by['hff_simultaneous']['flops_vs_bp']
            out.append(dict(model=model, target=f'HFF simultaneous step time <= {TIME_TARGET}x BP',
                            value=f'{ratio:.2f}x (FLOPs {fl:.2f}x)', met=ratio <= TIME_TARGET, flops_ratio=fl))
        if 'hff_compiled' in by:
            ratio, fl = by['hff_compiled']['time_vs_bp'], by['hff_compiled']['flops_vs_bp']
            out.append(dict(model=model, target=f'HFF simultaneous, torch.compile step time <= {TIME_TARGET}x BP',
                            value=f'{ratio:.2f}x', met=ratio <= TIME_TARGET, flops_ratio=fl))
        for g, limit in GRAPHED_TARGETS.items():
            if g in by and 'bp_graphed' in by and by[g]['time_vs_bp']:
                ratio = by[g]['time_vs_bp']
                out.append(dict(model=model, target=f"{METHOD_LABELS[g]} step time <= {limit}x BP's captured step",
                                value=f'{ratio:.2f}x', met=ratio <= limit, flops_ratio=by[g]['flops_vs_bp']))
        for me in ('hff_balanced', 'hff_balanced_cheap'):
            if me in by:
                ratio, fl = by[me]['time_vs_bp'], by[me]['flops_vs_bp']
                out.append(dict(model=model, target=f'{METHOD_LABELS[me]} step time <= {TIME_TARGET}x BP',
                                value=f'{ratio:.2f}x (FLOPs {fl:.2f}x)', met=ratio <= TIME_TARGET, flops_ratio=fl))
        for me in ('hff_memory_efficient', 'hff_me_ckpt', 'hff_balanced', 'hff_balanced_ckpt', 'hff_balanced_cheap'):
            if me not in by:
                continue
            label = METHOD_LABELS[me]
            ratio = by[me]['memory_vs_bp']
            limit = CKPT_MEMORY_TARGET if me == 'hff_balanced_ckpt' else MEMORY_TARGET
            stages = BALANCED_STAGES if me.startswith('hff_balanced') else num_stages[model]
            out.append(dict(model=model, target=f'{label} peak <= {limit}x BP ({stages} stages)',
                            value=f'{ratio:.2f}x', met=ratio <= limit))
            if 'bp_ckpt' in by:
                mib, ck = by[me]['peak_mib'], by['bp_ckpt']['peak_mib']
                out.append(dict(model=model, target=f'{label} peak < BP + checkpointing',
                                value=f'{mib:.0f} vs {ck:.0f} MiB', met=mib < ck))
    return out


def render(rows, tgts, info, command, stage_share, profiles) -> str:
    headers = ['model', 'method', 'batch (micro)', 'step ms', 'img/s', 'time vs BP', 'FLOPs vs BP', 'peak MiB',
               'memory vs BP']
    table = markdown_table(headers, [
        [r['model'], r['label'], f"{r['batch']} ({r['micro_batch']})",
         f"{r['step_s'] * 1000:.1f}" if r['step_s'] else '-',
         f"{r['images_per_s']:.1f}" if r['images_per_s'] else '-',
         f"{r['time_vs_bp']:.2f}x" if r['time_vs_bp'] else '-',
         f"{r['flops_vs_bp']:.2f}x" if r['flops_vs_bp'] else '-',
         f"{r['peak_mib']:.1f}" if r['peak_mib'] is not None else '-',
         f"{r['memory_vs_bp']:.2f}x" if r['memory_vs_bp'] is not None else '-'] for r in rows])
    ttable = markdown_table(['model', 'target', 'measured', 'verdict'],
                            [[t['model'], t['target'], t['value'], verdict(t['met'])] for t in tgts])
    specs = sorted({f"- {r['model']}: {r['spec']}" for r in rows})
    notes = []
    for model, share in stage_share.items():
        prof = profiles.get(model)
        split = ', '.join(f'{v:.2f}' for v in prof['stage_share_of_bp']) if prof else '?'
        grads = (f" (the heads' part: {', '.join(f'{v:.2f}' for v in prof['head_share_of_bp'])}); gradients: "
                 f"{prof['bp_param_mib']:.0f} MiB for BP, {sum(prof['stage_param_mib']):.0f} MiB for HFF, against "
                 f"BP's {prof['bp_saved_mib']:.0f} MiB of activations" if prof else '')
        noaux = [r for r in rows if r['model'] == model and r['method'] == 'hff_me_noaux']
        noaux = (f" With aux='none' (pool, then project) memory_efficient peaks at {noaux[0]['memory_vs_bp']:.2f}x BP."
                 if noaux and noaux[0]['memory_vs_bp'] is not None else '')
        notes.append(f'- {model}: activations saved for backward per HFF stage (backbone slice + head), as a '
                     f'share of BP\'s: {split}{grads}. Training stage 1 alone peaks at {share:.2f}x BP: '
                     f'memory_efficient holds one stage\'s graph at a time (plus the gradients of the stages done), '
                     f'so the largest stage sets its floor.{noaux}')
    missed = [t for t in tgts if not t['met']]
    lines = [f'### Training cost (`{command}`)', '', f'Machine: {machine_line(info)}', '', table, '', ttable, '',
             *specs, '']
    lines += ['Where the activations are:', *notes, '']
    if missed:
        bp_ms = {r['model']: r['step_s'] * 1000 for r in rows if r['method'] == 'bp' and r['step_s']}
        lines += ['Why targets are missed:', *_why(missed, cuda='gpu' in info, bp_ms=bp_ms), '']
    lines += ['Protocol: ' + PROTOCOL_SHORT.format(memory=info['memory_protocol'])]
    return '\n'.join(lines)


def _why(missed, cuda: bool = False, bp_ms=None):
    out = []
    for t in missed:
        if 'step time' not in t['target']:
            continue
        what = f"{t['model']}, {t['target'].split(' step time')[0]}"
        bp = f" (BP's whole step: {bp_ms[t['model']]:.1f} ms)" if bp_ms and t['model'] in bp_ms else ''
        if 'CUDA graph' in t['target']:
            out.append(f"- Step time ({what}): {t['value']} of BP's captured step (eager FLOPs "
                       f"{t['flops_ratio']:.2f}x): "
                       f"with both steps replayed as one graph the launch cost is gone from both, so what is left is "
                       f"the kernels themselves: HFF's heads are small kernels at the stages' resolutions that keep "
                       f"the GPU below full occupancy, and they run one after another. What would close it: running "
                       f"stages on their own CUDA streams inside the graph (stage k's backward beside stage k+1's "
                       f"forward), or fewer, larger head kernels; not built.")
        elif cuda and 'torch.compile' in t['target']:
            out.append(f"- Step time ({what}): {t['value']} (eager FLOPs {t['flops_ratio']:.2f}x BP): compiled "
                       f"block by block (the cuts stay eager, timm_hff._compile), so each block and head is its own "
                       f"small graph with its own guards and launches, and a step this short{bp} is bound by launches, "
                       f"not math. "
                       f"What would close it: CUDA graphs over the whole step (torch.compile mode 'reduce-overhead' "
                       f"or torch.cuda.graphs); not tried (capturing a step through the cut hooks is untested).")
        elif cuda and t['flops_ratio'] <= TIME_TARGET:
            out.append(f"- Step time ({what}): HFF's training FLOPs are {t['flops_ratio']:.2f}x BP's, so the measured "
                       f"{t['value'].split()[0]} is what FLOPs leave out: a step this short{bp} is bound by kernel "
                       f"launches and memory traffic, and HFF runs more, smaller kernels (each stage's head: aux "
                       f"block, norm, activation, projection, prototype loss; memory_efficient adds one backward per "
                       f"stage). "
                       f"What would close it: fewer launches (CUDA graphs, fused heads) or larger per-step work; not "
                       f"tried.")
        elif 'torch.compile' in t['target']:
            out.append(f"- Step time ({what}): {t['value']} with the eager model's FLOPs ({t['flops_ratio']:.2f}x BP): "
                       f"compiled block by block (the cuts stay eager, timm_hff._compile), torch.compile's CPU code "
                       f"was slower than eager here; the eager row is the one to use on CPU.")
        elif t['flops_ratio'] <= TIME_TARGET:
            out.append(f"- Step time ({what}): HFF's training FLOPs are {t['flops_ratio']:.2f}x BP's (within the "
                       f"target), so the measured {t['value'].split()[0]} comes from what FLOPs leave out (the heads' "
                       f"norms and activations, hooks) or from timing noise on this shared machine; medians per "
                       f"method are in the JSON.")
        else:
            out.append(f"- Step time ({what}): HFF's training FLOPs are already {t['flops_ratio']:.2f}x BP's: "
                       f"each intermediate stage's aux head (1x1 conv + norm + ReLU at the stage's width and "
                       f"resolution) runs forward and backward, and a finer cut has more of them; a narrower aux "
                       f"(`aux_channels`), an aux block on a pooled map (`aux_size`) or `aux='none'` (pool, then "
                       f"project) removes most of it.")
    if any('balanced cut' in t['target'] and 'checkpointing' not in t['target'] and 'peak <=' in t['target']
           for t in missed):
        out.append('- Memory (balanced cut): a balanced cut is no finer than one block (a cut inside a residual block '
                   'is refused), so the largest block\'s saved activations, plus the gradients of every stage (as '
                   'many as BP\'s), are its floor; with a small-input stem the first blocks run at full resolution.')
    if any('balanced cut + checkpointing peak <=' in t['target'] for t in missed):
        out.append('- Memory (balanced cut + checkpointing): a balanced cut gives each stage one to three blocks, and '
                   'checkpointing inside a stage that small saves only the stored inputs of its other blocks (the '
                   'block recomputed in backward holds its full activations again), so this row stays close to the '
                   'balanced row without checkpointing.')
    if any('peak' in t['target'] and 'balanced' not in t['target'] for t in missed):
        out.append('- Memory: memory_efficient alone cannot peak below its largest stage (that stage\'s saved '
                   'activations, the gradients of the stages already done, and gradient buffers at that stage\'s '
                   'resolution; see "stage 1 alone"). A ResNet cut at its reduction levels keeps most activations in '
                   'the high-resolution stage 1 (stem + layer1), even more so with the small-input stem. With '
                   'checkpointing inside the stages (memory_efficient + checkpointing) stage 1 keeps only its block '
                   'inputs and the stem\'s activations (timm does not checkpoint stems; timm_hff checkpoints a '
                   'small-input stem that is a multi-layer container, such as a deep stem, but not a single conv with '
                   'its norm and activation); its peak is then one block recomputed in backward at full resolution on '
                   'top of those, the same floor BP + checkpointing has, without BP\'s other block inputs. Where that '
                   'floor is above the target (a small-input stem at full resolution) what would lower it: a narrower '
                   'first stage, or a single-conv stem checkpointed with its norm and activation (not built).')
    return out


PROTOCOL_SHORT = ('step time = fastest of >= 3 interleaved rounds (all methods in one process; on CPU more rounds '
                  'until 20 s (quick) / 90 s (full) have passed) of one optimiser step '
                  '(zero_grad, forward, backward, SGD step), after warm-up. Peak memory = {memory}, above the '
                  'post-set-up level (model, SGD state and batch in memory, gradients freed), over one step.')


def plot(rows):
    models = list(dict.fromkeys(r['model'] for r in rows))
    fig, axes = new_figure(ncols=len(models), width=6.0)
    for ax, model in zip(axes, models):
        rs = [r for r in rows if r['model'] == model and r['step_s'] and r['peak_mib'] is not None]
        for r in rs:
            hff = r['method'].startswith('hff')
            ax.scatter(r['step_s'] * 1000, r['peak_mib'], s=40, marker='o' if hff else 's',
                       facecolors=('C0' if hff else 'C1') if r.get('on_frontier') else 'none',
                       edgecolors='C0' if hff else 'C1')
            ax.annotate(r['label'], (r['step_s'] * 1000, r['peak_mib']), fontsize=7, xytext=(4, 2),
                        textcoords='offset points')
        front = sorted((r for r in rs if r.get('on_frontier')), key=lambda r: r['step_s'])
        if len(front) > 1:   # the Pareto set (filled: on it; circles HFF, squares BP)
            ax.step([r['step_s'] * 1000 for r in front], [r['peak_mib'] for r in front], where='post', color='0.6',
                    lw=1, zorder=0)
        ax.set_xlabel('step time (ms)')
        ax.set_ylabel('peak training memory above set-up (MiB)')
        ax.set_title(model)
        ax.set_ylim(bottom=0)
    return fig


def _method_name(name: str) -> str:
    base, _ = split_accum(name)
    if base not in METHODS + ('ff',) + tuple(GRAPHED) or (name != base and base in GRAPHED):
        raise argparse.ArgumentTypeError(f"unknown row {name!r}: one of {', '.join(METHODS)}, ff, "
                                         f"{', '.join(GRAPHED)}, or '<row>_accum<N>' (N micro-batches)")
    return name


def pareto(rows: List[Dict[str, Any]]) -> None:
    """Mark each timed and measured row of a model ``on_frontier`` (no other row of that model has less or equal
    memory and step time, one of them less) or name the row that dominates it (``dominated_by``)."""
    for model in dict.fromkeys(r['model'] for r in rows):
        rs = [r for r in rows if r['model'] == model and r['step_s'] and r['peak_mib'] is not None]
        for r in rs:
            better = [o for o in rs if o is not r and o['step_s'] <= r['step_s'] and o['peak_mib'] <= r['peak_mib']
                      and (o['step_s'] < r['step_s'] or o['peak_mib'] < r['peak_mib'])]
            r['on_frontier'] = not better
            r['dominated_by'] = min(better, key=lambda o: o['step_s'])['label'] if better else None


def frontier_md(rows: List[Dict[str, Any]]) -> List[str]:
    """Per model: the Pareto set in memory order, and whether an HFF setting is on it."""
    md = []
    for model in dict.fromkeys(r['model'] for r in rows):
        rs = [r for r in rows if r['model'] == model and r.get('on_frontier') is not None]
        md += [f'**{model}, the memory / step-time frontier** (a row is on it when no other row has both less or '
               f'equal memory and less or equal time):', '',
               '| method | peak MiB | step ms | on the frontier | dominated by |', '|---|---|---|---|---|']
        for r in sorted(rs, key=lambda r: r['peak_mib']):
            md.append(f"| {r['label']} | {r['peak_mib']:.1f} | {r['step_s'] * 1000:.1f} | "
                      f"{'yes' if r['on_frontier'] else 'no'} | {r['dominated_by'] or '-'} |")
        hff = [r['label'] for r in rs if r['method'].startswith('hff') and r['on_frontier']]
        md += ['', 'HFF on the frontier: ' + (', '.join(hff) if hff else 'none: every HFF setting is dominated'), '']
    return md


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, 'train_cost')
    parser.add_argument('--models', nargs='+', default=None, help="presets as NAME or NAME:BATCH")
    parser.add_argument('--methods', nargs='+', default=list(METHODS), type=_method_name,
                        help=f"rows: {', '.join(list(METHODS) + ['ff'] + list(GRAPHED))}; '<row>_accum<N>' steps "
                             f"once after N micro-batches")
    parser.add_argument('--frontier', action='store_true',
                        help='every BP memory technique (checkpointing, accumulation at 2 / 4 / 8 micro-batches, '
                             'both) beside HFF\'s settings (with micro-batches too): the memory / time Pareto set')
    parser.add_argument('--timing-seconds', type=float, default=None,
                        help="keep adding timing rounds until this long per model (default: the mode's)")
    parser.add_argument('--memory-jobs', type=int, default=2,
                        help='CPU memory workers run side by side (each measures only its own process)')
    parser.add_argument('--cuda-graphs', action='store_true',
                        help="add rows with the whole step captured as a CUDA graph: HFF simultaneous, balanced "
                             "memory_efficient and BP (fused SGD; CUDA only)")
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker)
        return {}
    if args.frontier:
        args.methods = list(FRONTIER)
    if args.cuda_graphs:
        args.methods = list(dict.fromkeys(list(args.methods) + list(GRAPHED)))
    if any(m in GRAPHED for m in args.methods) and args.device.split(':')[0] != 'cuda':
        parser.error(f'--cuda-graphs captures the step as CUDA graphs, but --device is {args.device}: add '
                     f'--device cuda or drop --cuda-graphs')
    if args.memory_jobs < 1:
        parser.error(f'--memory-jobs must be >= 1, got {args.memory_jobs}')
    runtime = make_runtime(args)
    mode = mode_of(args)
    from .inference import parse_model
    models = SIZES[mode] if args.models is None else [parse_model(m, SIZES[mode], parser) for m in args.models]
    for preset, batch in models:
        most = max(split_accum(m)[1] for m in args.methods)
        if batch < most:
            parser.error(f'batch {batch} of {preset} is below the {most} accumulation micro-batches')
    info = machine_info(runtime)
    info['memory_protocol'] = ('torch.cuda.max_memory_allocated, one method alive at a time' if runtime.is_cuda else
                               'peak resident set (VmHWM after clear_refs) of a fresh subprocess per method, '
                               'MALLOC_MMAP_THRESHOLD_=65536')
    rows, num_stages, stage_share, profiles = [], {}, {}, {}
    for preset, batch in models:
        rs, profiles[preset] = run_model(preset, batch, list(args.methods), runtime, args, mode)
        rows += rs
        num_stages[preset] = len(profiles[preset]['stage_saved_mib'])
        diag = [r for r in rs if r['method'] == 'hff_stage1']
        if diag and diag[0]['memory_vs_bp'] is not None:
            stage_share[preset] = diag[0]['memory_vs_bp']
    tgts = targets(rows, num_stages)
    pareto(rows)
    command = ('python -m benchmarks.train_cost ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()
    md = render(rows, tgts, info, command, stage_share, profiles) + '\n\n' + '\n'.join(frontier_md(rows))
    payload = dict(benchmark='train_cost', mode=mode, command=command, machine=info,
                   protocol=__doc__.split('\n\n', 2)[-1].strip(), steps=STEPS[mode], accum_steps=ACCUM_STEPS,
                   rows=rows, targets=tgts, saved_activation_profile=profiles)
    paths = write_outputs(args.out, md, payload, plot(rows))
    print(md)
    print(f"\n(wrote {', '.join(paths.values())})")
    return payload


if __name__ == '__main__':
    main()
