"""Baselines: FF (label plane, local goodness losses, C passes) and BP (same backbone, checkpointing, accumulation)."""
import math

import pytest
import torch
import torch.nn as nn

import timm_hff
from timm_hff.baselines import FFConfig, accumulated_backward, create_bp_model, create_ff_model, goodness

TINY = dict(small_input=True, check_img_size=16, channels=(8, 16, 32, 64))


def _ff(num_classes=4, **kw):
    torch.manual_seed(0)
    return create_ff_model('resnet18', num_classes=num_classes, in_chans=1, **{**TINY, **kw})


def test_ff_shares_hff_split_and_adds_one_label_channel():
    ff = _ff()
    hff = timm_hff.create_model('resnet18', num_classes=4, in_chans=1, **TINY)
    assert ff.split.tap_names == hff.split.tap_names
    assert ff.split.feature_indices == hff.split.feature_indices
    assert ff.backbone.conv1.in_channels == 2 and hff.backbone.conv1.in_channels == 1
    assert ff.backbone.conv1.stride == hff.backbone.conv1.stride == (1, 1)   # same small-input stem
    with pytest.raises(ValueError, match='label plane is added by the model'):
        ff(torch.randn(2, 2, 16, 16))


def test_ff_stage_losses_are_local():
    ff = _ff()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    goods = ff.stage_goodness(ff.with_label(torch.cat([x, x]), torch.cat([y, (y + 1) % 4])))
    assert len(goods) == ff.num_stages == 4
    params = dict(ff.backbone.named_parameters())
    for k, g in enumerate(goods):
        grads = torch.autograd.grad(g.sum(), [params[n] for ns in ff.split.stage_param_names for n in ns],
                                    retain_graph=True, allow_unused=True)
        names = [n for ns in ff.split.stage_param_names for n in ns]
        reached = {n for n, gr in zip(names, grads) if gr is not None and gr.abs().sum() > 0}
        assert reached, f'stage {k} goodness reaches no parameter'
        assert reached <= set(ff.split.stage_param_names[k]), f'stage {k} goodness leaks into other stages'


def test_ff_normalises_stage_outputs_between_stages():
    ff = _ff()
    seen = {}
    h = ff.backbone.layer2.register_forward_pre_hook(lambda m, args: seen.setdefault('x', args[0]))
    try:
        ff.stage_goodness(ff.with_label(torch.randn(3, 1, 16, 16) * 7, torch.tensor([0, 1, 2])))
    finally:
        h.remove()
    x = seen['x']
    assert not x.requires_grad   # detached by HFF's cut
    torch.testing.assert_close(x.pow(2).flatten(1).mean(1), torch.ones(3), rtol=1e-3, atol=1e-3)


def test_ff_classifies_with_one_pass_per_class():
    ff = _ff(num_classes=5, ff_cfg=FFConfig(chunk_size=4)).eval()
    calls = []
    h = ff.backbone.conv1.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    x = torch.randn(3, 1, 16, 16)
    try:
        scores = ff(x)
    finally:
        h.remove()
    assert scores.shape == (3, 5)
    assert sum(calls) == 3 * 5 and len(calls) == math.ceil(15 / 4)   # C passes per image, in chunks
    with torch.no_grad():   # each score is that label's summed goodness (stage 1 left out, Hinton's rule)
        for c in range(5):
            goods = ff.stage_goodness(ff.with_label(x, torch.full((3,), c)))
            torch.testing.assert_close(scores[:, c], torch.stack(goods[1:]).sum(0), rtol=1e-4, atol=1e-5)


