"""Deprecated path of ``hff-seed-weights``: the command lives in ``timm_hff.cli.seed_weights`` with the other CLIs. This
alias keeps ``python -m timm_hff.seed_cli`` and old imports working."""
from .cli.seed_weights import *  # noqa: F401,F403
from .cli.seed_weights import __all__, main  # noqa: F401

if __name__ == '__main__':
    raise SystemExit(main())
