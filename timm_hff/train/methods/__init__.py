"""Training methods, one file each; importing a file registers it (``registry.register_method``)."""
from .base import Method, NoAccelerator
from . import hff, bp, ff   # the registration lines: a new method is a new file plus its name here
from .hff import HFFMethod
from .bp import BPMethod, bp_loss
from .ff import FFMethod

__all__ = ['BPMethod', 'FFMethod', 'HFFMethod', 'Method', 'NoAccelerator', 'bp_loss']
