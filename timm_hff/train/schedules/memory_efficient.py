"""``schedule: memory_efficient``: each stage's backward runs as soon as its forward has, freeing its graph before the
next stage runs (InfoPro-style memory: one stage's activations alive at a time)."""
from ..registry import register_schedule
from .base import Schedule

__all__ = ['MemoryEfficient']


@register_schedule
class MemoryEfficient(Schedule):
    name = 'memory_efficient'
    help = "each stage's backward at once"
    forward_mode = 'memory_efficient'
    processes_reason = ("schedule 'memory_efficient' runs each stage's backward inside the forward, which DDP "
                        "cannot synchronise; with several processes use schedule: simultaneous")
