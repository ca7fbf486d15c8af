"""Anytime inference: accuracy against mean FLOPs per image and against measured wall time, for adaptive exit
(``predict_from='adaptive'``), the fixed-stage exits (``predict_from=k``) and the full model.

    python -m benchmarks.early_exit --model local-dir:output/early_exit_dev/fashion_mnist_quick/model --threads 1
    python -m benchmarks.early_exit --model local-dir:... --device cuda     # GPU timing (bf16 autocast)

The model is a saved HFF model trained with the validation protocol (``val_fraction`` hold-out of the training
split, ``test_split`` at the end). The exit thresholds are fitted on that same hold-out (``--val-fraction``,
``--split-seed``), with ``timm_hff.calibrate_exits`` within ``--max-accuracy-drop`` top-1 points of the full model,
and evaluated on the test split once. Accuracy and FLOPs of every setting are exact replays of the exit rule on one
full forward of the test split (``timm_hff._exit.ExitStats``); the fitted setting is also run through the real
shrinking forward over the whole test split, which must give the same accuracy and FLOPs. Wall time is measured on
the first images of the test split at each batch size, all settings in interleaved rounds (medians).
Targets (the early-exit issue, and issue 25 on the clock): test top-1 within 0.2 points of the full model at <= 0.6x
its mean FLOPs per image, and a CPU wall-time saving of >= 1.3x at batch 256 and at batch 1. A stage left at threshold
1 runs no head (``_exit_rule.scored_stages``), and its FLOPs and time count none.
"""
import argparse
import os
import sys
import time
from typing import Any, Dict, List

import torch

import timm_hff
from timm_hff import ExitStats, exit_stats, fit_exits, stage_profile

from ._common import (add_common_args, machine_info, machine_line, make_runtime, markdown_table, median, new_figure,
                      verdict, write_outputs)

SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)   # one threshold for every stage
DROPS = (0.0, 0.1, 0.2, 0.5, 1.0)                              # fitted on validation, top-1 points (no guarantee)
STUDY_DROPS = (0.5, 0.2)                                       # the split study's bounds (top-1 points)
TIMED_SWEEP = (0.9, 0.99, 0.999)                               # uniform thresholds that are also timed
TARGET_RATIO, TARGET_SPEEDUP = 0.6, 1.3
PROTOCOL = (
    'Thresholds fitted on the validation hold-out only; every figure below is on the test split, evaluated once. '
    'Accuracy and mean FLOPs per image: the exit rule replayed on one full forward of the test split (exact: the '
    'fitted setting is also run through the shrinking forward, see "check"). FLOPs: torch.utils.flop_counter counts '
    'of one image (2 per multiply-add); an adaptive exit after stage k pays stages 1..k of the backbone and their '
    'heads, a fixed exit k (predict_from=k) stages 1..k and head k only, the full model the whole backbone and the '
    'last head. Wall time: eval mode, torch.inference_mode, the first {timed} test images per batch size, one '
    'warm-up pass per setting, then {rounds} rounds in which every setting runs once over them, in an order rotated '
    'each round (load from other processes hits all alike); seconds per image = median over rounds. Speed-up = '
    'median over rounds of (full time / adaptive time) within the same round; the same for the process CPU time '
    '(time.process_time), which other processes do not inflate.')


def load_split_tensors(model, data_dir: str, val_fraction: float, split_seed: int, batch: int = 1000):
    """(val x, val y, test x, test y), preprocessed with the model's saved data config, as in training."""
    from timm_hff.data import carve_validation, create_image_loader, load_image_dataset, resolve_data_config

    train = load_image_dataset('idx', data_dir, 'train', num_classes=model.num_classes)
    _, val = carve_validation(train, val_fraction, split_seed)
    test = load_image_dataset('idx', data_dir, 'test', num_classes=model.num_classes)
    data_cfg = resolve_data_config(model, model.in_chans)
    out = []
    for data in (val, test):
        loader = create_image_loader(data, data_cfg, False, batch, workers=0)
        xs, ys = zip(*[(loader.transform(x), y) for x, y in loader.loader])
        out += [torch.cat(xs), torch.cat(ys)]
    return tuple(out), (val.split, test.split)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, runtime):
    return [(runtime.input(x[i:i + size]), y[i:i + size]) for i in range(0, len(y), size)]


