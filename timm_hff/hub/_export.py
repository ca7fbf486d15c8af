"""Export an HFF model to a plain timm classifier that loads without timm_hff.

The last HFF stage already runs through the backbone's own head path (``forward_head(pre_logits=True)``), so
only the classifier has to be made. Its head is

    e = W h + b               (the optional projection; identity when embed_dim is None)
    s_c = <e / ||e||, p_c>    (p_c: the unit prototype of class c)

and since ``||e||`` is one positive number per image, ``argmax_c s_c = argmax_c <e, p_c> = argmax_c (P W h + P b)_c``:
a linear layer with weight ``P W`` and bias ``P b`` has exactly the HFF prediction as its argmax (K = 1). Its
logits are ``||e|| * s_c``, a per-image rescaling of the cosines, so its softmax is not calibrated like HFF's.

With K > 1 prototypes per class, HFF takes a smooth maximum (LogSumExp) over a class's prototypes, which no
linear layer can express. Two approximations are offered (``multi_prototype``), each announced by a warning:

- ``'mean'`` (default): C outputs from each class's normalised mean prototype. A drop-in classifier, exact when a
  class's prototypes agree, but its argmax can differ where they spread out.
- ``'expand'``: C*K outputs, one per prototype, ordered class-major, with ``label_names`` repeated K times; the
  class is ``argmax // K``. This is HFF's rule with a hard max in place of the LogSumExp, which differs only when
  two classes' scores are within ``log(K) / scale``.
"""
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..core import atomic_dir
from ._build_config import saved_timm_kwargs, unwrap_model
from ._errors import CheckpointError
from ._format import CARD_NAME

__all__ = ['ExportError', 'MULTI_PROTOTYPE_MODES', 'export_timm', 'fold_last_head']


class ExportError(CheckpointError):
    """The model cannot be exported to a plain timm classifier; the message says why."""


MULTI_PROTOTYPE_MODES = ('mean', 'expand')