def _quadrant_data(n, gen):
    """4 classes: which quadrant of a 16x16 image is bright, plus noise."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 1, 16, 16, generator=gen) * 0.5
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, r * 8:(r + 1) * 8, q * 8:(q + 1) * 8] += 2.0
    return x, y


def test_ff_learns_a_simple_task():
    gen = torch.Generator().manual_seed(0)
    ff = _ff()
    opt = torch.optim.AdamW(ff.parameters(), lr=1e-2, weight_decay=0.0)
    ff.train()
    for _ in range(40):
        x, y = _quadrant_data(32, gen)
        opt.zero_grad()
        ff.loss(x, y).backward()
        opt.step()
    ff.eval()
    x, y = _quadrant_data(200, gen)
    with torch.no_grad():
        acc = (ff(x).argmax(1) == y).float().mean().item()
    assert acc > 0.7, f'FF reached only {acc:.2f} on a 4-class task (chance 0.25)'


def test_ff_label_modes_and_config_errors():
    fixed = _ff(ff_cfg=FFConfig(label_mode='fixed'))
    assert not any(p is fixed.label_plane.patterns for p in fixed.parameters())
    assert set(fixed.label_plane.patterns.unique().tolist()) <= {-1.0, 1.0}
    onehot = _ff(ff_cfg=FFConfig(label_mode='onehot'))
    plane = onehot.with_label(torch.zeros(2, 1, 16, 16), torch.tensor([0, 3]))[:, 1].flatten(1)
    assert plane.sum(1).tolist() == [1.0, 1.0] and plane[0, 0] == 1 and plane[1, 3] == 1
    onehot.reset_classifier(300)
    with pytest.raises(ValueError, match="label_mode='learned'"):
        onehot.with_label(torch.zeros(1, 1, 16, 16), torch.tensor([299]))
    for bad, match in ((dict(threshold=0), 'threshold'), (dict(label_mode='pixels'), 'label_mode'),
                       (dict(chunk_size=0), 'chunk_size')):
        with pytest.raises(ValueError, match=match):
            FFConfig(**bad)
    with pytest.raises(ValueError, match='class indices'):
        _ff().loss(torch.randn(2, 1, 16, 16), torch.rand(2, 4))


def test_bp_has_hffs_backbone():
    torch.manual_seed(0)
    hff = timm_hff.create_model('resnet18', num_classes=4, in_chans=1, **TINY)
    bp = create_bp_model('resnet18', num_classes=4, in_chans=1, small_input=True, split=hff.split,
                         channels=TINY['channels'])
    missing, unexpected = bp.load_state_dict(hff.backbone.state_dict(), strict=False)
    assert set(missing) == {'fc.weight', 'fc.bias'} and not unexpected
    x = torch.randn(2, 1, 16, 16)
    bp.eval(), hff.eval()
    with torch.no_grad():
        torch.testing.assert_close(bp.forward_features(x), hff.backbone.forward_features(x))
    assert bp(x).shape == (2, 4)
    with pytest.raises(ValueError, match='timm architecture'):
        create_bp_model('hff_resnet18')


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bp_checkpointing_and_accumulation_give_bp_gradients():
    torch.manual_seed(0)
    plain = create_bp_model('resnet18', num_classes=4, in_chans=1, small_input=True, channels=TINY['channels'])
    ckpt = create_bp_model('resnet18', num_classes=4, in_chans=1, small_input=True, channels=TINY['channels'],
                           grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    for m in (plain, ckpt):
        m.eval()   # running-stat norms: micro-batches then see the same normalisation as the full batch
        nn.functional.cross_entropy(m(x), y).backward()
    ref = _grads(plain)
    for n, g in _grads(ckpt).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-5)
    plain.zero_grad(set_to_none=True)
    loss = accumulated_backward(plain, x, y, accum_steps=4)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(plain(x), y).detach(), rtol=1e-5, atol=1e-6)
    for n, g in _grads(plain).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='micro-batches'):
        accumulated_backward(plain, x[:2], y[:2], accum_steps=4)
    with pytest.raises(ValueError, match='accum_steps'):
        accumulated_backward(plain, x, y, accum_steps=0)


def test_goodness_is_mean_square_for_any_layout():
    h = torch.tensor([[1., 2.], [3., 4.]])
    torch.testing.assert_close(goodness(h), torch.tensor([2.5, 12.5]))
    torch.testing.assert_close(goodness(h.view(2, 1, 1, 2)), goodness(h))