def fixed_exit_flops(model, img_size: int) -> List[int]:
    """FLOPs per image of ``predict_from=k``: stages 1..k of the backbone and head k (no other head runs)."""
    rows = stage_profile(model, img_size)
    return [sum(r['flops'] for r in rows[:k + 1]) + rows[k]['head_flops'] for k in range(len(rows))]


def main_name(drop: float, confidence: float) -> str:
    return f'adaptive (guaranteed drop {drop:g}, confidence {confidence:g})'


def settings_to_time(model, fitted: Dict[float, tuple], main: str, guaranteed: tuple) -> Dict[str, tuple]:
    """name -> (predict_from, exit thresholds or None): the settings whose wall time is measured."""
    n = model.num_stages
    out = {'full': ('last', None)}
    out.update({f'stage {k + 1}': (k, None) for k in range(n - 1)})
    out[main] = ('adaptive', guaranteed)
    out.update({f'adaptive (val drop {d:g})': ('adaptive', fitted[d]) for d in fitted})
    out.update({f'adaptive (all {q:g})': ('adaptive', (q,) * (n - 1)) for q in TIMED_SWEEP})
    return out


def time_settings(model, settings, xb: List[torch.Tensor], rounds: int, runtime):
    """Seconds per pass over ``xb`` of every setting, ``rounds`` interleaved rounds (order rotated each round): wall
    time, and the process's CPU time (what the pass itself computed; other processes on a shared CPU do not add to
    it, so it is the steadier figure of the two when torch runs one thread)."""
    names = list(settings)

    def one_pass(name: str):
        pf, thresholds = settings[name]
        if thresholds is not None:
            model.set_exits(thresholds=thresholds)
        model.set_predict_from(pf)
        runtime.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode(), runtime.autocast():
            for x in xb:
                model(x)
        runtime.sync()
        return time.perf_counter() - t0, time.process_time() - c0

    for name in names:   # warm-up (allocator, cuDNN, the one-time shrink check)
        one_pass(name)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c = one_pass(name)
            wall[name].append(w)
            cpu[name].append(c)
    model.set_predict_from('last')
    return wall, cpu


