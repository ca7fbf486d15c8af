"""Deprecated path of ``hff-train``: the command lives in ``timm_hff.cli.train`` with the other CLIs. This alias keeps
``timm_hff.train.cli`` and old imports working."""
from ..cli.train import *  # noqa: F401,F403
from ..cli.train import __all__, main  # noqa: F401

if __name__ == '__main__':
    raise SystemExit(main())
