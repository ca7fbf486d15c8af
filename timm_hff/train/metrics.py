"""Per-epoch metrics on disk: ``metrics.json``, ``metrics.csv`` and a PNG of per-stage accuracy curves.

Every file is written to a temporary name and renamed, so a reader (or a crash) never sees half a file.
"""
import csv
import io
import json
import os
from typing import Any, Dict, List, Optional

from ..core import atomic_write, atomic_write_text

__all__ = ['ema_metrics', 'final_metrics', 'plot_accuracy', 'stage_keys', 'summary_line', 'write_metrics']


def write_metrics(out_dir: str, history: List[Dict[str, Any]], plot: bool = True, run: Optional[Dict[str, Any]] = None,
                  test: Optional[Dict[str, Any]] = None) -> None:
    """(Re)write metrics.json, metrics.csv and accuracy.png from the whole history.

    ``metrics.json`` is ``{"run": <what was trained, on which splits, each stage's share>, "epochs": [<one row per
    epoch, evaluated on the validation split>], "test": <the test split, evaluated once at the end, or null>}``;
    ``metrics.csv`` has the epoch rows and, once the test split was evaluated, a last row whose epoch is ``test``.
    """
    doc = dict(run=run or {}, epochs=history, test=test)
    atomic_write_text(os.path.join(out_dir, 'metrics.json'), json.dumps(doc, indent=2) + '\n')
    rows = list(history) + ([dict(epoch='test', **test)] if test else [])
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in keys})
    atomic_write_text(os.path.join(out_dir, 'metrics.csv'), buf.getvalue())
    if plot and history:
        name = os.path.basename(os.path.normpath(out_dir))
        plot_accuracy(history, os.path.join(out_dir, 'accuracy.png'), title=f'{name}: validation top-1 per stage')


def _fmt(v: Any) -> Any:
    return f'{v:.6g}' if isinstance(v, float) else ('' if v is None else v)


def stage_keys(row: Dict[str, Any], prefix: str = 'top1') -> List[str]:
    """``top1_stage0``, ``top1_stage1``, ... in stage order."""
    keys = [k for k in row if k.startswith(f'{prefix}_stage')]
    return sorted(keys, key=lambda k: int(k.rsplit('stage', 1)[1]))


def plot_accuracy(history: List[Dict[str, Any]], path: str, title: Optional[str] = None) -> None:
    """Validation top-1 per stage and of the model's prediction, against the epoch."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    history = [row for row in history if 'top1' in row]   # the validated epochs (val_every)
    if not history:
        return
    epochs = [row['epoch'] for row in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for key in stage_keys(history[-1]):
        stage = int(key.rsplit('stage', 1)[1]) + 1
        ax.plot(epochs, [row.get(key) for row in history], marker='.', label=f'stage {stage}')
    ax.plot(epochs, [row.get('top1') for row in history], color='black', lw=2, label='prediction')
    if any('ema_top1' in row for row in history):
        ax.plot(epochs, [row.get('ema_top1') for row in history], color='black', ls='--', label='EMA prediction')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    ax.set_title(title or 'per-stage validation accuracy')
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png'))
    plt.close(fig)


def final_metrics(last: Dict[str, Any], test: Optional[Dict[str, Any]], ema: bool = False) -> Dict[str, Any]:
    """A model's figures at the end of a run: training figures of the last epoch, its validation accuracy under
    ``val_*`` and, with a test split, the test accuracy under the plain names (``top1``, ``top1_stage0``, ...); without
    one, the validation accuracy keeps the plain names. ``ema`` takes the EMA model's evaluations instead."""
    own = ema_metrics if ema else (lambda row: {k: v for k, v in row.items() if not k.startswith('ema_')})
    src = own(last)
    if test is None:
        return src
    tested = {k: v for k, v in own(test).items() if k != 'eval_time_s'}
    out = {k: v for k, v in src.items() if k not in tested}
    out.update({f'val_{k}': src[k] for k in tested if k in src})
    out.update(tested)
    return out


def ema_metrics(row: Dict[str, Any]) -> Dict[str, Any]:
    """The EMA model's view of an epoch's row: its own evaluation (``ema_*``) under the plain names, training
    figures (loss, lr, time) kept, the live model's evaluation dropped, so the EMA's card states the EMA's accuracy."""
    ema = {k[len('ema_'):]: v for k, v in row.items() if k.startswith('ema_')}
    return {**{k: v for k, v in row.items() if not k.startswith('ema_') and k not in ema}, **ema}


def summary_line(row: Dict[str, Any], num_stages: int, per_stage: bool, split: str = 'val') -> str:
    """The printed line of an epoch (or of the test split): top-1, top-5, every stage, the ensemble, the EMA."""
    if row['epoch'] == 'test':
        parts = [f"test ({split}): top-1 {row['top1']:.2f}%"]
    else:
        parts = [f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, {row['train_img_per_s']:.0f} img/s, "
                 f"val top-1 {row['top1']:.2f}%"]
    if 'top5' in row:
        parts.append(f"top-5 {row['top5']:.2f}%")
    if per_stage:
        parts.append('stages ' + ' / '.join(f"{row[f'top1_stage{k}']:.2f}" for k in range(num_stages)))
        parts.append(f"ensemble {row['top1_ensemble']:.2f}")
    if 'ema_top1' in row:
        parts.append(f"EMA {row['ema_top1']:.2f}%")
    return ', '.join(parts)
