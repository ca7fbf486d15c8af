"""``hff-train``: train from a YAML recipe, with any setting overridden on the command line.

    hff-train --config recipes/fashion_mnist_quick.yaml
    hff-train --config recipes/fashion_mnist.yaml --epochs 30 --lr 0.05 --baseline bp
    hff-train --config recipes/cifar10.yaml --resume                 # continue output/cifar10 from its last epoch
    accelerate launch --num_processes 2 -m timm_hff.train --config recipes/cifar10.yaml
    hff-train --config recipes/fashion_mnist_stage_parallel.yaml     # one process per stage (starts them itself)

Every ``TrainConfig`` field is a flag (``--batch-size 64`` or ``--batch_size 64``); values are read as YAML, so
``--model-kwargs '{channels: [16, 32, 64, 128]}'`` and ``--freeze-stages '[0, 1]'`` work.
"""
import argparse
import dataclasses
import difflib
import logging
import re
import sys
import typing
from dataclasses import fields
from typing import Any, Dict, List, Optional, Union

import yaml

from ..train.checkpoint import RunInUseError
from ..train.config import ALIASES, TrainConfig, packaged_recipes, recipe_path
from ..train.help import GROUPS, help_text
from ..train.registry import get_method, get_schedule, method_names

__all__ = ['build_parser', 'main', 'one_line', 'parse_overrides', 'resolve_config']


class _Parser(argparse.ArgumentParser):
    """argparse, plus "did you mean" for a mistyped flag (timm users type --learning-rate, --num-epochs...)."""

    def error(self, message: str):
        if 'unrecognized arguments' in message:
            flags = [s for a in self._actions for s in a.option_strings if s.startswith('--')]
            for word in message.split(':', 1)[1].split():
                if word.startswith('--'):
                    key = word[2:].split('=')[0].replace('-', '_')
                    if key == 'device':   # not a setting: Accelerate places the run
                        message += ('; hff-train has no --device: Accelerate trains on CUDA when it is available, '
                                    "else on the CPU (CUDA_VISIBLE_DEVICES='' for the CPU; accelerate launch for "
                                    'several GPUs)')
                        break
                    close = ([f'--{ALIASES[key]}'] if key in ALIASES
                             else difflib.get_close_matches(word.split('=')[0], flags, n=1))
                    if close:
                        message += f"; did you mean '{close[0]}'?"
                        break
        super().error(one_line(message))


def one_line(message: object) -> str:
    """The error as one line: a value echoed from the command line (a flag holding a newline) cannot add lines."""
    return re.sub(r'[\x00-\x1f\x7f]', lambda m: repr(m.group())[1:-1], str(message))


