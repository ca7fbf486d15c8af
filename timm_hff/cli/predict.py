"""``hff-predict``: classify image files with a saved (or Hub) HFF model and print the top-k class names, like timm's
inference.py.

    hff-predict local-dir:output/fashion_mnist_quick/model shoe.png
    hff-predict hf-hub:org/repo photos/ --top-k 3 --results-file predictions.json
    hff-predict local-dir:output/fashion_mnist_quick/model shoe.png --predict-from adaptive   # per-image early exit

Each image is read with PIL and preprocessed exactly as ``hff-validate`` and the trainer's evaluation do (the same
``SampleTransform`` + ``BatchTransform``: the model's channels, timm's eval resize / crop, normalisation) at the
model's own data config (its ``pretrained_cfg``: the size and normalisation it was trained with). Folders are
searched recursively for image files. Probabilities are the softmax of the prediction's
logits (scaled cosine similarities to the class prototypes); class names come from the saved ``label_names``.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

__all__ = ['IMG_EXTENSIONS', 'build_parser', 'find_images', 'load_image', 'main', 'predict']

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')


def find_images(paths: List[str]) -> List[str]:
    """Image files named directly or found (recursively, sorted) under the folders named."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(root, f) for root, _, files in os.walk(p) for f in files
                           if f.lower().endswith(IMG_EXTENSIONS))
            if not found:
                raise ValueError(f'{p}: no image files ({", ".join(IMG_EXTENSIONS)}) in this folder')
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f'{p}: no such file or folder')
    return out


def load_image(path: str, transform):
    """One file through the trainer's per-sample eval transform (mode conversion, resize, centre crop)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            return transform(img)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f'{path}: not a readable image ({type(e).__name__}); pass image files or folders') from None


def predict(model, files: List[str], top_k: int = 5, batch_size: int = 32,
            device: str = 'cpu') -> List[Dict[str, Any]]:
    """Top-k (class index, name, probability) of every file, in order."""
    import torch
    with torch.no_grad():
        return _predict(model, files, top_k, batch_size, device)


def _predict(model, files: List[str], top_k: int, batch_size: int, device: str) -> List[Dict[str, Any]]:
    import torch
    from ..data import BatchTransform, SampleTransform, resolve_data_config

    data_cfg = resolve_data_config(model, model.in_chans)   # what hff-validate and the trainer's evaluation use
    per_sample, per_batch = SampleTransform(data_cfg, train=False), BatchTransform(data_cfg, train=False)
    names = model.pretrained_cfg.get('label_names') or [str(i) for i in range(model.num_classes)]
    k = min(top_k, model.num_classes)
    model.eval().to(device)
    results = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        x = per_batch(torch.stack([load_image(f, per_sample) for f in chunk]).to(device))
        prob = model(x).float().softmax(-1)
        p, idx = prob.topk(k, dim=-1)
        for f, pi, ii in zip(chunk, p.tolist(), idx.tolist()):
            results.append(dict(file=f, top=[dict(index=c, label=names[c], prob=round(q, 4)) for c, q in zip(ii, pi)]))
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='hff-predict', description=__doc__.split('\n\n')[0].replace('\n', ' '),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n', 2)[2])
    p.add_argument('model', help="a saved model: 'local-dir:<folder>' or 'hf-hub:<org>/<repo>[@revision]'")
    p.add_argument('images', nargs='+', help='image files and / or folders of images')
    p.add_argument('--top-k', type=int, default=5, help='class names printed per image')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--predict-from', default=None,
                   help="override the saved predict_from ('last', 'ensemble', 'adaptive', or a stage index)")
    p.add_argument('--device', default=None, help="'cpu', 'cuda' (default: cuda if available)")
    p.add_argument('--threads', type=int, default=None, help='CPU threads (torch.set_num_threads)')
    p.add_argument('--results-file', default=None, help='also write the predictions as JSON here')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch   # after parsing: --help and argument errors answer at once
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        if args.top_k < 1 or args.batch_size < 1:
            raise ValueError(f'--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}')
        if not args.model.startswith(('local-dir:', 'hf-hub:')):
            raise ValueError(f"model {args.model!r} is not a saved model; pass 'local-dir:<folder>' (a folder with "
                             f"config.json and model.safetensors) or 'hf-hub:<org>/<repo>'")
        files = find_images(args.images)
        from ..factory import create_model
        model = create_model(args.model, pretrained=True)
        if args.predict_from is not None:
            from .validate import parse_predict_from
            model.set_predict_from(parse_predict_from(args.predict_from))
        results = predict(model, files, args.top_k, args.batch_size, device)
    except (ValueError, OSError) as e:
        print(f'hff-predict: error: {e}', file=sys.stderr)
        return 2
    for r in results:
        print(f"{r['file']}: " + ', '.join(f"{t['label']} {100 * t['prob']:.1f}%" for t in r['top']))
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(dict(model=args.model, predictions=results), f, indent=2)
            f.write('\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
