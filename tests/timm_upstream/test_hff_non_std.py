"""timm's ``test_model_default_cfgs_non_std``, unchanged, for the ``hff_*`` models that wrap a ViT-like architecture:
timm picks that test's models by name pattern (``vit_*``, ``deit*``, ...), which an ``hff_`` prefix defeats, so
conftest.py routes them out of the standard test and this file routes them in."""
import pytest
import timm

import test_models
from conftest import non_std
from test_models import cfg_device  # noqa: F401  (timm's fixture)


@pytest.mark.parametrize('model_name', [n for n in timm.list_models('hff_*') if non_std(n)])
@pytest.mark.parametrize('batch_size', [1])
def test_model_default_cfgs_non_std(model_name, batch_size, cfg_device):
    test_models.test_model_default_cfgs_non_std(model_name, batch_size, cfg_device)
