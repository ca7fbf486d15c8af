"""The training package's two registries: methods (what learns: hff, bp, ff) and schedules (when stages step).

A method or a schedule is one file that defines a class and decorates it with ``@register_method`` /
``@register_schedule``; ``methods/__init__.py`` and ``schedules/__init__.py`` import each file, which is the one
registration line (as timm's ``models/__init__.py`` imports each model file). ``TrainConfig`` validation,
``hff-train --help`` and the trainers read the names and the objects from here, so nothing else in the package
compares a method or schedule name.
"""
from typing import Any, Dict, Tuple

__all__ = ['get_method', 'get_schedule', 'method_names', 'register_method', 'register_schedule', 'schedule_names']

_METHODS: Dict[str, Any] = {}
_SCHEDULES: Dict[str, Any] = {}


def _register(table: Dict[str, Any], cls, kind: str):
    name = getattr(cls, 'name', None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f'a {kind} class needs a name attribute (an identifier), got {name!r} on {cls.__name__}')
    if name in table and type(table[name]) is not cls:
        raise ValueError(f'{kind} {name!r} is registered already (by {type(table[name]).__name__})')
    table[name] = cls()
    return cls


def register_method(cls):
    """Class decorator: ``name`` becomes a value of the ``method`` setting (and of ``hff-train --baseline``)."""
    return _register(_METHODS, cls, 'method')


def register_schedule(cls):
    """Class decorator: ``name`` becomes a value of the ``schedule`` setting."""
    return _register(_SCHEDULES, cls, 'schedule')


def _get(table: Dict[str, Any], name: Any, kind: str):
    try:
        return table[name]
    except (KeyError, TypeError):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + '...'
        raise ValueError(f'{kind} must be one of {list(table)}, got {shown}') from None


def get_method(name: str):
    return _get(_METHODS, name, 'method')


def get_schedule(name: str):
    return _get(_SCHEDULES, name, 'schedule')


def method_names() -> Tuple[str, ...]:
    return tuple(_METHODS)


def schedule_names() -> Tuple[str, ...]:
    return tuple(_SCHEDULES)
