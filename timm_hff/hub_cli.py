"""Deprecated path of ``hff-push``: the command lives in ``timm_hff.cli.push`` with the other CLIs. This alias keeps
``python -m timm_hff.hub_cli`` and old imports working."""
from .cli.push import *  # noqa: F401,F403
from .cli.push import __all__, main  # noqa: F401

if __name__ == '__main__':
    raise SystemExit(main())
