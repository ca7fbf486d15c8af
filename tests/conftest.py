"""Helpers shared by the training, bad-input and reliability tests: tiny generated data and tiny training runs.

A tiny run is timm's ``test_resnet`` with HFF's small-input stem on 28 px one-channel IDX images, a few steps of
eight images: enough to exercise every code path of the trainer in about a second.
"""
import json
import os

import pytest

from test_data import make_idx

TESTS = os.path.dirname(os.path.abspath(__file__))
collect_ignore = ['timm_upstream', 'timm_scripts']   # timm's model tests (test_timm_contract.py) and scripts
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


class Boom:
    """Unpickling it creates ``marker``: the side effect a malicious checkpoint would have."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def resign(ckpt) -> None:
    """Record a changed checkpoint's sha256s in its trainer_state.json, as a deliberate editor would."""
    from pathlib import Path
    from timm_hff.hub import file_sha256
    from timm_hff.train.checkpoint import FILES_KEY, STATE_FILE
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        return
    if isinstance(state, dict) and isinstance(state.get(FILES_KEY), dict):
        state[FILES_KEY] = {n: file_sha256(ckpt / n) for n in state[FILES_KEY] if (ckpt / n).is_file()}
        (ckpt / STATE_FILE).write_text(json.dumps(state))


# The default `python -m pytest -q` runs in a few minutes on 2 cores; these run with `-m slow` (CI runs both, see
# .ci/run): multi-process (gloo) and subprocess runs, the benchmarks' smoke runs, every recipe's two steps,
# torch.compile, the fuzz budget, and every test parametrised over a real (non-``test_*``) timm model. timm's own tiny
# ``test_*`` models keep each model-parametrised test in the default run.
SLOW_TESTS = {
    'test_the_pretrained_path_of_other_families',   # real timm models (resnet18, convnext_atto, vit_tiny)
    'test_the_hub_transfer_recipe_dry_runs_from_pretrained_weights',   # ResNet-50 at 224 px
    # multi-process and subprocess runs
    'test_two_process_cpu_ddp', 'test_module_entry_point', 'test_validation_split_is_the_same_in_another_process',
    'test_two_processes_per_sample_and_stream_loaders_and_a_nan_on_one_process',
    'test_sigkill_mid_epoch_and_mid_checkpoint_then_resume_is_bitwise',
    'test_weights_equal_simultaneous_bit_for_bit_at_queue_depth_1_and_2',
    'test_sigkill_of_rank_1_stops_rank_0_and_resume_is_bitwise', 'test_more_or_fewer_processes_than_stages_are_refused',
    'test_a_hung_rank_is_named_after_the_timeout', 'test_benchmark_runs_and_judges_its_target',
    # benchmarks' smoke runs, FF training, torch.compile, early-exit calibration runs
    'test_train_cost_memory_and_targets', 'test_train_steps_in_gpu_runtime_settings_on_cpu',
    'test_train_cost_captured_rows',
    'test_inference_speedup_and_verdicts', 'test_accuracy_smoke', 'test_benchmark_at_toy_size',
    'test_ff_learns_a_simple_task', 'test_torchcompile_trains_like_eager', 'test_recipe_runs_two_steps',
    'test_recipe_runs_two_steps_as_bp_baseline',
    'test_compiled_model_gives_eager_losses_and_gradients',
    'test_train_calibrates_on_validation_and_reports_test', 'test_calibrate_to_a_flops_budget',
    'test_calibrate_within_accuracy_drop', 'test_thresholds_round_trip_through_save_load_and_the_hub',
    # hub: timm-only export, the offline cache, atomic saves under injected faults
    'test_export_loads_with_timm_alone', 'test_hf_hub_from_offline_cache_with_revisions',
    'test_save_is_atomic_and_keeps_other_files',
    # the fuzz budget (a few hundred cases per target)
    'test_fuzz_config', 'test_fuzz_header', 'test_fuzz_recipe', 'test_fuzz_cli', 'test_fuzz_names',
}


def _real_model(item) -> bool:
    callspec = getattr(item, 'callspec', None)
    if callspec is None:
        return False
    import timm
    return any(isinstance(v, str) and not v.startswith('test_') and timm.is_model(v)
               for v in callspec.params.values()) or any(
        isinstance(v, tuple) and v and isinstance(v[0], str) and not v[0].startswith('test_') and timm.is_model(v[0])
        for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW_TESTS or _real_model(item):
            item.add_marker(pytest.mark.slow)
