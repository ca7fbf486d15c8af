"""Per-epoch metrics on disk: ``metrics.json``, ``metrics.csv`` and a PNG of per-stage accuracy curves.

Every file is written to a temporary name and renamed, so a reader (or a crash) never sees half a file.
"""
import csv
import io
import json
import os
from typing import Any, Dict, List, Optional


def atomic_write_text(path: str, text: str) -> None:
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    tmp = f'{path}.tmp-{os.getpid()}.png'
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
