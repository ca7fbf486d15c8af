"""Inference throughput: HFF (one pass) vs Forward-Forward (one pass per class) vs backprop's timm classifier.

    python -m benchmarks.inference --quick            # narrow ResNet-18 at 28 px, a minute on 2 CPU cores
    python -m benchmarks.inference                    # ResNet-18 @ 32 px and ResNet-50 @ 224 px on CPU
    python -m benchmarks.inference --device cuda      # same on a GPU: bf16 autocast, channels_last, CUDA events

Random weights (speed does not depend on them). For each C in 10, 100, 1000 the three models share one backbone
and the backbone batch; FF classifies ``B_ff`` images with C labelled passes each, cut into chunks of the same
batch size. Target (issue 5): HFF / FF speed-up >= 0.8 C.
"""
import argparse
import sys
from typing import Any, Dict, List

import torch

from ._common import (FFConfig, add_common_args, build_bp, build_ff, build_hff, count_flops, get_spec,
                      machine_info, machine_line, make_runtime, markdown_table, median, mode_of, new_figure,
                      time_calls, verdict, write_outputs)

# mode -> [(preset, backbone batch)]
SIZES = {
    'quick': [('tiny_resnet_28', 32)],
    'full': [('resnet18_32', 64), ('resnet50_224', 16)],
    'cuda': [('resnet18_32', 1024), ('resnet50_224', 256)],
}
MIN_TIME = {'quick': 1.0, 'full': 3.0, 'cuda': 1.0}   # seconds of timed calls per measurement (at least one call)
FF_ROWS = 4   # FF classifies up to FF_ROWS * batch / C images per measurement (at least one)
TARGET_FRACTION = 0.8
ROUNDS = 3          # interleaved timing rounds per (model, C)
FF_BUDGET_S = 30.0  # no further FF rounds once FF calls took this long (C = 1000 on a big model)
BUDGET_S = dict(ff=FF_BUDGET_S)   # a method's time budget for the rounds after the first

PROTOCOL = (
    'Random weights, eval mode, torch.inference_mode. images/s = images per call / fastest call (other processes '
    'only ever add time; medians are in the JSON), '
    'after warm-up, over timed calls in 3 interleaved rounds (HFF, BP, FF, HFF, ...) filling at least '
    '{min_time}s per method (at least one call per round; FF stops adding rounds after 30 s). HFF predicts from the '
    'last stage in one pass; BP is timm.create_model(arch, num_classes=C) with the identical (small-input) '
    'backbone; FF appends a label plane (one extra input channel) and runs the backbone once per (image, '
    'candidate label), in chunks of the backbone batch, summing stage goodness. FLOPs/img counted by '
    "torch's FlopCounterMode (conv/matmul) on one image. Target: HFF/FF speed-up >= 0.8 C.")


