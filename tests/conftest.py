"""Helpers shared by the training, bad-input and reliability tests: tiny generated data and tiny training runs.

A tiny run is timm's ``test_resnet`` with HFF's small-input stem on 28 px one-channel IDX images, a few steps of
eight images: enough to exercise every code path of the trainer in about a second.
"""
import json
import os

import pytest

from test_data import make_idx

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each run in a test process may use other settings."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope='module')
def idx_root(tmp_path_factory):
    """48 train / 13 test random 28 px images in 10 classes, as MNIST-style IDX files."""
    root = str(tmp_path_factory.mktemp('data') / 'idx')
    make_idx(root, n_train=48, n_test=13)
    return root


def tiny_settings(idx_root, out, **kw) -> dict:
    """``TrainConfig`` settings of a tiny run (two steps per epoch) writing into ``out/run``."""
    base = dict(dataset='idx', data_dir=idx_root, model='test_resnet', hff=dict(small_input=True), in_chans=1,
                img_size=28, crop_pct=1.0, train_num_samples=16, batch_size=8, epochs=1, workers=0, lr=0.05,
                output=str(out), experiment='run', progress=False, seed=3)
    base.update(kw)
    return base


def tiny(idx_root, out, **kw):
    from timm_hff.train import TrainConfig
    return TrainConfig.from_dict(tiny_settings(idx_root, out, **kw))


def cli_args(settings: dict) -> list:
    """``hff-train`` flags for a settings dict (values in YAML / JSON syntax)."""
    args = []
    for k, v in settings.items():
        args += [f'--{k}', 'null' if v is None else v if isinstance(v, str) else json.dumps(v)]
    return args


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, 'model.safetensors'))


def ckpt(out, epoch, exp='run'):
    return os.path.join(str(out), exp, 'checkpoints', f'epoch_{epoch:04d}')
