"""A recipe's training step time against BP's, measured side by side: the models `hff-train` builds, interleaved.

    python -m benchmarks.recipe_cost recipes/fashion_mnist.yaml
    python -m benchmarks.recipe_cost benchmarks/results/greedy_trials/base.yaml --variant p2='{pool_size: 2}'

Each variant (the recipe's HFF model, the recipe with ``--hff`` changes, and ``method: bp`` on the same backbone)
is built by the trainer's own ``build_model`` / ``build_optimizer`` with the recipe's batch size, channels_last and
model EMA, and trained on the same random batch. Rounds alternate between the variants (a few steps each), so a
noisy shared CPU slows all of them alike; the figure is the median step time of each over the rounds, and its
ratio to BP's. Data loading and augmentation are left out: they cost BP and HFF the same.
"""
import argparse
import os
import time
from typing import Any, Dict, List

import torch
import yaml

from ._common import machine_info, machine_line, make_runtime, markdown_table, median, write_outputs

RESULTS = os.path.join(os.path.dirname(__file__), 'results', 'recipe_cost')


def _parse_variant(text: str):
    name, sep, hff = text.partition('=')
    if not sep or not name:
        raise SystemExit(f"--variant takes NAME='{{hff settings}}', got {text!r}")
    value = yaml.safe_load(hff)
    if not isinstance(value, dict):
        raise SystemExit(f'--variant {name}: the settings must be a mapping, got {hff!r}')
    return name, value


def build_step(recipe: str, overrides: Dict[str, Any]):
    """The trainer's model, optimizer and EMA for ``recipe`` + ``overrides``; returns (step, cfg, model)."""
    from timm_hff.train import TrainConfig
    from timm_hff.train import NoAccelerator, build_model, build_optimizer, get_method, get_schedule

    cfg = TrainConfig.from_yaml(recipe, overrides)
    model = build_model(cfg, cfg.num_classes or 10)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    method, schedule = get_method(cfg.method), get_schedule(cfg.schedule)
    opt = build_optimizer(cfg, model, method.head_parameter_names(model))
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
    size = cfg.img_size or 224
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, cfg.in_chans or 3, size, size, generator=gen)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes or 10, (cfg.batch_size,), generator=gen)
    updates = [0]

    def step() -> None:
        method.step(NoAccelerator, model, model, x, y, None, schedule.forward_mode)   # forward, local losses, backward
        opt.step()
        opt.zero_grad(set_to_none=True)
        updates[0] += 1
        if ema is not None:
            ema.update(model, step=updates[0])

    return step, cfg, model


def main(argv: List[str] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('recipe')
    parser.add_argument('--variant', action='append', default=[], type=_parse_variant,
                        help="NAME='{hff settings}': an HFF variant of the recipe (repeatable)")
    parser.add_argument('--rounds', type=int, default=12)
    parser.add_argument('--steps', type=int, default=3, help='steps of each variant per round')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # BP end to end (every layer), and, when the recipe freezes stages, BP with the very same blocks frozen (hff-train's
    # freeze_stages for BP): the saving of a freeze that BP could use as well is not HFF's
    variants = {'recipe': {}, **{n: dict(hff=v) for n, v in args.variant},
                'bp': dict(method='bp', freeze_stages=[], head_only=False)}
    with open(args.recipe) as f:
        if (yaml.safe_load(f) or {}).get('freeze_stages'):
            variants['bp_same_frozen_blocks'] = dict(method='bp', head_only=False)
    steps, cfgs = {}, {}
    for name, over in variants.items():
        steps[name], cfgs[name], model = build_step(args.recipe, over)
        steps[name]()   # warm-up (allocator, first-call costs)
    times: Dict[str, List[float]] = {n: [] for n in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / args.steps)
    bp = median(times['bp'])
    frozen = median(times['bp_same_frozen_blocks']) if 'bp_same_frozen_blocks' in times else None
    rows = []
    for name in variants:
        cfg = cfgs[name]
        t = median(times[name])
        rows.append(dict(variant=name, method=cfg.method, hff=variants[name].get('hff', {}),
                         step_ms=round(1000 * t, 1), img_per_s=round(cfg.batch_size / t, 1),
                         time_vs_bp=round(t / bp, 3), rounds_ms=[round(1000 * v, 1) for v in times[name]],
                         **({} if frozen is None else dict(time_vs_bp_same_frozen=round(t / frozen, 3)))))
    info = machine_info(make_runtime(argparse.Namespace(device='cpu', threads=args.threads, seed=0, no_amp=True,
                                                        no_channels_last=True)))
    command = 'python -m benchmarks.recipe_cost ' + ' '.join(
        [args.recipe] + [f"--variant {n}='{yaml.safe_dump(v, default_flow_style=True).strip()}'"
                         for n, v in args.variant])
    extra = ['vs BP, same frozen blocks'] if frozen is not None else []
    table = markdown_table(['variant', 'method', 'HFF changes', 'step (ms)', 'images/s', 'step time vs BP'] + extra,
                           [[r['variant'], r['method'], r['hff'] or '', r['step_ms'], r['img_per_s'],
                             f"{r['time_vs_bp']:.2f}x"] + ([f"{r['time_vs_bp_same_frozen']:.2f}x"] if extra else [])
                            for r in rows])
    md = (f'# Training step time of {args.recipe} vs BP, side by side\n\n`{command}`\n\n'
          f'{machine_line(info)}; batch {cfgs["bp"].batch_size}; '
          f'{args.rounds} interleaved rounds of {args.steps} steps; median per variant.\n\n{table}\n')
    result = dict(command=command, machine=info, recipe=args.recipe, rows=rows)
    write_outputs(args.out, md, result)
    print(md)
    return result


if __name__ == '__main__':
    main()
