"""Model cards for saved HFF models, built with ``huggingface_hub.ModelCard`` from ``config.json`` alone.

Everything the card shows (metrics, recipe, stages, cost) is stored in ``config.json``, so ``push_to_hub`` can
rebuild the card on every push. The front matter is ``ModelCardData`` + ``EvalResult``: ``library_name: timm``,
the HFF tags, ``datasets`` as Hub ids, ``base_model`` when fine-tuned, and a ``model-index`` holding the top-1 of
the final prediction and of every stage. The body is ``CARD_TEMPLATE`` (a Jinja template, also kept as
``model_cards/TEMPLATE.md``; pass ``template_path`` to use another).
"""
import html
import re
from typing import Any, Dict, List, Optional

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ['CARD_TEMPLATE', 'DATASET_HUB_IDS', 'DATASET_NAMES', 'PAPER', 'TAGS', 'build_model_card', 'hub_dataset_id',
           'stage_values']

TAGS = ['image-classification', 'timm', 'timm_hff', 'local-learning', 'forward-forward']
PAPER = 'arXiv 2605.00082'
DATASET_NAMES = {
    'zalando-datasets/fashion_mnist': 'Fashion-MNIST', 'ylecun/mnist': 'MNIST', 'uoft-cs/cifar10': 'CIFAR-10',
    'uoft-cs/cifar100': 'CIFAR-100', 'ILSVRC/imagenet-1k': 'ImageNet-1k',
}
# metrics that describe the evaluation rather than a measurement
_NOT_MEASURES = {'dataset', 'split', 'eval_split', 'val_split'}
# substrings of metric names that are a cost (time, throughput, memory, compute)
_COST_WORDS = ('time', 'per_s', 'img_s', 'mem', 'flop', 'mac', 'throughput', 'latency', 'energy', 'params')
# short data set names used by recipes -> Hub ids (the card's ``datasets`` must be Hub ids)
DATASET_HUB_IDS = {
    'fashion_mnist': 'zalando-datasets/fashion_mnist', 'fashion-mnist': 'zalando-datasets/fashion_mnist',
    'fashionmnist': 'zalando-datasets/fashion_mnist', 'mnist': 'ylecun/mnist', 'cifar10': 'uoft-cs/cifar10',
    'cifar-10': 'uoft-cs/cifar10', 'cifar100': 'uoft-cs/cifar100', 'cifar-100': 'uoft-cs/cifar100',
    'imagenet1k': 'ILSVRC/imagenet-1k', 'imagenet-1k': 'ILSVRC/imagenet-1k', 'imagenet': 'ILSVRC/imagenet-1k',
}

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A timm `{{ arch }}` trained with **Hyperspherical Forward-Forward (HFF)** ({{ paper }}){% if dataset_name %} on
{{ dataset_name }}{% endif %} with the `timm_hff` library.
HFF trains each stage with its own local loss: the stage output is projected onto the unit sphere and classified
against learned class prototypes, so no gradient crosses a stage boundary and one forward pass predicts.

## Usage

```python
import timm_hff
import torch

model = timm_hff.create_model('{{ model_id }}', pretrained=True).eval()
x = torch.randn(1, {{ in_chans }}, {{ img_size }}, {{ img_size }})  # a batch preprocessed as in training
with torch.no_grad():
    probs = model(x).softmax(-1)            # one forward pass
    stage_logits = model.forward_stages(x)  # every stage's prediction (early exit, analysis)
{%- if has_labels %}
print(model.pretrained_cfg['label_names'][probs.argmax().item()])
{%- endif %}
```

After `import timm_hff`, `timm.create_model('{{ model_id }}', pretrained=True)` returns the same model, and
`timm.data.resolve_model_data_config(model)` gives its preprocessing.

## Model

