"""``hff-train``: train from a YAML recipe, with any setting overridden on the command line.

    hff-train --config recipes/fashion_mnist_quick.yaml
    hff-train --config recipes/fashion_mnist.yaml --epochs 30 --lr 0.05 --baseline bp
    hff-train --config recipes/cifar10.yaml --resume                 # continue output/cifar10 from its last epoch
    accelerate launch --num_processes 2 -m timm_hff.train --config recipes/cifar10.yaml

Every ``TrainConfig`` field is a flag (``--batch-size 64`` or ``--batch_size 64``); values are read as YAML, so
``--model-kwargs '{channels: [16, 32, 64, 128]}'`` and ``--freeze-stages '[0, 1]'`` work.
"""
import argparse
import logging
import sys
from dataclasses import fields
from typing import Any, Dict, List, Optional

import yaml

from ._checkpoint import RunInUseError
from ._config import METHODS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='hff-train', description='Train an HFF (or a BP baseline) model from a YAML recipe.',
        epilog='Any TrainConfig field can be given as --<field> VALUE (YAML syntax); see recipes/*.yaml.')
    parser.add_argument('--config', '-c', default=None, help='YAML recipe (e.g. recipes/fashion_mnist_quick.yaml)')
    parser.add_argument('--baseline', choices=[m for m in METHODS if m != 'hff'], default=None,
                        help="train the same backbone with its timm head end to end instead ('bp')")
    parser.add_argument('--resume', nargs='?', const='auto', default=argparse.SUPPRESS, metavar='PATH',
                        help='continue from a checkpoint or run folder; bare --resume: this run\'s latest')
    for f in fields(TrainConfig):
        if f.name == 'resume':
            continue
        flags = [f'--{f.name.replace("_", "-")}'] + ([f'--{f.name}'] if '_' in f.name else [])
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar='VALUE',
                            help=argparse.SUPPRESS)
    return parser


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
    try:
        overrides = parse_overrides(ns)
        if ns.baseline:
            overrides['method'] = ns.baseline
        cfg = TrainConfig.from_yaml(ns.config, overrides) if ns.config else TrainConfig.from_dict(overrides)
        from ._trainer import Trainer
        trainer = Trainer(cfg)
    except (ValueError, OSError, RunInUseError) as e:   # bad settings, data, checkpoint or output folder
        print(f'hff-train: error: {e}', file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except (FloatingPointError, OSError) as e:   # a NaN / inf loss, a full or read-only disk: the message says what
        print(f'hff-train: error: {e}', file=sys.stderr)   # was kept and how to continue
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