def run_model(preset: str, batch: int, classes: List[int], runtime, min_time: float) -> List[Dict[str, Any]]:
    spec = get_spec(preset)
    hff = runtime.model(build_hff(spec, classes[0]).eval())
    bp = runtime.model(build_bp(spec, classes[0], split=hff.split).eval())
    ff = runtime.model(build_ff(spec, classes[0], FFConfig(chunk_size=batch)).eval())
    x = runtime.input(torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size))
    rows = []
    for c in classes:
        hff.reset_classifier(c)
        bp.reset_classifier(c)
        ff.reset_classifier(c)
        hff, bp, ff = runtime.model(hff), runtime.model(bp), runtime.model(ff)
        b_ff = max(1, min(batch, FF_ROWS * batch // c))
        x_ff = x[:b_ff]
        with torch.inference_mode(), runtime.autocast():
            fns = dict(hff=lambda: hff(x), bp=lambda: bp(x), ff=lambda: ff(x_ff))
            hff(x), bp(x), hff(x), bp(x)
            ff.class_goodness(x[:1], classes=range(min(c, batch)))   # warm-up: one full-size chunk
            if runtime.is_cuda:   # cheap there: a whole call, so cuDNN has tuned the last chunk's shape too
                ff(x_ff)
            times = {m: [] for m in fns}
            for r in range(ROUNDS):   # interleaved, so load from other processes hits all methods alike
                for m, fn in fns.items():
                    if r and sum(times[m]) > BUDGET_S.get(m, float('inf')):
                        continue
                    times[m] += time_calls(fn, runtime, warmup=0, iters=1, min_time=min_time / ROUNDS)
            t_hff, t_bp, t_ff = (min(times[m]) for m in ('hff', 'bp', 'ff'))   # best of: load only adds time
            one = x[:1]
            flops = dict(hff=count_flops(lambda: hff(one)), bp=count_flops(lambda: bp(one)),
                         ff=count_flops(lambda: ff(one)))
        ips = dict(hff=batch / t_hff, bp=batch / t_bp, ff=b_ff / t_ff)
        speedup = ips['hff'] / ips['ff']
        target = TARGET_FRACTION * c
        rows.append(dict(model=preset, spec=spec.describe(), num_classes=c, batch=batch, ff_images=b_ff,
                         images_per_s=ips, seconds_per_call=dict(hff=t_hff, bp=t_bp, ff=t_ff),
                         median_seconds_per_call={m: median(v) for m, v in times.items()},
                         timed_calls={m: len(v) for m, v in times.items()},
                         flops_per_image=flops, speedup_hff_over_ff=speedup,
                         flop_ratio_ff_over_hff=flops['ff'] / flops['hff'],
                         hff_over_bp=ips['hff'] / ips['bp'], target=target, target_met=speedup >= target))
        print(f'  {preset} C={c}: HFF {ips["hff"]:.1f} img/s, FF {ips["ff"]:.3g} img/s, BP {ips["bp"]:.1f} img/s, '
              f'speed-up {speedup:.1f}x', file=sys.stderr, flush=True)
    return rows


def render(rows: List[Dict[str, Any]], info: Dict[str, Any], command: str) -> str:
    headers = ['model', 'C', 'batch', 'HFF img/s', 'FF img/s', 'BP img/s', 'HFF/FF speed-up', 'FLOP ratio FF/HFF',
               'target >= 0.8C', 'HFF/BP']
    table = markdown_table(headers, [
        [r['model'], r['num_classes'], r['batch'], r['images_per_s']['hff'], r['images_per_s']['ff'],
         r['images_per_s']['bp'], f"{r['speedup_hff_over_ff']:.1f}x", f"{r['flop_ratio_ff_over_hff']:.1f}x",
         f"{r['target']:g}x {verdict(r['target_met'])}", f"{r['hff_over_bp']:.2f}"] for r in rows])
    specs = sorted({f"- {r['model']}: {r['spec']}" for r in rows})
    missed = [r for r in rows if not r['target_met']]
    note = ('All speed-up targets met.' if not missed else
            'Missed: ' + '; '.join(f"{r['model']} C={r['num_classes']} ({r['speedup_hff_over_ff']:.1f}x < "
                                   f"{r['target']:g}x)" for r in missed) +
            '. FF pays C passes by design; a speed-up below 0.8 C means the HFF pass costs more than an FF pass '
            '(see the FLOP ratio column and HFF/BP: head overhead) or FF ran at a better batch efficiency.')
    return '\n'.join([f'### Inference throughput (`{command}`)', '', f'Machine: {machine_line(info)}', '', table, '',
                      *specs, '', note, '', 'Protocol: ' + PROTOCOL.format(min_time=info['min_time'])])


def plot(rows: List[Dict[str, Any]]):
    fig, (ax,) = new_figure()
    for model in dict.fromkeys(r['model'] for r in rows):
        rs = [r for r in rows if r['model'] == model]
        ax.plot([r['num_classes'] for r in rs], [r['speedup_hff_over_ff'] for r in rs], 'o-', label=f'{model}')
    cs = sorted({r['num_classes'] for r in rows})
    ax.plot(cs, cs, 'k:', label='C (ideal)')
    ax.plot(cs, [TARGET_FRACTION * c for c in cs], 'r--', label='target 0.8 C')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('number of classes C')
    ax.set_ylabel('HFF / FF inference speed-up')
    ax.set_title('One pass (HFF) vs one pass per class (FF)')
    ax.legend()
    return fig


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, 'inference')
    parser.add_argument('--classes', type=int, nargs='+', default=[10, 100, 1000], help='values of C')
    parser.add_argument('--models', nargs='+', default=None,
                        help='presets as NAME or NAME:BATCH (default: the mode\'s set)')
    args = parser.parse_args(argv)
    if any(c < 2 for c in args.classes):
        parser.error(f'--classes must all be >= 2, got {args.classes}')
    runtime = make_runtime(args)
    mode = mode_of(args)
    models = SIZES[mode] if args.models is None else [parse_model(m, SIZES[mode], parser) for m in args.models]
    info = machine_info(runtime)
    info['min_time'] = MIN_TIME[mode]
    rows = []
    for preset, batch in models:
        rows += run_model(preset, batch, args.classes, runtime, MIN_TIME[mode])
    command = 'python -m benchmarks.inference ' + ' '.join(argv if argv is not None else sys.argv[1:])
    md = render(rows, info, command.strip())
    payload = dict(benchmark='inference', mode=mode, command=command.strip(), machine=info,
                   protocol=PROTOCOL.format(min_time=MIN_TIME[mode]), rows=rows)
    paths = write_outputs(args.out, md, payload, plot(rows))
    print(md)
    print(f"\n(wrote {', '.join(paths.values())})")
    return payload


def parse_model(text: str, defaults, parser) -> tuple:
    name, _, batch = text.partition(':')
    if not batch:
        batch = dict(defaults).get(name, 32)
    try:
        get_spec(name)
        batch = int(batch)
    except ValueError as e:
        parser.error(str(e))
    if batch < 1:
        parser.error(f'batch must be >= 1 in {text!r}')
    return name, batch


if __name__ == '__main__':
    main()
