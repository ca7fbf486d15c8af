"""Heads: a stage's local classifier. ``Head`` states the contract; each head type is one module registered by name
(``register_head``) and imported here, so importing the package fills the registry ``HFFConfig.head`` chooses from."""
from ._base import HEADS, Head, create_head, register_head
from ._ensemble import log_probs_mean
from ._pooling import LAYOUTS, pool_stage
from ._aux import AuxBlock
from ._prototype import PrototypeHead

__all__ = ['AuxBlock', 'HEADS', 'Head', 'LAYOUTS', 'PrototypeHead', 'create_head', 'log_probs_mean', 'pool_stage',
           'register_head']
