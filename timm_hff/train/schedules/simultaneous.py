"""``schedule: simultaneous``: every stage's local loss in every step, one backward of their (isolated) sum."""
from ..registry import register_schedule
from .base import Schedule

__all__ = ['Simultaneous']


@register_schedule
class Simultaneous(Schedule):
    name = 'simultaneous'
    help = 'all stages each step'
