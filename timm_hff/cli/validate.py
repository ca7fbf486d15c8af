"""``hff-validate``: evaluate a saved (or Hub) HFF model on any data source the trainer reads, like timm's validate.py.

    hff-validate local-dir:output/fashion_mnist_quick/model --dataset idx --data-dir /usr/share/datasets/fashion-mnist
    hff-validate hf-hub:org/repo --dataset hfds/uoft-cs/cifar10 --split test --results-file results.json
    python -m timm_hff.validate local-dir:runs/x/model_ema --dataset idx --data-dir ... --split 'train[54000:]'

Prints top-1 / top-5 of every stage, of the stage ensemble and of the model's prediction (``predict_from``), and
writes them as JSON with ``--results-file``. Preprocessing comes from the saved model (its ``pretrained_cfg``: the
normalisation and size it was trained with) unless overridden.
"""
import argparse
import json
import logging
import sys
import time
from typing import Any, Dict, List, Optional

__all__ = ['build_parser', 'main', 'parse_predict_from', 'validate']

_logger = logging.getLogger(__name__)


def validate(model, loader, num_classes: int, device: str = 'cpu', mixed_precision: str = 'no') -> Dict[str, Any]:
    """Top-1 / top-5 of every stage, the ensemble and the prediction over every image the loader yields."""
    import torch
    with torch.no_grad():
        return _validate(model, loader, num_classes, device, mixed_precision)


def _validate(model, loader, num_classes: int, device: str, mixed_precision: str) -> Dict[str, Any]:
    import torch
    from ..train.evaluate import accuracy_row, prediction_heads, topk_hits

    model.eval()
    k = min(5, num_classes)
    heads_n = model.num_stages + 2
    correct1 = torch.zeros(heads_n, dtype=torch.long)
    correct5 = torch.zeros(heads_n, dtype=torch.long)
    total = 0
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(mixed_precision)
    for x, y in loader.loader:
        x, y = loader.transform(x.to(device)), y.to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            heads = prediction_heads(model, x)
        c1, c5 = topk_hits(heads, y, k)
        correct1 += c1.sum(0).cpu()
        correct5 += c5.sum(0).cpu()
        total += c1.shape[0]
    if total == 0:
        raise ValueError('the split yielded no images; check --split and --num-samples')
    return accuracy_row(correct1, correct5, total, model.num_stages, num_classes, images_key='images')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='hff-validate', description=__doc__.split('\n\n')[0].replace('\n', ' '),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n', 2)[2])
    p.add_argument('model', help="a saved model: 'local-dir:<folder>' or 'hf-hub:<org>/<repo>[@revision]'")
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='',
                   help="'hfds/<hub id>', 'imagefolder', 'idx' (with --data-dir) or '' (infer)")
    g.add_argument('--data-dir', '--data_dir', default=None, help="folder for 'imagefolder' / 'idx'")
    g.add_argument('--dataset-config', default=None, help='Hub configuration name')
    g.add_argument('--split', default='test', help="split name or slice, e.g. 'test', 'validation', 'train[54000:]'")
    g.add_argument('--input-key', default=None, help='image column (inferred when omitted)')
    g.add_argument('--target-key', default=None, help='label column (inferred when omitted)')
    g.add_argument('--num-samples', type=int, default=None, help='evaluate the first N images only')
    g.add_argument('--workers', type=int, default=2, help='loader workers for per-image decoding')
    g.add_argument('--batch-size', type=int, default=256, help='images per batch')
    g = p.add_argument_group('preprocessing (default: what the model was trained with)')
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--interpolation', default=None)
    g = p.add_argument_group('model and device')
    g.add_argument('--predict-from', default=None, help="override the saved predict_from ('last', 'ensemble', k)")
    g.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1' (default: cuda if available)")
    g.add_argument('--mixed-precision', choices=('no', 'bf16', 'fp16'), default='no')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--threads', type=int, default=None, help='CPU threads (torch.set_num_threads)')
    g.add_argument('--results-file', default=None, help='write the results as JSON here')
    return p


def parse_predict_from(value: Optional[str]):
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _check_device(device: str) -> None:
    """A device this machine has, or one line saying which it has."""
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == 'cuda' and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f'--device {device}: this machine has {have} CUDA device(s); use --device cpu'
                         + (f' or cuda:0..cuda:{have - 1}' if have else ''))
    if dev.type not in ('cpu', 'cuda') and not getattr(torch, dev.type, None):
        raise ValueError(f"--device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch   # after parsing: --help and argument errors answer at once
    from ..data import create_image_loader, load_image_dataset, resolve_data_config
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        _check_device(device)
        if not args.model.startswith(('local-dir:', 'hf-hub:')):
            raise ValueError(f"model {args.model!r} is not a saved model; pass 'local-dir:<folder>' (a folder with "
                             f"config.json and model.safetensors) or 'hf-hub:<org>/<repo>'")
        print(f"hff-validate: loading {args.model} and {args.dataset or args.data_dir or 'the data'}:{args.split}, "
              f"then scoring on {device}", file=sys.stderr, flush=True)   # data loading can take a while: say so
        from ..factory import create_model
        model = create_model(args.model, pretrained=True)
        if args.predict_from is not None:
            model.set_predict_from(parse_predict_from(args.predict_from))
        model = model.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        data = load_image_dataset(args.dataset, args.data_dir, args.split, input_key=args.input_key,
                                  target_key=args.target_key, num_classes=model.num_classes,
                                  num_samples=args.num_samples, dataset_config=args.dataset_config)
        data_cfg = resolve_data_config(model, model.in_chans, args.img_size, args.mean, args.std, args.crop_pct,
                                       args.interpolation)
        loader = create_image_loader(data, data_cfg, False, args.batch_size, workers=args.workers,
                                     channels_last=args.channels_last)
        start = time.time()
        row = validate(model, loader, model.num_classes, device, args.mixed_precision)
    except (ValueError, OSError) as e:
        print(f'hff-validate: error: {e}', file=sys.stderr)
        return 2
    row['seconds'] = round(time.time() - start, 3)
    result = dict(model=args.model, dataset=data.name, split=data.split, predict_from=model.predict_from,
                  data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}, **row)
    stages = ' / '.join(f"{row[f'top1_stage{s}']:.2f}" for s in range(model.num_stages))
    print(f"{args.model} on {data.name}:{data.split} ({row['images']} images): top-1 {row['top1']:.2f}%"
          + (f", top-5 {row['top5']:.2f}%" if 'top5' in row else '')
          + f"; stages {stages}; ensemble {row['top1_ensemble']:.2f}")
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(result, f, indent=2)
            f.write('\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
