"""Deprecated path of ``hff-validate``: the command lives in ``timm_hff.cli.validate`` with the other CLIs. This alias
keeps ``python -m timm_hff.validate`` and old imports working."""
from .cli.validate import *  # noqa: F401,F403
from .cli.validate import __all__, main  # noqa: F401

if __name__ == '__main__':
    raise SystemExit(main())