def run(args, runtime) -> Dict[str, Any]:
    model = timm_hff.create_model(args.model, pretrained=True).eval()
    model = runtime.model(model)
    (xv, yv, xt, yt), split_names = load_split_tensors(model, args.data_dir, args.val_fraction, args.split_seed)
    if args.num_test:
        xt, yt = xt[:args.num_test], yt[:args.num_test]
    img = xt.shape[-1]
    print(f'  {args.model}: validation {len(yv)} images ({split_names[0]}), test {len(yt)}', file=sys.stderr)

    # fit on validation (one pass, then every drop from the same logits), score on test (one pass)
    val = exit_stats(model, batches(xv, yv, 500, runtime))
    test = exit_stats(model, batches(xt, yt, 500, runtime))
    fitted, cal = {}, {}
    for drop in sorted(set(DROPS) | {args.max_accuracy_drop}):
        c = fit_exits(model, val, max_accuracy_drop=drop, rule=args.rule)
        fitted[drop], cal[drop] = c.thresholds, c
    main = main_name(args.max_accuracy_drop, args.confidence)
    guaranteed = fit_exits(model, val, max_accuracy_drop=args.max_accuracy_drop, rule=args.rule,
                           confidence=args.confidence)
    n = model.num_stages
    full_top1 = test.full_top1()
    full_flops = test.full_flops
    fixed_flops = fixed_exit_flops(model, img)
    points = [dict(kind='full', name='full', top1=full_top1, mean_flops=full_flops, flops_ratio=1.0)]
    correct = test.correct()
    for k in range(n - 1):
        points.append(dict(kind='fixed', name=f'stage {k + 1}', top1=100 * int(correct[:, k].sum()) / len(yt),
                           mean_flops=fixed_flops[k], flops_ratio=fixed_flops[k] / full_flops))
    for q in SWEEP:
        s = test.point(args.rule, (q,) * (n - 1))
        points.append(dict(kind='sweep', name=f'adaptive (all {q:g})', thresholds=[q] * (n - 1), **s))
    for drop, thresholds in fitted.items():
        s = test.point(args.rule, thresholds)
        points.append(dict(kind='fitted', name=f'adaptive (val drop {drop:g})', thresholds=list(thresholds),
                           val_top1=cal[drop].top1, val_flops_ratio=cal[drop].flops_ratio, **s))
    points.append(dict(kind='guaranteed', name=main, thresholds=list(guaranteed.thresholds),
                       val_top1=guaranteed.top1, val_flops_ratio=guaranteed.flops_ratio,
                       **test.point(args.rule, guaranteed.thresholds)))
    study = split_study(model, val, test, args)

    # the chosen setting through the real shrinking forward, on the whole test split
    model.set_exits(thresholds=guaranteed.thresholds, rule=args.rule)
    hits, spent = 0, 0
    with torch.inference_mode(), runtime.autocast():
        for x, y in batches(xt, yt, 256, runtime):
            logits, _, flops = model.forward_adaptive(x, return_flops=True)
            hits += int((logits.argmax(-1).cpu() == y).sum())
            spent += int(flops.sum())
    main_point = next(p for p in points if p['name'] == main)
    check = dict(top1=100 * hits / len(yt), mean_flops=spent / len(yt))
    check['matches_replay'] = abs(check['top1'] - main_point['top1']) < 1e-9 and abs(
        check['mean_flops'] - main_point['mean_flops']) < 1e-3

    # wall time, per memory layout and batch size
    settings = settings_to_time(model, fitted, main, guaranteed.thresholds)
    timing = {}
    for layout in args.layouts:
        fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
        model = model.to(memory_format=fmt)
        for bs, count in args.timed:
            count = min(count, len(yt))
            xb = [x.contiguous(memory_format=fmt) for x, _ in batches(xt[:count], yt[:count], bs, runtime)]
            print(f'  timing {layout}, batch {bs} on {count} images, {args.rounds} rounds x {len(settings)} settings',
                  file=sys.stderr, flush=True)
            times, cpu = time_settings(model, settings, xb, args.rounds, runtime)
            speedups = [f / a for f, a in zip(times['full'], times[main])]
            cpu_speedups = [f / a for f, a in zip(cpu['full'], cpu[main])]
            timing[f'{layout} b{bs}'] = dict(
                layout=layout, batch=bs, images=count, seconds_per_image={k: median(v) / count for k, v in
                                                                          times.items()},
                seconds_per_pass=times, speedup_vs_full=median(speedups), speedups_per_round=speedups,
                cpu_seconds_per_image={k: median(v) / count for k, v in cpu.items()}, cpu_seconds_per_pass=cpu,
                cpu_speedup_vs_full=median(cpu_speedups))
    for p in points:
        for key, t in timing.items():
            if p['name'] in t['seconds_per_image']:
                p[f'ms_per_image {key}'] = 1e3 * t['seconds_per_image'][p['name']]
    drop = full_top1 - main_point['top1']
    targets = dict(accuracy_drop=drop, accuracy_met=drop <= args.max_accuracy_drop + 1e-9,
                   flops_ratio=main_point['flops_ratio'], flops_met=main_point['flops_ratio'] <= TARGET_RATIO)
    for bs in (256, 1):   # each in its fastest layout: no layout choice flatters either
        at = [t for t in timing.values() if t['batch'] == bs]
        if at and runtime.device.type == 'cpu':
            best_full = min(t['seconds_per_image']['full'] for t in at)
            best_adaptive = min(t['seconds_per_image'][main] for t in at)
            targets.update({f'cpu_speedup_b{bs}': best_full / best_adaptive,
                            f'cpu_speedup_b{bs}_met': best_full / best_adaptive >= TARGET_SPEEDUP})
    return dict(model=args.model, rule=args.rule, max_accuracy_drop=args.max_accuracy_drop, splits=split_names,
                confidence=args.confidence, main=main, val_images=len(yv), test_images=len(yt), img_size=img,
                exit_flops=test.exit_flops, full_flops=full_flops, fixed_exit_flops=fixed_flops, points=points,
                check=check, timing=timing, targets=targets, fitted=cal[args.max_accuracy_drop].to_dict(),
                guaranteed=guaranteed.to_dict(), study=study)


