"""Schedules, one file (or folder) each; importing one registers it (``registry.register_schedule``)."""
from .base import Schedule
from . import simultaneous, memory_efficient, sequential, stage_parallel   # the registration lines

__all__ = ['Schedule']