| | |
|---|---|
| Backbone | `{{ arch }}` from timm
{%- if base_model %}, fine-tuned from [`{{ base_model }}`](https://huggingface.co/{{ base_model }}){% endif %} |
| Classes | {{ num_classes }} |
| Input | {{ in_chans }} x {{ img_size }} x {{ img_size }} |
| Parameters | {{ num_params }} |
{%- for key, value in settings %}
| {{ key }} | `{{ value }}` |
{%- endfor %}

## Accuracy{% if dataset_name %} ({{ dataset_name }}{% if split %}, {{ split }} split{% endif %}){% endif %}

{% if has_accuracy -%}
{{ accuracy_table }}

Each stage trains only its own slice of the backbone (its share of the backbone's parameters and of one forward
pass's FLOPs, and the conv/linear layers in it) and its prototype head; no gradient crosses a stage boundary.
{%- if split %}
Top-1 is measured on the {{ split }} split.
{%- endif %}
{%- if has_val %}
Validation top-1 is measured on {{ val_split }}, the split the training settings were chosen on.
{%- endif %}
{%- else -%}
No evaluation was recorded with this checkpoint.
{%- endif %}

## Training

{% if recipe -%}
The recipe (hyper-parameters) this checkpoint was trained with:

{{ fence }}yaml
{{ recipe }}{{ fence }}
{%- else -%}
No training recipe was recorded with this checkpoint.
{%- endif %}
{%- if other %}

At the end of training:

| Measure | Value |
|---|---|
{%- for key, value in other %}
| {{ key }} | {{ value }} |
{%- endfor %}
{%- endif %}

## Measured cost

{% if cost -%}
| Measure | Value |
|---|---|
{%- for key, value in cost %}
| {{ key }} | {{ value }} |
{%- endfor %}
{%- else -%}
No cost was measured for this checkpoint.
{%- endif %}

## Citation

```bibtex
@misc{hff2026,
  title         = {Hyperspherical Forward-Forward with Prototypical Representations},
  year          = {2026},
  eprint        = {2605.00082},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
  url           = {https://arxiv.org/abs/2605.00082}
}
```
"""


def build_model_card(config: Dict[str, Any], repo_id: Optional[str] = None,
                     template_path: Optional[str] = None) -> ModelCard:
    """The model card for a saved model's ``config.json`` content.

    Args:
        config: The parsed ``config.json`` (as written by ``save_pretrained``).
        repo_id: The Hub repository; names the model in ``model-index`` and in the usage block. Without it the
            usage block loads the local folder.
        template_path: A Jinja template to use instead of ``CARD_TEMPLATE``.
    """
    hff = config['hff']
    metrics = hff.get('metrics') or {}
    train_args = hff.get('train_args') or {}
    arch = hff['arch']
    stages = hff.get('stages') or []
    hff_cfg = hff.get('config') or {}

    dataset = metrics.get('dataset') or train_args.get('dataset_name') or train_args.get('dataset')
    dataset_id = hub_dataset_id(dataset)
    dataset_name = DATASET_NAMES.get(dataset_id or '', dataset if isinstance(dataset, str) else None)
    split = metrics.get('split') or metrics.get('eval_split') or train_args.get('val_split')
    split = _md(split) if split else None
    stage_top1 = stage_values(metrics, 'top1', len(stages))
    stage_top5 = stage_values(metrics, 'top5', len(stages))
    model_name = repo_id or f'hff-{arch}' + (f'-{dataset_id.split("/")[-1]}' if dataset_id else '')
    base_model = hff.get('base_model') if _is_hub_id(hff.get('base_model')) else None   # a link: Hub ids only
    if base_model and repo_id and base_model == repo_id:
        base_model = None           # pushing a loaded model back to where it came from is not fine-tuning
    license_ = train_args.get('license')

    eval_results = _eval_results(metrics, stage_top1, stage_top5, dataset_id or dataset, dataset_name, split)
    card_data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=license_ if isinstance(license_, str) and re.fullmatch(r'[\w.+-]{1,64}', license_) else 'apache-2.0',
        tags=list(TAGS),
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_model or None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    input_size = (config.get('pretrained_cfg') or {}).get('input_size')
    if not (isinstance(input_size, list) and len(input_size) == 3 and all(type(n) is int for n in input_size)):
        input_size = [hff['in_chans'] if type(hff.get('in_chans')) is int else 3, 224, 224]
    stage_rows, table, has_val = _accuracy_table(stages, metrics, stage_top1, stage_top5, hff_cfg)
    measures = [(k, v) for k, v in metrics.items() if k not in _NOT_MEASURES and v is not None
                and not re.fullmatch(r'(val_)?(stage_)?top[15](_stage\d+)?', k)]
    recipe = yaml.safe_dump(train_args, sort_keys=False, default_flow_style=None) if train_args else ''
    kwargs = dict(
        title=_md(model_name.split('/')[-1]),
        paper=PAPER,
        arch=_in_code(arch),
        model_id=f'hf-hub:{repo_id}' if repo_id else 'local-dir:/path/to/this/folder',
        in_chans=input_size[0],
        img_size=input_size[-1],
        num_classes=_md(config.get('num_classes')),
        num_params=_count(hff.get('num_params')),
        has_labels=bool(config.get('label_names') or hff.get('label_names')),
        base_model=base_model,
        dataset_name=_md(dataset_name) if dataset_name else None,
        split=split,
        has_val=has_val,
        accuracy_table=table,
        val_split=_md(metrics.get('val_split') or 'the validation split'),
        settings=[(k, _in_code(v)) for k, v in _settings(hff_cfg, len(stages))],
        has_accuracy=metrics.get('top1') is not None or any(v is not None for v in stage_top1),
        has_top5=metrics.get('top5') is not None or any(v is not None for v in stage_top5),
        stage_rows=stage_rows,
        predict_from=_in_code(hff_cfg.get('predict_from', 'last')),
        top1=_md(_pct(metrics.get('top1'))),
        top5=_md(_pct(metrics.get('top5'))),
        recipe=recipe,
        fence=_fence(recipe),
        cost=[(_md(k), _fmt(v)) for k, v in measures if any(w in k for w in _COST_WORDS)],
        other=[(_md(k), _fmt(v)) for k, v in measures if not any(w in k for w in _COST_WORDS)],
    )
    if template_path:
        return ModelCard.from_template(card_data, template_path=template_path, **kwargs)
    return ModelCard.from_template(card_data, template_str=CARD_TEMPLATE, **kwargs)


def _accuracy_table(stages, metrics, stage_top1, stage_top5, hff_cfg):
    """(the template's stage rows, the markdown accuracy table, whether validation figures are shown)."""
    val_top1 = stage_values(metrics, 'val_top1', len(stages))
    has_val = metrics.get('val_top1') is not None
    stage_rows = [dict(name=f'Stage {k + 1}', module=_in_code(s.get('module', s.get('feature_index'))),
                       channels=_md(s.get('channels')), reduction=_md(s.get('reduction')),
                       params=_count(s.get('params')), param_share=_share(s.get('param_share')),
                       flops_share=_share(s.get('flops_share')), layers=_md(s.get('layers', '–')),
                       top1=_md(_pct(stage_top1[k])), top5=_md(_pct(stage_top5[k])), val_top1=_md(_pct(val_top1[k])))
                  for k, s in enumerate(stages) if isinstance(s, dict)]
    headers = ['Prediction', 'Tap (timm module)', 'Width', 'Stride', 'Parameters', 'Backbone params',
               'Backbone FLOPs', 'Conv/linear layers', 'Top-1 (%)']
    if metrics.get('top5') is not None or any(v is not None for v in stage_top5):
        headers.append('Top-5 (%)')
    headers += ['Val top-1 (%)'] if has_val else []
    table = [headers, ['---'] * len(headers)]
    for r in stage_rows:
        cells = [r['name'], f"`{r['module']}`", r['channels'], r['reduction'], r['params'], r['param_share'],
                 r['flops_share'], r['layers'], r['top1']]
        table.append(cells + ([r['top5']] if 'Top-5 (%)' in headers else []) + ([r['val_top1']] if has_val else []))
    final = [f"**Final** (`predict_from={_in_code(hff_cfg.get('predict_from', 'last'))}`)"] + [''] * 7
    final += [f"**{_md(_pct(metrics.get('top1')))}**"] + (
        [f"**{_md(_pct(metrics.get('top5')))}**"] if 'Top-5 (%)' in headers else [])
    table.append(final + ([_md(_pct(metrics.get('val_top1')))] if has_val else []))
    return stage_rows, '\n'.join('| ' + ' | '.join(str(c) for c in row) + ' |' for row in table), has_val


def stage_values(metrics: Dict[str, Any], key: str, num_stages: int) -> List[Any]:
    """Per-stage values of ``key`` ('top1'): a list ``stage_top1`` or the trainer's flat ``top1_stage0``, ..."""
    values = metrics.get(f'stage_{key}')
    if isinstance(values, list):
        return (values + [None] * num_stages)[:num_stages]
    return [metrics.get(f'{key}_stage{k}') for k in range(num_stages)]


def _eval_results(metrics: Dict[str, Any], stage_top1: List[Any], stage_top5: List[Any],
                  dataset_type: Optional[str], dataset_name: Optional[str], split: Optional[str]) -> List[EvalResult]:
    """model-index entries: top-1 (and top-5) of the final prediction, then of every stage."""
    if not dataset_type:
        return []
    common = dict(task_type='image-classification', dataset_type=dataset_type,
                  dataset_name=dataset_name or dataset_type, dataset_split=split)
    out = []
    for key, label, per_stage in (('top1', 'Top-1', stage_top1), ('top5', 'Top-5', stage_top5)):
        if metrics.get(key) is not None:
            out.append(EvalResult(metric_type='accuracy', metric_name=f'{label} (final)', metric_value=metrics[key],
                                  **common))
        for k, value in enumerate(per_stage):
            if value is not None:
                out.append(EvalResult(metric_type='accuracy', metric_name=f'{label} (stage {k + 1})',
                                      metric_value=value, **common))
    return out


def _settings(cfg: Dict[str, Any], num_stages: int) -> List[tuple]:
    keys = ('prototypes_per_class', 'embed_dim', 'scale', 'margin', 'aux', 'pool', 'small_input')
    exits = ()   # adaptive exit, when fitted: the rule and its setting (the operating point is in the metrics)
    if cfg.get('exit_thresholds') is not None:
        exits = ('exit_rule', 'exit_thresholds')
    elif cfg.get('exit_rule') == 'patience':
        exits = ('exit_rule', 'exit_patience')
    return [('HFF stages', num_stages)] + [(k, cfg[k]) for k in keys + exits if k in cfg]


def _pct(v: Any) -> str:
    return '–' if v is None else (f'{v:.2f}' if isinstance(v, float) else str(v))


def _share(v: Any) -> str:
    return f'{v:.1%}' if isinstance(v, (int, float)) and not isinstance(v, bool) else '–'


def _count(n: Any) -> str:
    if not isinstance(n, int):
        return '–'
    return f'{n / 1e6:.2f} M' if n >= 1e6 else (f'{n / 1e3:.1f} K' if n >= 1e3 else str(n))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f'{v:,.1f}' if abs(v) >= 100 else f'{v:.4g}'
    if isinstance(v, (list, dict)):
        return f'`{_in_code(v)}`'
    return _md(v)


# ----- text from config.json, which anyone can write, shown as written: never as Markdown or HTML -----
_CONTROL = re.compile(r'[\x00-\x1f\x7f]+')
_MARKUP = re.compile(r'([\\`*\[\]|])')
_BLOCK_START = re.compile(r'^(\s*\d*)([-+#>=]|(?<=\d)[.)](?=\s|$))')


def _md(value: Any, width: int = 200) -> str:
    """Text for a line or a table cell: one line, HTML escaped, Markdown's link, emphasis, code and cell syntax
    escaped, and no list, heading or quote marker at its start, so a label or metric name cannot restructure the
    card (or inject a link or a script)."""
    text = _CONTROL.sub(' ', str(value))[:width]
    text = _MARKUP.sub(r'\\\1', html.escape(text, quote=False))
    return _BLOCK_START.sub(lambda m: m.group(1) + '\\' + m.group(2), text)


def _in_code(value: Any, width: int = 200) -> str:
    """Text inside a one-backtick code span of a table: no backtick to end the span, no '|' to end the cell."""
    return _CONTROL.sub(' ', str(value))[:width].replace('`', "'").replace('|', '\\|')


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text``, so no line of it can close the block early."""
    longest = max((len(m) for m in re.findall(r'`+', text)), default=0)
    return '`' * max(3, longest + 1)


def _is_hub_id(value: Any) -> bool:
    return isinstance(value, str) and bool(re.fullmatch(r'[\w.-]{1,96}(/[\w.-]{1,96})?', value)) and '..' not in value


def hub_dataset_id(name: Optional[str]) -> Optional[str]:
    """A data set's Hub id from a recipe's name ('fashion_mnist', 'hfds/uoft-cs/cifar10', 'uoft-cs/cifar10')."""
    if not isinstance(name, str) or not name:
        return None
    for prefix in ('hfds/', 'hf-hub:', 'hf://datasets/'):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.lower() in DATASET_HUB_IDS:
        return DATASET_HUB_IDS[name.lower()]
    base = name.rstrip('/').rsplit('/', 1)[-1].lower()
    if name.startswith(('/', '.', '~')) and base in DATASET_HUB_IDS:     # a local copy, e.g. an IDX folder
        return DATASET_HUB_IDS[base]
    if re.fullmatch(r'[\w.-]+/[\w.-]+', name) and not name.startswith(('.', '/')):
        return name
    return None