def split_study(model, val, test, args) -> Dict[str, Any]:
    """Calibrate on one part, measure on another, over ``args.splits`` random splits of validation + test pooled
    (the calibration part as large as the validation split): the out-of-sample drop of the guaranteed choice and of
    the best fit, at each bound of ``STUDY_DROPS`` (and the main one)."""
    pooled = ExitStats([torch.cat([a, b]) for a, b in zip(val.stage_logits, test.stage_logits)],
                       torch.cat([val.labels, test.labels]), val.exit_flops, val.full_flops, val.img_size,
                       val.stage_flops, val.head_flops)
    n_cal, rows = val.num_images, []
    for drop in sorted(set(STUDY_DROPS) | {args.max_accuracy_drop}, reverse=True):
        for method, confidence in (('guaranteed', args.confidence), ('best fit', None)):
            drops, ratios, closed = [], [], 0
            for s in range(args.splits):
                perm = torch.randperm(pooled.num_images, generator=torch.Generator().manual_seed(10_000 + s))
                cal, held = pooled.subset(perm[:n_cal]), pooled.subset(perm[n_cal:])
                try:
                    c = fit_exits(model, cal, max_accuracy_drop=drop, rule=args.rule, confidence=confidence)
                except ValueError as e:   # too few calibration images for this bound: said, not studied
                    rows.append(dict(method=method, max_accuracy_drop=drop, confidence=confidence, refused=str(e)))
                    break
                point = held.point(args.rule, c.thresholds)
                drops.append(held.full_top1() - point['top1'])
                ratios.append(point['flops_ratio'])
                closed += all(t >= 1 for t in c.thresholds)
            if not drops:
                continue
            d = torch.tensor(drops, dtype=torch.float64)
            rows.append(dict(method=method, max_accuracy_drop=drop, confidence=confidence, splits=args.splits,
                             mean_drop=d.mean().item(), p95_drop=torch.quantile(d, 0.95).item(),
                             max_drop=d.max().item(),
                             share_above=(d > drop + 1e-9).double().mean().item(),
                             mean_flops_ratio=float(sum(ratios) / len(ratios)), never_exit_splits=closed, drops=drops))
            print(f"  split study: {method} drop {drop:g}: mean {rows[-1]['mean_drop']:.3f}, p95 "
                  f"{rows[-1]['p95_drop']:.3f}, share above {rows[-1]['share_above']:.2f}, FLOPs "
                  f"{rows[-1]['mean_flops_ratio']:.3f}x", file=sys.stderr, flush=True)
    return dict(calibration_images=n_cal, evaluation_images=pooled.num_images - n_cal, rows=rows)


