"""HFF with micro-batches: ``schedule: memory_efficient`` (each stage's backward as it runs, the activations freed
stage by stage) under the trainer's gradient accumulation (``grad_accum_steps``) trains the same weights as one step on
the whole batch, up to float rounding, on a backbone without batch statistics and without augmentation (whose
batch-level draws are one per micro-batch); with batch norm the micro-batches' statistics differ the weights.
"""
import pytest
import torch
from safetensors.torch import load_file

from conftest import reset_accelerate, tiny


def _final_weights(idx_root, out, **kw):
    from timm_hff.train import Trainer
    reset_accelerate()
    Trainer(tiny(idx_root, out, schedule='memory_efficient', train_num_samples=16, epochs=2, lr=0.01, opt='adamw',
                 save_model=True, **kw)).fit()
    return load_file(str(out / 'run' / 'model' / 'model.safetensors'))


@pytest.mark.slow
@pytest.mark.parametrize('model, exact', [('test_convnext', True), ('test_resnet', False)])
def test_micro_batches_train_the_unsplit_steps_weights(idx_root, tmp_path, model, exact):
    # no batch statistics anywhere (ConvNeXt's LayerNorm, heads without their aux conv's BatchNorm) and no
    # augmentation: its batch-level draws (the crop offsets) are one per micro-batch, not one per batch
    kw = dict(model=model, hff=dict(small_input=True, aux='none')) if exact else dict(model=model)
    kw.update(aug='none', hflip=0.0)
    whole = _final_weights(idx_root, tmp_path / 'whole', batch_size=16, grad_accum_steps=1, **kw)
    micro = _final_weights(idx_root, tmp_path / 'micro', batch_size=4, grad_accum_steps=4, **kw)
    assert whole.keys() == micro.keys()
    params = [k for k in whole if whole[k].is_floating_point() and 'running' not in k]
    worst = max((whole[k] - micro[k]).abs().max().item() for k in params)
    if exact:   # float rounding of the summed micro-batch gradients, through two AdamW steps
        assert worst < 1e-4, worst
    else:   # batch norm: each micro-batch normalises by its own statistics, so the steps differ
        assert worst > 1e-3, worst
