"""Run one of timm's scripts unedited, after ``import timm_hff`` (which registers the ``hff_*`` entrypoints that a
saved model's config.json names): ``python tests/timm_scripts/run.py validate.py ARGS...``."""
import os
import runpy
import sys

import timm_hff  # noqa: F401  (registers hff_* into timm's registry)

if __name__ == '__main__':
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name='__main__')
