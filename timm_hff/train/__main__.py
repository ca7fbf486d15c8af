"""``python -m timm_hff.train`` / ``accelerate launch -m timm_hff.train --config recipes/<name>.yaml``."""
from ..cli.train import main

__all__ = ['main']

if __name__ == '__main__':
    raise SystemExit(main())
