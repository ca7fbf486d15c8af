"""``timm.create_model`` with timm's pretrained weights from the Hub, its cache, or a local safetensors file.

One place for the backbone of every method (HFF, BP, FF), so each gets the same three ways to its weights and the
same one-line error when none is reachable. timm does the loading (``pretrained_cfg_overlay=dict(file=...)`` for a
local file, ``hf_hub_download`` for the Hub, with its cache and ``HF_HUB_OFFLINE``), including ``in_chans``
adaptation of a pretrained stem and the classifier reset for another ``num_classes``. A local file must be
safetensors (never a pickle): ``hff-seed-weights`` converts a ``.pth`` once, without running its code.
"""
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.nn as nn

__all__ = ['PretrainedWeightsError', 'check_pretrained_file', 'create_timm_model']

SEED_HINT = 'hff-seed-weights {arch} <state dict file>'


class PretrainedWeightsError(ValueError):
    """timm's pretrained weights are not reachable, or a local weights file does not fit the architecture."""


def check_pretrained_file(path: Union[str, Path]) -> Path:
    """A readable ``.safetensors`` file, or a one-line error saying what to give instead."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f'pretrained_file {path}: no such file; give a .safetensors state dict of the '
                                     f'architecture (hff-seed-weights ... --safetensors OUT converts a .pth)')
    if path.suffix != '.safetensors':
        raise PretrainedWeightsError(f'pretrained_file {path}: weights load as safetensors only (a pickle can run '
                                     f'code); convert it once: hff-seed-weights <arch> {path} --safetensors '
                                     f'{path.with_suffix(".safetensors")}')
    import safetensors
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            next(iter(f.keys()), None)
    except Exception as e:   # safetensors' own error type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise PretrainedWeightsError(f'pretrained_file {path}: not a readable safetensors file ({first}); the file is '
                                     f'truncated or corrupted: copy or convert it again') from None
    return path


def _has_source(cfg: Dict[str, Any]) -> bool:
    return any(cfg.get(k) for k in ('hf_hub_id', 'url', 'file', 'state_dict'))


def _unreachable(arch: str, cfg: Dict[str, Any], e: BaseException) -> PretrainedWeightsError:
    from huggingface_hub import constants
    repo = cfg.get('hf_hub_id') or cfg.get('url') or 'its weights'
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120].rstrip('. ')
    offline = ' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''
    return PretrainedWeightsError(
        f"timm's pretrained weights for {arch} ({repo}) are not reachable{offline}: {why}. Download them once with "
        f"network access (they land in the Hub cache, {constants.HF_HUB_CACHE}), seed that cache from a local state "
        f"dict ({SEED_HINT.format(arch=arch)}), or give a local file (pretrained_file: <file>.safetensors)")


def create_timm_model(arch: str, pretrained: bool = False, pretrained_file: Optional[Union[str, Path]] = None,
                      pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained, ...)``; ``pretrained_file`` (implies ``pretrained``) loads a local
    safetensors file through timm's own overlay. Unreachable or unfitting weights raise ``PretrainedWeightsError``."""
    import timm
    overlay = dict(pretrained_cfg_overlay or {})
    if pretrained_file is not None:
        overlay['file'] = pretrained_file
        pretrained = True
    if pretrained and overlay.get('file'):
        overlay['file'] = os.fspath(check_pretrained_file(overlay['file']))
    if not pretrained:
        return timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None, **kwargs)
    cfg = _pretrained_cfg(arch, overlay)
    if not _has_source(cfg):
        raise PretrainedWeightsError(f'timm has no pretrained weights for {arch} (its pretrained_cfg names no Hub '
                                     f'repo, URL or file); drop pretrained, or give '
                                     f'pretrained_file: <file>.safetensors')
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except RuntimeError as e:
        if 'file' in overlay and ('size mismatch' in str(e) or 'Missing key' in str(e) or 'Unexpected key' in str(e)):
            first = str(e).strip().splitlines()[1:2] or str(e).strip().splitlines()[:1]
            raise PretrainedWeightsError(f"pretrained_file {overlay['file']} does not fit timm's {arch} "
                                         f"({first[0].strip()[:160]}); give that architecture's state dict") from None
        raise
    except Exception as e:
        if _network_error(e):
            raise _unreachable(arch, cfg, e) from None
        raise


def _pretrained_cfg(arch: str, overlay: Dict[str, Any]) -> Dict[str, Any]:
    from timm.models import get_pretrained_cfg, parse_model_name, split_model_name_tag
    name = parse_model_name(arch)[1]
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None:
        base, tag = split_model_name_tag(name)
        cfg = get_pretrained_cfg(base, allow_unregistered=True) if tag else None
    return {**(cfg.to_dict() if cfg is not None else {}), **overlay}


def _network_error(e: BaseException) -> bool:
    """An error of reaching the weights (cache miss offline, no connection, no such repo), not of building."""
    if isinstance(e, (OSError, ConnectionError, TimeoutError)):
        return True
    return type(e).__module__.split('.')[0] in ('huggingface_hub', 'httpx', 'httpcore', 'requests', 'urllib3')