def export_timm(model, out_dir: Union[str, Path], label_names: Optional[Sequence[str]] = None,
                card: bool = True, multi_prototype: str = 'mean', metrics: Optional[dict] = None) -> str:
    """Write a stock timm model (``config.json`` + ``model.safetensors``) whose argmax is the HFF prediction.

    The folder loads in a process that never imports timm_hff:
    ``timm.create_model('local-dir:<out_dir>', pretrained=True)`` (or ``'hf-hub:...'`` once uploaded). The export
    is verified before it is written: on a probe batch, the timm model's logits must equal the folded HFF scores.

    Args:
        model: An ``HFFModel`` whose last stage is the full backbone (no truncated tail), built without
            ``small_input`` (stock timm cannot rebuild the modified stem).
        out_dir: The folder to write (atomically, as ``save_pretrained`` does).
        label_names: Class names; default the model's ``pretrained_cfg['label_names']``.
        card: Also write a short ``README.md`` saying what the export is.
        multi_prototype: With K > 1 prototypes per class: ``'mean'`` or ``'expand'`` (see the module docstring).
        metrics: The HFF model's evaluation (as saved with it: ``top1_stage<k>`` / ``stage_top1``, ``split``,
            ``dataset``); the card states the last stage's top-1, which the export reproduces (exactly for K = 1).

    Returns:
        The folder written, as a string.
    """
    from timm.models import save_for_hf
    model = unwrap_model(model)
    _check_exportable(model)
    if multi_prototype not in MULTI_PROTOTYPE_MODES:
        raise ValueError(f'multi_prototype must be one of {MULTI_PROTOTYPE_MODES}, got {multi_prototype!r}')
    weight, bias = fold_last_head(model, multi_prototype)
    k = model.hff_cfg.prototypes_per_class
    num_classes = weight.shape[0]
    plain = timm.create_model(model.model_name, pretrained=False, num_classes=num_classes, in_chans=model.in_chans,
                              **saved_timm_kwargs(model.backbone))
    # not timm's checkpoint: no tag, papers, origin or licence of weights this export did not come from
    plain.pretrained_cfg = {k: v for k, v in plain.pretrained_cfg.items() if k not in _NOT_THESE_WEIGHTS}
    classifier = plain.get_classifier()
    if not isinstance(classifier, nn.Linear) or tuple(classifier.weight.shape) != tuple(weight.shape):
        raise ExportError(f"'{model.model_name}' has a {type(classifier).__name__} classifier of shape "
                          f"{tuple(getattr(classifier, 'weight', torch.empty(0)).shape)}, not a Linear "
                          f"{tuple(weight.shape)}, so the folded head does not fit it")
    classifier_params = {n for n, p in plain.named_parameters() if any(p is q for q in classifier.parameters())}
    result = plain.load_state_dict(model.backbone.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - classifier_params:
        raise ExportError(f"the backbone's weights do not match a plain '{model.model_name}' (missing "
                          f"{sorted(set(result.missing_keys) - classifier_params)[:3]}, unexpected "
                          f"{result.unexpected_keys[:3]})")
    with torch.no_grad():
        classifier.weight.copy_(weight.to(classifier.weight.dtype))
        if classifier.bias is not None:
            classifier.bias.copy_(bias.to(classifier.bias.dtype))
        elif bias.abs().max() > 0:
            raise ExportError(f"'{model.model_name}''s classifier has no bias, but the projection does")
    plain.eval()
    _verify(model, plain, weight, bias)

    if label_names is None:
        label_names = model.pretrained_cfg.get('label_names')
    if label_names is not None:
        if len(label_names) != model.num_classes:
            raise ValueError(f'{len(label_names)} label_names for {model.num_classes} classes')
        label_names = [str(n) for n in label_names for _ in range(num_classes // model.num_classes)]
    data_keys = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')
    data_config = {k: model.pretrained_cfg[k] for k in data_keys if model.pretrained_cfg.get(k) is not None}
    if 'input_size' in data_config:
        data_config['input_size'] = (model.in_chans, *tuple(data_config['input_size'])[1:])
    for key in ('mean', 'std'):     # a fresh 1-channel model still carries the backbone's RGB statistics
        if len(tuple(data_config.get(key) or ())) not in (1, model.in_chans):
            data_config.pop(key)
    with atomic_dir(out_dir) as tmp:
        save_for_hf(plain, str(tmp), model_config={'label_names': list(label_names)} if label_names else None,
                    safe_serialization=True, data_config=data_config)
        if card:
            _export_card(model, multi_prototype if k > 1 else None, metrics).save(str(tmp / CARD_NAME))
    return str(Path(out_dir))


def fold_last_head(model, multi_prototype: str = 'mean') -> tuple:
    """(weight, bias) of the linear classifier equivalent (in argmax) to the last stage's head
    (``Head.linear_classifier``)."""
    folded = model.heads[-1].linear_classifier(multi_prototype)
    if folded is None:
        raise ExportError("the last stage's head has no linear classifier equivalent (an aux block, an unpooled input, "
                          "or a head type without Head.linear_classifier), so it is not linear in the pooled features")
    return folded


def _check_exportable(model) -> None:
    if not model.split.full_tail:
        raise ExportError(f'the last HFF stage ends at a truncated tap ({model.split.tap_names[-1]}), not at the '
                          f"backbone's head, so a plain timm '{model.model_name}' cannot compute it; export a model "
                          f'whose stage_indices end at the last feature_info index')
    if model.hff_cfg.small_input:
        raise ExportError(f"small_input changed the stem strides of '{model.model_name}', which a stock timm model "
                          f'cannot rebuild from config.json; publish the HFF model itself (push_to_hub), or train '
                          f'without small_input (e.g. upsampled inputs) to export')
    if model.predict_from != 'last':
        warnings.warn(f'the model predicts with predict_from={model.predict_from!r}; the export reproduces the '
                      f'last stage\'s prediction', stacklevel=2)


def _probe_size(model) -> int:
    size = getattr(model.split, 'probe_img_size', 0) or model.hff_cfg.check_img_size
    if not size:
        size = int((model.pretrained_cfg.get('input_size') or (3, 224, 224))[-1])
    return int(size)


def _verify(model, plain: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """The timm model's logits must equal the folded HFF head on a probe batch (catches head-path differences)."""
    was_training = model.training
    model.eval()
    size = _probe_size(model)
    x = torch.randn(4, model.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            pooled = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True).float()
            want = pooled @ weight.t() + bias
            got = plain(x).float()
    finally:
        model.train(was_training)
    tol = 1e-4 * max(1.0, want.abs().max().item())
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=tol):
        raise ExportError(f"a plain timm '{model.model_name}' does not reproduce the HFF head path (max difference "
                          f"{(got - want).abs().max().item():.3g}); this family's head is not exportable")


_NOT_THESE_WEIGHTS = ('hf_hub_id', 'hf_hub_filename', 'url', 'file', 'tag', 'paper_ids', 'paper_name', 'origin_url',
                      'notes', 'license', 'source', 'label_names', 'label_descriptions')


def _last_stage_top1(model, metrics: Optional[dict]):
    """(top-1 of the last stage, split, data set) from the HFF model's saved metrics, or None."""
    if not metrics:
        return None
    last = model.num_stages - 1
    stage = metrics.get('stage_top1')
    value = stage[last] if isinstance(stage, list) and len(stage) > last else metrics.get(f'top1_stage{last}')
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value), metrics.get('split'), metrics.get('dataset')


def _export_card(model, multi_prototype: Optional[str], metrics: Optional[dict] = None) -> ModelCard:
    base = model.pretrained_cfg.get('hf_hub_id') if model.pretrained_cfg.get('source') == 'hf-hub' else None
    measured = _last_stage_top1(model, metrics)
    results = None
    if measured and measured[2]:
        results = [EvalResult(task_type='image-classification', dataset_type=str(measured[2]),
                              dataset_name=str(measured[2]), dataset_split=measured[1], metric_type='accuracy',
                              metric_name='Top-1 (HFF last stage)', metric_value=measured[0])]
    data = ModelCardData(library_name='timm', pipeline_tag='image-classification', license='apache-2.0',
                         tags=['image-classification', 'timm', 'timm_hff'],
                         base_model=base.split('@')[0] if base else None, eval_results=results,
                         model_name=f'{model.model_name} (HFF export)' if results else None)
    k = model.hff_cfg.prototypes_per_class
    fidelity = {None: 'exactly',
                'mean': f'approximately ({k} prototypes per class were averaged into one)',
                'expand': f'up to LogSumExp vs max: it has one output per prototype, class = index // {k}'}
    return ModelCard(
        f'---\n{data.to_yaml()}\n---\n\n# {model.model_name}, exported from an HFF model\n\n'
        f'A stock timm `{model.model_name}` with a linear classifier folded from the last stage of a Hyperspherical '
        f'Forward-Forward (HFF, arXiv 2605.00082) model. It loads with timm alone:\n\n```python\nimport timm\n\n'
        f"model = timm.create_model('local-dir:/path/to/this/folder', pretrained=True).eval()\n```\n\n"
        f'Its argmax is the HFF last-stage prediction {fidelity[multi_prototype]}; its logits are the HFF cosine '
        f'scores times a positive per-image factor, so its softmax is not calibrated like the HFF model\'s.\n'
        + (f'\nMeasured: the HFF model\'s last stage, which this export reproduces {fidelity[multi_prototype]}, has '
           f'top-1 {measured[0]:.2f}%' + (f' on the {measured[1]} split' if measured[1] else '')
           + (f' of {measured[2]}' if measured[2] else '') + '.\n' if measured else ''))
