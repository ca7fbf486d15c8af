"""Accuracy on Fashion-MNIST: HFF vs backprop vs Forward-Forward, same backbone, same epochs, same data order.

    python -m benchmarks.accuracy --quick             # narrow ResNet-18, 6k/2k subset, 1 epoch (CPU minutes)
    python -m benchmarks.accuracy                     # narrow ResNet-18, full 60k/10k, 2 epochs (~1 h, one CPU thread)
    python -m benchmarks.accuracy --device cuda       # ResNet-18 (28 px stem), full 60k/10k, 5 epochs on a GPU
    python -m benchmarks.accuracy --recipe recipes/fashion_mnist.yaml --jobs 6   # a recipe's budget, hff-train runs

``--recipe`` is the three-way table at a training recipe's own budget (benchmarks/accuracy_recipe.py): HFF, BP and
FF as ``hff-train`` runs of that recipe, FF's settings swept on its validation split. The modes below use this
module's own short training loop instead.

Reports final test accuracy, per-stage accuracy (HFF: each stage's prototype head; FF: each stage's goodness
alone), and an accuracy-vs-compute curve for early exit: HFF exits after stage k in one pass, FF needs C passes
up to stage k (summing goodness per Hinton's rule), BP has one exit. Compute is inference FLOPs per image
counted by PyTorch's FlopCounterMode. Each method trains with AdamW and a cosine schedule at its own learning
rate (FF needs a larger one); the data order, epochs, batch, augmentation and backbone are shared.
"""
import argparse
import math
import sys
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from ._common import (FFConfig, add_common_args, build_for_method, count_flops, get_spec,
                      load_fashion_mnist, machine_info, machine_line, make_runtime, make_train_step, markdown_table,
                      mode_of, new_figure, normalize_images, write_outputs)