def _type_label(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return f'{_type_label(inner[0])} or null'
    if origin in (list, List):
        return f'list of {_type_label(args[0])}'
    if origin in (dict, Dict):
        return 'mapping'
    return getattr(tp, '__name__', str(tp))


def build_parser() -> argparse.ArgumentParser:
    baselines = [m for m in method_names() if get_method(m).baseline]
    parser = _Parser(
        prog='hff-train', description='Train an HFF (or a BP baseline) model from a YAML recipe.',
        usage=f"hff-train --config recipes/<name>.yaml [--<setting> VALUE ...] [--baseline {'|'.join(baselines)}] "
              f"[--resume [PATH]]",
        epilog='Every setting can be given in the recipe or as --<setting> VALUE (--batch-size 64 or --batch_size 64); '
               'values are YAML: --hff \'{margin: 0.3}\', --freeze-stages \'[0, 1]\', --crop-pct null. Recipes: '
               'recipes/*.yaml.', formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', '-c', default=None, help='YAML recipe, or a shipped recipe by name (e.g. '
                        'fashion_mnist_quick)')
    parser.add_argument('--baseline', choices=baselines, default=None,
                        help="train the same backbone another way: 'bp' (timm's head, end to end) or 'ff' "
                             "(Forward-Forward at HFF's stage cut; its settings: --ff '{threshold: 2.0}')")
    parser.add_argument('--resume', nargs='?', const='latest', default=argparse.SUPPRESS, metavar='PATH',
                        help='continue from a checkpoint or run folder; bare --resume: this run\'s latest')
    parser.add_argument('--torchcompile', nargs='?', const='inductor', default=argparse.SUPPRESS, metavar='BACKEND',
                        help="torch.compile the model (backend, default 'inductor'; HFF: block by block, the cuts stay "
                             "eager)")
    hints = typing.get_type_hints(TrainConfig)
    groups = {g: parser.add_argument_group(f'{g} parameters') for g in GROUPS}
    for f in fields(TrainConfig):
        if f.name in ('resume', 'torchcompile'):
            continue
        group, text = help_text(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f'--{f.name.replace("_", "-")}'] + ([f'--{f.name}'] if '_' in f.name else [])
        groups[group].add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar='VALUE',
                                   help=f'{text} [{_type_label(hints[f.name])}, default: {_yaml_value(default)}]')
    return parser


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip() or "''"


def resolve_config(ns: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the recipe, the command line's settings over it, and ``--baseline``."""
    overrides = parse_overrides(ns)
    if ns.baseline:
        overrides['method'] = ns.baseline
        _baseline_schedule(ns, overrides)
    return TrainConfig.from_yaml(ns.config, overrides) if ns.config else TrainConfig.from_dict(overrides)


def _baseline_schedule(ns: argparse.Namespace, overrides: Dict[str, Any]) -> None:
    """``--baseline`` on a recipe whose schedule is HFF's own (stage_parallel, sequential, ...): the baseline trains as
    it can (its first schedule), said in one line; a schedule given on the command line is kept (and refused)."""
    method = get_method(ns.baseline)
    if 'schedule' in overrides or not ns.config or method.schedules is None:
        return
    try:
        with open(recipe_path(ns.config)) as f:
            schedule = (yaml.safe_load(f) or {}).get('schedule')
    except (OSError, yaml.YAMLError, AttributeError):
        return   # TrainConfig.from_yaml reports the recipe's own problem
    if isinstance(schedule, str) and schedule not in method.schedules:
        logging.getLogger(__name__).warning(f"--baseline {ns.baseline}: the recipe's schedule {schedule!r} is HFF's; "
                                            f"method {ns.baseline!r} {method.schedule_reason}, so it runs with "
                                            f"schedule {method.schedules[0]!r}")
        overrides['schedule'] = method.schedules[0]


def parse_overrides(ns: argparse.Namespace) -> Dict[str, Any]:
    """Flag values as YAML scalars / lists / mappings ('0.1' -> 0.1, 'null' -> None, '[0, 1]' -> [0, 1])."""
    out: Dict[str, Any] = {}
    names = {f.name for f in fields(TrainConfig)}
    for key, value in vars(ns).items():
        if key not in names:
            continue
        if key == 'resume' or not isinstance(value, str):
            out[key] = value
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out[key] = value if parsed is None and value not in ('null', '~', 'None') else parsed
        if isinstance(out[key], (int, float)) and TrainConfig.__dataclass_fields__[key].type in ('str', str):
            out[key] = value   # --experiment 2024 stays a string
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.__dict__.get('progress', True) else logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    for noisy in ('httpx', 'urllib3', 'datasets', 'accelerate.checkpointing', 'accelerate.accelerator'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not ns.config and len(argv if argv is not None else sys.argv[1:]) == 0:
        print(f"hff-train: error: no recipe given; pass --config <recipe>.yaml or a shipped recipe's name "
              f"({', '.join(packaged_recipes())}), or --help for every setting", file=sys.stderr)
        return 2
    try:
        cfg = resolve_config(ns)
        trainer = get_schedule(cfg.schedule).create_trainer(cfg)
    except (ValueError, OSError, RunInUseError) as e:   # bad settings, data, checkpoint or output folder
        print(f'hff-train: error: {one_line(e)}', file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except (FloatingPointError, OSError) as e:   # a NaN / inf loss, a full or read-only disk: the message says what
        print(f'hff-train: error: {one_line(e)}', file=sys.stderr)   # was kept and how to continue
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
