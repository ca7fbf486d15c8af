"""The head contract: what the model, the trainers and the exporters may ask of a stage's local classifier.

Everything outside ``timm_hff/heads/`` talks to a head through ``Head``'s methods, never through a head's parameters
or settings, so a new head type is one file (a ``Head`` subclass decorated with ``register_head``) and one import line
in ``heads/__init__.py``; ``HFFConfig(head=name)`` then builds it for every stage.
"""
from typing import Dict, List, Optional, Sequence, Set, Tuple, Type

import torch
import torch.nn as nn

__all__ = ['HEADS', 'Head', 'create_head', 'register_head']


class Head(nn.Module):
    """A stage's local classifier. Built as ``cls(in_chs, layout, num_classes, cfg, num_prefix_tokens)`` from the
    stage's output width and layout ('NCHW', 'NHWC', 'NLC' or 'NC') and the ``HFFConfig`` (a head reads its own
    settings there, and owns them from then on).

    A subclass must define ``forward`` (class logits, shape (B, C), in the head's parameter dtype, their softmax the
    head's class posterior: adaptive exit and the stage ensemble read them so), ``loss`` and ``reset_prototypes``; it
    may override the rest, whose defaults here are right for any head, only slower or plainer.
    """
    num_classes: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f'{type(self).__name__} must define forward(x) -> class logits (B, C)')

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The local loss of ``forward``'s logits; ``target`` is class indices (B,) or soft targets (B, C)."""
        raise NotImplementedError(f'{type(self).__name__} must define loss(logits, target) -> a scalar loss')

    def reset_prototypes(self, num_classes: int) -> None:
        """Fresh class parameters for a new label set (``HFFModel.reset_classifier``: transfer keeps the rest)."""
        raise NotImplementedError(f'{type(self).__name__} must define reset_prototypes(num_classes)')

    def forward_loss(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(local loss, detached logits) of a training step; a head may fuse the two."""
        logits = self(x)
        return self.loss(logits, target), logits.detach()

    def fuses_with(self, other: 'Head') -> bool:
        """Whether ``fused_losses`` can score ``other`` in the same call as this head."""
        return False

    def fused_losses(self, heads: Sequence['Head'], xs: Sequence[torch.Tensor], target: torch.Tensor
                     ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(losses (S,), detached logits per head) of several stages' heads that ``fuses_with`` accepted, each on
        its stage output; the default scores them one by one."""
        pairs = [head.forward_loss(x, target) for head, x in zip(heads, xs)]
        return torch.stack([loss for loss, _ in pairs]), [logits for _, logits in pairs]

    def no_weight_decay(self) -> Set[str]:
        """Names (relative to the head) of parameters that weight decay must leave alone."""
        return set()

    @classmethod
    def class_tensor_shapes(cls, cfg, num_classes: int) -> Dict[str, Tuple[Tuple[Optional[int], ...], str]]:
        """{parameter name: (shape, the settings that fix it)} of the head's tensors whose shape the settings and
        the class count alone fix (None: a size they leave open). The Hub loader holds a saved file's header against
        them before it builds anything, naming those settings. The default fixes none."""
        return {}

    def linear_classifier(self, multi_prototype: str = 'mean') -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(weight (C, D), bias (C,)) of a linear classifier on the head's pooled input with the head's argmax, or
        None where there is none (``export_timm`` then refuses)."""
        return None


HEADS: Dict[str, Type[Head]] = {}   # head type name -> class; HFFConfig.head chooses one, ``create_head`` builds it


def register_head(name: str):
    """Class decorator: ``HFFConfig(head=name)`` builds this ``Head`` subclass for every stage."""
    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise TypeError(f'register_head({name!r}) takes a subclass of timm_hff.heads.Head, got {cls!r}; '
                            f'derive the head from Head, which states what the model asks of it')
        HEADS[name] = cls
        return cls
    return register


def create_head(cfg, in_chs: int, layout: str, num_classes: int, num_prefix_tokens: int = 0) -> Head:
    """Stage k's head, of the type ``cfg.head`` names."""
    if cfg.head not in HEADS:
        raise ValueError(f'head must be one of {sorted(HEADS)}, got {cfg.head!r}')
    return HEADS[cfg.head](in_chs, layout, num_classes, cfg, num_prefix_tokens)