SIZES = {
    'quick': dict(preset='tiny_resnet_28', train=6000, test=2000, epochs=1, batch=128, augment=False),
    'full': dict(preset='tiny_resnet_28', train=None, test=None, epochs=2, batch=128, augment=True),
    'cuda': dict(preset='resnet18_28', train=None, test=None, epochs=5, batch=256, augment=True),
}
METHODS = ('hff', 'bp', 'ff')
LR = dict(hff=2e-3, bp=2e-3, ff=1e-2)
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05
NUM_CLASSES = 10
LABELS = dict(hff='HFF', bp='BP', ff='FF')
METHOD_ROWS = dict(hff='hff_simultaneous', bp='bp', ff='ff')   # the benchmarks' rows (_common.ROWS) they train as
BUILD_KWARGS = dict(ff=lambda cfg: dict(ff_cfg=FFConfig(chunk_size=cfg['batch'] * 4)))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 px per image, in one grid_sample."""
    b, _, h, w = x.shape
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.randint(-2, 3, (b, 2), generator=generator).float() * 2 / torch.tensor([w, h]))
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip, 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='nearest', padding_mode='zeros', align_corners=False)


def train(method: str, model, xtr, ytr, cfg, runtime, seed: int) -> Dict[str, float]:
    import timm.optim
    opt = timm.optim.create_optimizer_v2(model, 'adamw', lr=LR[method], weight_decay=WEIGHT_DECAY)
    n, batch = len(ytr), cfg['batch']
    steps_per_epoch = n // batch
    total = cfg['epochs'] * steps_per_epoch
    warm = max(1, int(WARMUP_FRACTION * total))
    def lr_factor(s: int) -> float:   # linear warm-up, then cosine to zero, per step
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    step = make_train_step(METHOD_ROWS[method], model, opt, runtime)
    g = torch.Generator().manual_seed(seed)   # same data order and augmentation draws for every method
    model.train()
    losses = []
    t0 = time.perf_counter()
    for epoch in range(cfg['epochs']):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch].to(xtr.device)
            x = normalize_images(xtr[idx])
            if cfg['augment']:
                x = augment(x, g)
            loss = step(runtime.input(x), ytr[idx].to(runtime.device))
            sched.step()
            if i % 50 == 0:
                losses.append(float(loss))
        print(f'  {method}: epoch {epoch + 1}/{cfg["epochs"]} loss {float(loss):.3f}', file=sys.stderr, flush=True)
    runtime.sync()
    seconds = time.perf_counter() - t0
    return dict(train_s=seconds, train_images_per_s=total * batch / seconds, loss_trace=losses)


def _hff_predictions(model, x):
    stage_logits = [s.float() for s in model.forward_stages(x)]
    preds = dict(final=stage_logits[-1].argmax(1),
                 ensemble=torch.stack([s.log_softmax(-1) for s in stage_logits]).mean(0).argmax(1))
    stage_preds = [s.argmax(1) for s in stage_logits]
    return preds, stage_preds, stage_preds


def _bp_predictions(model, x):
    preds = dict(final=model(x).argmax(1))
    return preds, [], [preds['final']]


def _ff_predictions(model, x):
    g = model.class_goodness(x).float()            # (S, B, C)
    preds = dict(final=model.scores(g).argmax(1))
    return (preds, [g[k].argmax(1) for k in range(g.shape[0])],
            [model.scores(g[:k + 1]).argmax(1) for k in range(g.shape[0])])


# each method's (final and ensemble predictions, per-stage predictions, predictions exiting after each stage)
PREDICTIONS = dict(hff=_hff_predictions, bp=_bp_predictions, ff=_ff_predictions)


@torch.no_grad()
def evaluate(method: str, model, xte, yte, runtime, eval_batch: int) -> Dict[str, Any]:
    """Per-stage correct counts (and the final prediction's) over the test set."""
    model.eval()
    correct: Dict[str, Any] = {}
    n = len(yte)
    for i in range(0, n, eval_batch):
        x = runtime.input(normalize_images(xte[i:i + eval_batch]))
        y = yte[i:i + eval_batch].to(runtime.device)
        with runtime.autocast():
            preds, stage_preds, exit_preds = PREDICTIONS[method](model, x)
        for key, p in preds.items():
            correct[key] = correct.get(key, 0) + int((p == y).sum())
        correct.setdefault('stages', [0] * len(stage_preds))
        correct.setdefault('exits', [0] * len(exit_preds))
        for k, p in enumerate(stage_preds):
            correct['stages'][k] += int((p == y).sum())
        for k, p in enumerate(exit_preds):
            correct['exits'][k] += int((p == y).sum())
    acc = {k: (v / n if not isinstance(v, list) else [c / n for c in v]) for k, v in correct.items()}
    return acc


def _hff_exit_flops(model, x) -> List[int]:
    from timm_hff import run_stages
    return [count_flops(lambda: model.heads[k](run_stages(model.backbone, model.split, x, stop_after=k)[k]))
            for k in range(model.num_stages)]


# inference FLOPs per image of exiting after each stage (BP: its one exit)
EXIT_FLOPS = dict(hff=_hff_exit_flops, bp=lambda model, x: [count_flops(lambda: model(x))],
                  ff=lambda model, x: [count_flops(lambda: model.class_goodness(x, stop_after=k))
                                       for k in range(model.num_stages)])


def exit_flops(method: str, model, spec) -> List[int]:
    """Inference FLOPs per image of exiting after each stage (BP: its one exit)."""
    x = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size, device=next(model.parameters()).device)
    model.eval()
    return EXIT_FLOPS[method](model, x)


def run(cfg: Dict[str, Any], methods: List[str], runtime, seed: int) -> Dict[str, Any]:
    spec = get_spec(cfg['preset'])
    xtr, ytr, xte, yte = load_fashion_mnist(cfg['train'], cfg['test'], seed=seed)
    if runtime.is_cuda:   # 47 MB as uint8: keep it on the GPU, no loader in the way
        xtr, ytr, xte, yte = (t.to(runtime.device) for t in (xtr, ytr, xte, yte))
    results = {}
    for method in methods:
        torch.manual_seed(seed)
        extra = BUILD_KWARGS[method](cfg) if method in BUILD_KWARGS else {}
        model = build_for_method(METHOD_ROWS[method], spec, NUM_CLASSES, **extra)
        model = runtime.model(model)
        print(f'  {method}: training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params', file=sys.stderr,
              flush=True)
        tr = train(method, model, xtr, ytr, cfg, runtime, seed)
        acc = evaluate(method, model, xte, yte, runtime, eval_batch=cfg['batch'] * 2)
        flops = exit_flops(method, model, spec)
        results[method] = dict(**tr, accuracy=acc['final'], stage_accuracy=acc['stages'], exit_accuracy=acc['exits'],
                               exit_flops=flops, lr=LR[method], **({'ensemble_accuracy': acc['ensemble']}
                                                                   if 'ensemble' in acc else {}))
        del model
        if runtime.is_cuda:
            torch.cuda.empty_cache()
    return dict(spec=spec.describe(), train_size=len(ytr), test_size=len(yte), results=results)