def render(res: Dict[str, Any], info: Dict[str, Any], command: str) -> str:
    keys = list(res['timing'])
    headers = (['setting', 'thresholds', 'test top-1 (%)', 'vs full (pts)', 'MFLOPs/img', 'x full', 'exits per stage']
               + [f'ms/img {k}' for k in keys])
    rows = []
    for p in res['points']:
        shares = ' / '.join(f'{s:.0%}' for s in p['exit_shares']) if 'exit_shares' in p else '–'
        thr = ', '.join(f'{t:.4g}' for t in p['thresholds']) if p.get('thresholds') else '–'
        rows.append([p['name'], thr, f"{p['top1']:.2f}", f"{p['top1'] - res['points'][0]['top1']:+.2f}",
                     f"{p['mean_flops'] / 1e6:.2f}", f"{p['flops_ratio']:.3f}", shares]
                    + [f"{p[f'ms_per_image {k}']:.3f}" if f'ms_per_image {k}' in p else '–' for k in keys])
    t = res['targets']
    main = res['main']
    lines = [f'### Anytime inference (`{command}`)', '', f'Machine: {machine_line(info)}; load average '
             f"{info['load_average']} at the start on {info['cpu_count']} cores", '',
             f"Model `{res['model']}`; thresholds ({res['rule']}) fitted on {res['splits'][0]} ({res['val_images']} "
             f"images), evaluated on {res['splits'][1]} ({res['test_images']} images), {res['img_size']} px.", '',
             markdown_table(headers, rows), '',
             f"Targets for `{main}`: test top-1 within {res['max_accuracy_drop']:g} points of the full model: "
             f"{t['accuracy_drop']:+.2f} points lost, {verdict(t['accuracy_met'])}; mean FLOPs <= {TARGET_RATIO}x: "
             f"{t['flops_ratio']:.3f}x, {verdict(t['flops_met'])}"]
    for bs in (256, 1):
        if f'cpu_speedup_b{bs}_met' in t:
            lines[-1] += (f"; CPU wall-time saving at batch {bs} >= {TARGET_SPEEDUP}x (each in its fastest layout): "
                          f"{t[f'cpu_speedup_b{bs}']:.2f}x, {verdict(t[f'cpu_speedup_b{bs}_met'])}")
    lines[-1] += '.'
    for key, tm in res['timing'].items():
        cpu = tm['cpu_seconds_per_image']
        lines.append(f"- {key}: adaptive / full wall-time saving {tm['speedup_vs_full']:.2f}x in the same layout "
                     f"(per round: {', '.join(f'{s:.2f}' for s in tm['speedups_per_round'])}); process CPU time "
                     f"{1e3 * cpu['full']:.3f} vs {1e3 * cpu[main]:.3f} ms/img, saving "
                     f"{tm['cpu_speedup_vs_full']:.2f}x; stage 1 with its head, which every image pays, takes "
                     f"{cpu['stage 1'] / cpu['full']:.0%} of the full model's CPU time for "
                     f"{res['fixed_exit_flops'][0] / res['full_flops']:.0%} of its FLOPs.")
    lines += [''] + study_md(res)
    c = res['check']
    lines += ['', f"Check: the shrinking forward on the whole test split gives top-1 {c['top1']:.2f}% at "
              f"{c['mean_flops'] / 1e6:.3f} MFLOPs per image ({'equal to' if c['matches_replay'] else 'DIFFERS from'} "
              f"the replay).", '', 'Protocol: ' + PROTOCOL.format(timed=', '.join(
                  f"{tm['images']} (batch {tm['batch']})" for tm in res['timing'].values() if tm['layout'] ==
                  next(iter(res['timing'].values()))['layout']), rounds=info['rounds'])]
    return '\n'.join(lines)


def args_splits(study: Dict[str, Any]) -> int:
    return next((r['splits'] for r in study['rows'] if 'splits' in r), 0)


def study_md(res: Dict[str, Any]) -> List[str]:
    st = res['study']
    g = res['guaranteed']['guarantee']
    lines = [f"Guarantee of `{res['main']}`: Learn-then-Test on the {g['calibration_images']} validation images "
             f"({g['ordering_images']} order the candidate settings, {g['testing_images']} test them; "
             f"{g['candidates_tested']} of {g['candidates']} tested, p-value of the chosen one "
             f"{g['p_value'] if g['p_value'] is None else round(g['p_value'], 4)}).", '',
             f"Out of sample, over {args_splits(st)} random splits of validation + test pooled (calibrate on "
             f"{st['calibration_images']} images, measure on the other {st['evaluation_images']}): the top-1 points "
             f"lost against full depth on the measured part.", '',
             '| method | bound (pts) | confidence | mean drop | 95th percentile | largest | share of splits above the '
             'bound | mean FLOPs (x full) | splits that never exit early |', '|---|---|---|---|---|---|---|---|---|']
    for r in st['rows']:
        if 'refused' in r:
            lines.append(f"| {r['method']} | {r['max_accuracy_drop']:g} | {r['confidence']:g} | refused: "
                         f"{r['refused']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['max_accuracy_drop']:g} | "
                     f"{'–' if r['confidence'] is None else format(r['confidence'], 'g')} | {r['mean_drop']:+.3f} | "
                     f"{r['p95_drop']:+.3f} | {r['max_drop']:+.3f} | {r['share_above']:.0%} | "
                     f"{r['mean_flops_ratio']:.3f} | {r['never_exit_splits']} |")
    return lines


