"""How a ``TrainConfig`` setting is declared: ``setting(default, group, help)``, a dataclass field whose metadata
carries its ``--help`` group (timm's ``train.py`` groups) and line, so a setting cannot be added without its help.

``hff-train --help`` prints each under its group with its type and default (``help_text``).
"""
from dataclasses import Field, field
from typing import Any, Optional, Tuple

from .registry import get_method, get_schedule, method_names, schedule_names

__all__ = ['GROUPS', 'help_text', 'setting']

GROUPS = ('Dataset', 'Model', 'Optimizer', 'Learning rate schedule', 'Augmentation and regularization',
          'Model exponential moving average', 'Miscellaneous')

def setting(default: Any, group: str, help: str, choices: Any = None, at_least: Optional[float] = None,
            at_most: Optional[float] = None, within: Optional[tuple] = None):
    """A ``TrainConfig`` field with its ``--help`` group and line, and the bounds ``checks.check_declared`` holds a
    value to (a null value passes them): the one place a setting is declared. ``choices``: the allowed values (or a
    function listing them: a registry's names); ``within``: ``(lo, hi)`` inclusive, ``(lo, hi, ')')`` with ``hi``
    excluded. A mutable default is given as its type (``dict``, ``list``: a fresh empty one per config)."""
    if group not in GROUPS or not help:
        raise ValueError(f'a setting needs one of the groups {GROUPS} and a help line, got {group!r} / {help!r}')
    meta = {'group': group, 'help': help, 'choices': choices, 'at_least': at_least, 'at_most': at_most,
            'within': within}
    if default in (dict, list):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _choices(names, get) -> str:
    parts = [f"'{n}' ({get(n).help})" if get(n).help else f"'{n}'" for n in names]
    return ', '.join(parts[:-1]) + ' or ' + parts[-1] if len(parts) > 1 else parts[0]


def help_text(f: Field) -> Tuple[str, str]:
    """(group, help) of a ``TrainConfig`` field; ``method`` and ``schedule`` list the registered choices."""
    group, text = f.metadata['group'], f.metadata['help']
    if f.name == 'method':
        return group, f'{text}: {_choices(method_names(), get_method)}'
    if f.name == 'schedule':
        return group, f'{text}: {_choices(schedule_names(), get_schedule)}'
    return group, text