def render(out: Dict[str, Any], cfg, info, command: str) -> str:
    res = out['results']
    n_st = max(len(r['stage_accuracy']) for r in res.values())
    headers = ['method', 'test acc', *[f'stage {k + 1}' for k in range(n_st)], 'MFLOPs/img', 'train s', 'lr']
    rows = []
    for m, r in res.items():
        st = [f'{a * 100:.2f}' for a in r['stage_accuracy']] + ['-'] * (n_st - len(r['stage_accuracy']))
        rows.append([LABELS[m], f"{r['accuracy'] * 100:.2f}", *st, f"{r['exit_flops'][-1] / 1e6:.1f}",
                     f"{r['train_s']:.0f}", f"{r['lr']:g}"])
    curve = markdown_table(['method', 'exit after stage', 'MFLOPs/img', 'test acc'], [
        [LABELS[m], k + 1 if m != 'bp' else 'last', f'{f / 1e6:.1f}', f'{a * 100:.2f}']
        for m, r in res.items() for k, (f, a) in enumerate(zip(r['exit_flops'], r['exit_accuracy']))])
    subset = (f"{out['train_size']} train / {out['test_size']} test images"
              + (' (random subset: quick mode, not the full test set)' if cfg['train'] else ' (full Fashion-MNIST)'))
    lines = [f'### Fashion-MNIST accuracy (`{command}`)', '', f'Machine: {machine_line(info)}', '',
             f"Backbone: {out['spec']}; {cfg['epochs']} epoch(s), batch {cfg['batch']}, AdamW (wd {WEIGHT_DECAY}) "
             f"cosine schedule, augmentation {'flip + 2px shift' if cfg['augment'] else 'none'}; {subset}.", '',
             markdown_table(headers, rows), '', 'Early exit (accuracy vs inference compute):', '', curve, '']
    notes = []
    if 'hff' in res and 'ensemble_accuracy' in res['hff']:
        notes.append(f"HFF ensemble of all stages: {res['hff']['ensemble_accuracy'] * 100:.2f}%.")
    if 'ff' in res:
        ff = res['ff']['accuracy']
        notes.append(f"FF vs chance (10%): {ff * 100:.2f}% -> {'learns' if ff >= 0.3 else 'DOES NOT clearly learn'}; "
                     f"FF stage accuracy uses that stage's goodness alone, its final score sums stages 2.. "
                     f"(Hinton's rule).")
    lines += notes
    return '\n'.join(lines)


def plot(out):
    fig, (ax,) = new_figure()
    for m, r in out['results'].items():
        xs = [f / 1e6 for f in r['exit_flops']]
        ys = [a * 100 for a in r['exit_accuracy']]
        ax.plot(xs, ys, 'o-' if len(xs) > 1 else 's', label=LABELS[m])
    ax.set_xscale('log')
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels collide on a short log axis
    ax.set_xlabel('inference MFLOPs per image (early exit after stage k)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title('Fashion-MNIST: accuracy vs compute')
    ax.legend()
    return fig


def main(argv=None) -> Dict[str, Any]:
    if '--recipe' in (sys.argv[1:] if argv is None else argv):
        from .accuracy_recipe import run as run_recipe
        return run_recipe(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, 'accuracy')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--epochs', type=int, default=None, help="override the mode's epochs")
    parser.add_argument('--train-subset', type=int, default=None, help="override the mode's training images")
    parser.add_argument('--test-subset', type=int, default=None, help="override the mode's test images")
    parser.add_argument('--model', default=None, help="override the mode's backbone preset")
    args = parser.parse_args(argv)
    runtime = make_runtime(args)
    mode = mode_of(args)
    cfg = dict(SIZES[mode])
    for key, value in (('epochs', args.epochs), ('train', args.train_subset), ('test', args.test_subset)):
        if value is not None:
            if value < 1:
                parser.error(f'--{key} must be >= 1, got {value}')
            cfg[key] = value
    if args.model is not None:
        try:
            get_spec(args.model)
        except ValueError as e:
            parser.error(str(e))
        cfg['preset'] = args.model
    if cfg['train'] is not None and cfg['train'] < cfg['batch']:
        cfg['batch'] = cfg['train']
    info = machine_info(runtime)
    out = run(cfg, list(dict.fromkeys(args.methods)), runtime, args.seed)
    command = ('python -m benchmarks.accuracy ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()
    md = render(out, cfg, info, command)
    payload = dict(benchmark='accuracy', mode=mode, command=command, machine=info, config=cfg, **out)
    paths = write_outputs(args.out, md, payload, plot(out))
    print(md)
    print(f"\n(wrote {', '.join(paths.values())})")
    return payload


if __name__ == '__main__':
    main()
