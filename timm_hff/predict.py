"""Deprecated path of ``hff-predict``: the command lives in ``timm_hff.cli.predict`` with the other CLIs. This alias
keeps ``python -m timm_hff.predict`` and old imports working."""
from .cli.predict import *  # noqa: F401,F403
from .cli.predict import __all__, main  # noqa: F401

if __name__ == '__main__':
    raise SystemExit(main())