def plot(res: Dict[str, Any]):
    keys = list(res['timing'])
    fig, axes = new_figure(ncols=1 + len(keys), width=4.6)
    xs = [('mean_flops', 'mean MFLOPs per image', 1e-6)] + [(f'ms_per_image {k}', f'ms per image ({k})', 1)
                                                            for k in keys]
    style = dict(full=('k*', 'full model'), fixed=('s', 'fixed exit (stage k)'), sweep=('o-', 'adaptive, one '
                 'threshold for all stages'), fitted=('^-', 'adaptive, fitted on validation (drop 0-1 pts)'),
                 guaranteed=('D', 'adaptive, guaranteed (Learn-then-Test)'))
    main = next(p for p in res['points'] if p['name'] == res['main'])
    for ax, (key, label, scale) in zip(axes, xs):
        for kind, (fmt, name) in style.items():
            pts = sorted((p for p in res['points'] if p['kind'] == kind and key in p), key=lambda p: p[key])
            if pts:
                ax.plot([p[key] * scale for p in pts], [p['top1'] for p in pts], fmt, label=name,
                        ms=9 if kind == 'full' else 5)
        if key in main:
            ax.annotate(f"guaranteed, drop {res['max_accuracy_drop']:g}", (main[key] * scale, main['top1']),
                        textcoords='offset points', xytext=(6, -12), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel('test top-1 (%)')
        ax.grid(alpha=0.3)
    top = res['points'][0]['top1']
    low = min(p['top1'] for p in res['points'] if p['kind'] in ('full', 'fixed'))
    for ax in axes:   # the reference points in view; the sweep's far end may fall below
        ax.set_ylim(min(low, top - 2) - 0.5, top + 0.7)
    axes[0].legend(fontsize=7, loc='lower right')
    fig.suptitle('Anytime inference: adaptive exit vs fixed exits vs the full model', fontsize=10)
    return fig


def main(argv=None) -> Dict[str, Any]:
    from timm_hff.data import FASHION_MNIST_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, 'early_exit')
    parser.add_argument('--model', required=True, help="a saved HFF model, 'local-dir:<folder>' or 'hf-hub:<repo>'")
    parser.add_argument('--data-dir', default=FASHION_MNIST_DIR, help='IDX files (train + test)')
    parser.add_argument('--val-fraction', type=float, default=0.1, help='the run\'s validation hold-out')
    parser.add_argument('--split-seed', type=int, default=0)
    parser.add_argument('--max-accuracy-drop', type=float, default=0.5, help='the guaranteed bound (top-1 points)')
    parser.add_argument('--confidence', type=float, default=0.9, help='of the guarantee (1 - epsilon)')
    parser.add_argument('--splits', type=int, default=50, help='random calibrate / measure splits of the study')
    parser.add_argument('--rule', default='max_prob', choices=('max_prob', 'entropy'))
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 256])
    parser.add_argument('--timed-images', type=int, nargs='+', default=None,
                        help='test images timed per batch size (default 500 at batch 1, 10 batches otherwise)')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--layouts', nargs='+', default=None, choices=('nchw', 'channels_last'),
                        help='memory layouts timed (default: both on CPU, the runtime\'s on CUDA)')
    parser.add_argument('--num-test', type=int, default=None, help='use the first N test images only')
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    counts = args.timed_images or [(100 if args.quick else 500) if bs == 1 else (2 if args.quick else 10) * bs
                                   for bs in args.batch_sizes]
    if len(counts) != len(args.batch_sizes):
        parser.error('--timed-images needs one count per --batch-sizes entry')
    args.timed = list(zip(args.batch_sizes, counts))
    runtime = make_runtime(args)
    if args.layouts is None:
        args.layouts = ['channels_last' if runtime.channels_last else 'nchw'] if runtime.is_cuda else [
            'nchw', 'channels_last']
    info = machine_info(runtime)
    info.update(rounds=args.rounds, load_average=' / '.join(f'{v:.2f}' for v in os.getloadavg()))
    res = run(args, runtime)
    res['machine'] = info
    command = 'python -m benchmarks.early_exit ' + ' '.join(argv if argv is not None else sys.argv[1:])
    markdown = render(res, info, command.strip())
    res['load_average_end'] = ' / '.join(f'{v:.2f}' for v in os.getloadavg())
    write_outputs(args.out, markdown + f"\n\nLoad average at the end: {res['load_average_end']}.", res, plot(res))
    print(markdown)
    return res


if __name__ == '__main__':
    main()
