"""Core behaviour of HFF models, parametrised over timm families (mirrors timm's tests/test_models.py)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

import timm_hff
from timm_hff import HFFConfig, SplitError
from timm_hff import run_stages

torch.backends.cudnn.deterministic = True

# (timm name, kwargs giving a small, fast model): every timm test_* model plus one real model of each family
# the issue names, shrunk where timm allows it.
SMALL = dict(check_img_size=64)
_TEST_SIZED = {'test_coatnet': 64, 'test_maxvit': 64, 'test_vit': 32, 'test_vit2': 32, 'test_vit3': 32,
               'test_vit4': 32, 'test_vit_relpos': 32}   # models whose attention is built for one img_size
MODELS = [(n, dict(img_size=_TEST_SIZED[n]) if n in _TEST_SIZED else dict(check_img_size=32))
          for n in timm.list_models('test_*')] + [
    ('resnet18', SMALL),
    ('convnext_atto', SMALL),
    ('efficientnet_b0', SMALL),
    ('mobilenetv3_small_050', SMALL),
    ('regnetx_002', SMALL),
    ('densenet121', SMALL),
    ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=4, embed_dim=32, depths=(1, 1, 1, 1),
                                          num_heads=(1, 2, 2, 4))),
    ('mambaout_femto', SMALL),
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=4)),
    ('deit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=4)),
    ('eva02_tiny_patch14_224', dict(img_size=28, patch_size=7, depth=4)),
    ('pit_ti_224', dict(img_size=64)),            # stages return (tokens, cls) tuples
    ('efficientvim_m1', SMALL),                   # stages return tuples
    ('hiera_tiny_224', dict(img_size=64, embed_dim=32, num_heads=1, stages=(1, 1, 1, 1))),   # unrolled tokens
]
UNORDERED_TOKENS = {'hiera_tiny_224'}   # tokens hold the intermediate's vectors in another order
IDS = [m[0] for m in MODELS]
NUM_CLASSES = 7


def _build(name, kwargs, **extra):
    torch.manual_seed(0)
    return timm_hff.create_model(name, num_classes=NUM_CLASSES, **{**kwargs, **extra})


def _batch(model, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = model.split.probe_img_size
    return torch.randn(b, model.in_chans, s, s, generator=g), torch.randint(0, NUM_CLASSES, (b,), generator=g)


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_split_equals_forward_intermediates(name, kwargs):
    model = _build(name, kwargs).eval()
    x, _ = _batch(model, seed=5)
    split = model.split
    with torch.no_grad():
        outs = run_stages(model.backbone, split, x)
        n_taps = len(split.tap_names)
        refs = model.backbone.forward_intermediates(x, indices=list(split.feature_indices[:n_taps]),
                                                    intermediates_only=True)
        pooled = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
    assert len(outs) == model.num_stages
    for k in range(n_taps):
        out = outs[k]
        if split.layouts[k] == 'NHWC':
            out = out.permute(0, 3, 1, 2)
        elif split.layouts[k] == 'NLC':
            b, c, h, w = refs[k].shape
            out = out[:, split.num_prefix_tokens:]
            if name in UNORDERED_TOKENS:   # same vectors, other order: compare them sorted per channel
                torch.testing.assert_close(out.sort(1).values, refs[k].flatten(2).transpose(1, 2).sort(1).values,
                                           rtol=1e-4, atol=1e-4)
                continue
            out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, refs[k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[-1], pooled)


def _training_grads(model, x, y, factors):
    """Gradients of the training forward ``model(x, y)`` with stage k's local loss scaled by ``factors[k]``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)   # the same dropout / drop-path draws in every call
    out = model(x, y)
    torch.testing.assert_close(out.loss_vector.sum(), out.loss)
    (out.loss_vector * torch.tensor(factors)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_stage_loss_reaches_only_its_stage(name, kwargs):
    """Through the training forward itself (one backward of the summed losses): scaling stage k's loss by c_k
    scales exactly the gradients of stage k's parameters (backbone slice and head) by c_k. A gradient that leaked
    across a boundary would mix two factors."""
    model = _build(name, kwargs).train()
    x, y = _batch(model)
    factors = [2.0 ** (k + 1) for k in range(model.num_stages)]
    one, scaled = _training_grads(model, x, y, [1.0] * model.num_stages), _training_grads(model, x, y, factors)
    assert one.keys() == scaled.keys()
    owner = {f'backbone.{n}': k for k, names in enumerate(model.split.stage_param_names) for n in names}
    owner.update({n: int(n.split('.')[1]) for n in one if n.startswith('heads.')})
    for k in range(model.num_stages):
        mine = [n for n in one if owner.get(n) == k]
        assert any(n.startswith('backbone.') for n in mine) and any(n.startswith('heads.') for n in mine), k
        for n in mine:
            torch.testing.assert_close(scaled[n], factors[k] * one[n], rtol=1e-4, atol=1e-6, msg=n)
    assert set(one) <= set(owner), 'a parameter outside every stage got a gradient'


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_modes_give_equal_gradients(name, kwargs):
    model = _build(name, kwargs).train()
    x, y = _batch(model)
    torch.manual_seed(3)
    out = model(x, y, mode='simultaneous')
    assert not out.backward_done
    out.loss.backward()
    grads_sim = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out_me = model(x, y, mode='memory_efficient')
    assert out_me.backward_done and out_me.loss.grad_fn is None
    grads_me = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads_sim.keys() == grads_me.keys()
    for n in grads_sim:
        torch.testing.assert_close(grads_me[n], grads_sim[n], rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(torch.stack(out_me.stage_losses), torch.stack(out.stage_losses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_logits_shape_and_unit_prototypes(name, kwargs):
    model = _build(name, kwargs, prototypes_per_class=3).eval()
    x, _ = _batch(model, b=2)
    with torch.no_grad():
        logits = model(x)
        stage_logits = model.forward_stages(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert len(stage_logits) == model.num_stages
    torch.testing.assert_close(logits, stage_logits[-1])
    for head in model.heads:
        assert head.prototypes.shape == (NUM_CLASSES * 3, head.embed_dim)
        with torch.no_grad():   # only the prototypes' directions count: rescaling them leaves the logits
            head.prototypes.mul_(torch.rand(head.prototypes.shape[0], 1) * 4 + 0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, rtol=1e-5, atol=1e-5)
    assert model.num_features == model.backbone.num_features
    assert model.head_hidden_size == getattr(model.backbone, 'head_hidden_size', model.backbone.num_features)


def test_prototype_scores_are_logsumexp_over_unit_cosines():
    model = _build('test_resnet', dict(check_img_size=32), prototypes_per_class=2, scale=10.0, margin=0.3)
    head = model.heads[-1]
    with torch.no_grad():
        head.prototypes.mul_(torch.rand(head.prototypes.shape[0], 1) * 5 + 0.1)   # norms must not matter
    z = F.normalize(torch.randn(4, head.embed_dim), dim=-1)
    p = F.normalize(head.prototypes, dim=-1).view(NUM_CLASSES, 2, -1)
    cos = torch.einsum('bd,ckd->bck', z, p)
    expected = torch.logsumexp(10.0 * cos, -1) / 10.0
    torch.testing.assert_close(head.class_scores(z), expected)
    # the margin lowers only the target's logit before the softmax
    logits = 10.0 * expected
    y = torch.tensor([0, 1, 2, 3])
    ref = F.cross_entropy(logits - 10.0 * 0.3 * F.one_hot(y, NUM_CLASSES), y)
    torch.testing.assert_close(head.loss(logits, y), ref)
    soft = F.one_hot(y, NUM_CLASSES).float()
    torch.testing.assert_close(head.loss(logits, soft), ref)


def test_one_step_learns_and_prototypes_have_no_weight_decay():
    model = _build('test_resnet', dict(check_img_size=32)).train()
    nwd = model.no_weight_decay()
    assert {f'heads.{k}.prototypes' for k in range(model.num_stages)} <= nwd
    opt = create_optimizer_v2(model, 'sgd', lr=0.5, weight_decay=0.1)
    no_decay = [g for g in opt.param_groups if g['weight_decay'] == 0]
    no_decay_ids = {id(p) for g in no_decay for p in g['params']}
    assert all(id(h.prototypes) in no_decay_ids for h in model.heads)
    x, y = _batch(model, b=8)
    before = model(x, y).stage_losses
    for _ in range(5):
        opt.zero_grad()
        model(x, y).loss.backward()
        opt.step()
    after = model(x, y).stage_losses
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_predict_from_stage_and_ensemble():
    model = _build('test_convnext', dict(check_img_size=32)).eval()
    x, _ = _batch(model)
    with torch.no_grad():
        stages = model.forward_stages(x)
        model.set_predict_from(1)
        torch.testing.assert_close(model(x), stages[1])
        model.set_predict_from('ensemble')
        expected = torch.stack([F.log_softmax(s, -1) for s in stages]).mean(0)
        torch.testing.assert_close(model(x), expected)
        model.set_predict_from((0, 2))
        expected = torch.stack([F.log_softmax(stages[k], -1) for k in (0, 2)]).mean(0)
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match='out of range'):
        model.set_predict_from(9)


def test_early_exit_stops_the_forward():
    model = _build('test_resnet', dict(check_img_size=32)).eval()
    ran = []
    model.backbone.get_submodule('layer4').register_forward_hook(lambda *a: ran.append('layer4'))
    x, _ = _batch(model)
    with torch.no_grad():
        model.forward_stages(x, stop_after=1)
    assert ran == []
    with torch.no_grad():
        model(x)
    assert ran == ['layer4']


def test_sequential_stage_training_and_freezing():
    model = _build('test_resnet', dict(check_img_size=32)).train()
    x, y = _batch(model, b=4)
    model.freeze_stages([0])
    bn = model.backbone.bn1   # stem norm belongs to stage 0
    stats = bn.running_mean.clone()
    out = model(x, y, stages=[1])
    out.loss.backward()
    assert len(out.stage_losses) == 1
    assert all(p.grad is None for p in model.stage_parameters(0))
    assert any(p.grad is not None for p in model.stage_parameters(1))
    assert all(p.grad is None for k in (2, 3) for p in model.stage_parameters(k))
    torch.testing.assert_close(bn.running_mean, stats)   # frozen stage keeps its statistics in train mode
    assert model.frozen_stages == [0]
    model.unfreeze_stages([0])
    assert all(p.requires_grad for p in model.stage_parameters(0))
    model.freeze_stages([0, 1, 2, 3])
    with pytest.raises(ValueError, match='all requested stages are frozen'):
        model(x, y)


def test_grad_checkpointing_keeps_gradients():
    model = _build('test_resnet', dict(check_img_size=32)).train()
    x, y = _batch(model)
    model(x, y).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x, y).loss.backward()
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-5, msg=n)


# (model, kwargs, a block in stage 1 that timm's checkpointing wraps)
CKPT_MODELS = [('test_resnet', dict(check_img_size=32), 'layer1.0'),
               ('test_convnext', dict(check_img_size=32), 'stages.0.blocks.0'),
               ('test_efficientnet', dict(check_img_size=32), 'blocks.0.0'),
               ('test_vit', dict(img_size=32), 'blocks.0'),
               ('resnet18', dict(small_input=True, check_img_size=32, channels=(8, 16, 32, 64)), 'layer1.0'),
               # a small-input deep stem: checkpointed too (timm leaves stems out), its first conv recomputed
               ('resnet18d', dict(small_input=True, check_img_size=32, channels=(8, 16, 32, 64), stem_width=8),
                'conv1.0')]


@pytest.mark.parametrize('name,kwargs,block', CKPT_MODELS, ids=[m[0] for m in CKPT_MODELS])
def test_memory_efficient_with_grad_checkpointing_recomputes_and_keeps_gradients(name, kwargs, block):
    """Checkpointing inside the stages (each head's backward runs inside a checkpointed block) is what brings
    memory_efficient below BP + checkpointing; it must give simultaneous mode's gradients and really recompute."""
    model = _build(name, kwargs).train()
    x, y = _batch(model)
    torch.manual_seed(0)
    model(x, y, mode='simultaneous').loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    calls = []
    handle = model.backbone.get_submodule(block).register_forward_pre_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    out = model(x, y, mode='memory_efficient')
    handle.remove()
    assert out.backward_done and not out.loss.requires_grad
    assert len(calls) == 2, 'the first block ran once: it was not checkpointed (or ran a third time)'
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-5, msg=n)


def _saved_bytes(model, x, y) -> int:
    """Bytes autograd keeps for backward after one simultaneous forward (what checkpointed regions do not keep)."""
    total = []
    def pack(t):
        total.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, mode='simultaneous')
    return sum(total)


def test_small_input_stem_is_checkpointed_with_the_blocks():
    """With small_input the stem runs at full resolution; set_grad_checkpointing checkpoints a deep stem as well, keeps
    the parameter names, follows a deepcopy (EMA) and is undone by set_grad_checkpointing(False)."""
    kwargs = dict(check_img_size=32, channels=(8, 16, 32, 64), stem_width=8)
    model = _build('resnet18d', dict(kwargs, small_input=True)).train()
    x, y = _batch(model)
    keys = list(model.state_dict())
    model.backbone.set_grad_checkpointing(True)          # timm's own: the blocks only
    blocks_only = _saved_bytes(model, x, y)
    model.set_grad_checkpointing(True)                   # HFF's: the blocks and the stem
    with_stem = _saved_bytes(model, x, y)
    stem_out = model.backbone.conv1(x).numel() * 4      # one full-resolution map of the stem's width
    assert blocks_only - with_stem >= 3 * stem_out       # the deep stem's inner maps are no longer kept
    assert list(model.state_dict()) == keys
    ema = copy.deepcopy(model)
    assert ema.backbone.conv1.forward.module is ema.backbone.conv1
    model.set_grad_checkpointing(False)
    assert 'forward' not in model.backbone.conv1.__dict__
    plain = _build('resnet18d', kwargs).train()          # no small_input: the stem downsamples at once, left alone
    plain.set_grad_checkpointing(True)
    assert 'forward' not in plain.backbone.conv1.__dict__


@pytest.mark.parametrize('mode', ['memory_efficient', 'simultaneous'])
def test_training_refuses_reentrant_checkpoints(mode):
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
    model = _build('test_resnet', dict(check_img_size=32)).train()
    model.set_grad_checkpointing(True)
    x, y = _batch(model)
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(ValueError, match=f'^{mode} training with grad checkpointing needs non-reentrant'):
            model(x, y, mode=mode)
        with torch.no_grad():
            model.eval()(x)   # inference does not checkpoint: fine
    finally:
        set_reentrant_ckpt(before)


@pytest.mark.parametrize('checkpointing', [False, True])
def test_backbone_handed_back_to_timm_trains_end_to_end(checkpointing):
    """Outside HFF's own forward the taps pass outputs through: backprop through model.backbone reaches every
    stage, and HFF's next forward cuts again."""
    model = _build('resnet18', SMALL).train()
    backbone = model.backbone
    backbone.reset_classifier(NUM_CLASSES)
    backbone.set_grad_checkpointing(checkpointing)
    x, y = _batch(model, b=4)
    F.cross_entropy(backbone(x), y).backward()
    for k in range(model.num_stages):   # (resnets zero-init each block's last norm: some branch grads are 0)
        params = model.stage_parameters(k, include_head=False)
        assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params), k
    model.zero_grad(set_to_none=True)
    model.heads[0](run_stages(model.backbone, model.split, x)[0]).sum().backward()   # HFF forward: cut again
    assert all(p.grad is None for p in model.stage_parameters(1, include_head=False))


def test_state_dict_keys_are_timms():
    model = _build('resnet18', SMALL)
    plain = timm.create_model('resnet18', num_classes=0)
    backbone_keys = {k[len('backbone.'):] for k in model.state_dict() if k.startswith('backbone.')}
    assert backbone_keys == set(plain.state_dict())
    assert all(k.startswith(('backbone.', 'heads.')) for k in model.state_dict())


def test_small_input_keeps_resolution():
    model = _build('resnet18', {}, small_input=True, in_chans=1)
    assert model.split.reductions == [1, 2, 4, 8]
    assert [f['reduction'] for f in model.stage_info] == [1, 2, 4, 8]
    # timm's feature_info (every level, what forward_intermediates returns) tells the adapted stem's strides too
    assert [f['reduction'] for f in model.feature_info] == [1, 1, 2, 4, 8]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, NUM_CLASSES)
    # cut after layer2: the stem and max-pool lose their strides, layer2 keeps its own (in its first block,
    # which is not the block the tap hooks)
    deep_cut = _build('resnet18', {}, small_input=True, in_chans=1, stage_indices=[2, 4])
    assert deep_cut.split.reductions == [2, 8]
    with pytest.raises(ValueError, match='patch_size'):
        timm_hff.create_model('vit_tiny_patch16_224', num_classes=3, small_input=True)


def test_pretrained_backbone_from_file(tmp_path):
    src = timm.create_model('test_resnet', num_classes=0)
    with torch.no_grad():
        for p in src.parameters():
            p.fill_(0.25)
    path = tmp_path / 'weights.safetensors'
    save_file(src.state_dict(), str(path))
    model = timm_hff.create_model('test_resnet', pretrained=True, num_classes=4, check_img_size=32,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v, msg=k)
    assert model.num_classes == 4


def test_reset_classifier_new_prototypes():
    model = _build('test_resnet', dict(check_img_size=32))
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.pretrained_cfg['num_classes'] == 3
    x, _ = _batch(model)
    assert model.eval()(x).shape == (3, 3)
    with pytest.raises(ValueError, match='num_classes must be an integer >= 0'):
        model.reset_classifier(-1)


def test_registry_and_timm_create_model():
    assert 'hff_resnet18' in timm.list_models('hff_*')
    assert 'hff_resnet18' in timm_hff.list_models('hff_*')
    assert 'resnet18' in timm_hff.list_models('resnet1*')
    model = timm.create_model('hff_resnet18', num_classes=5, check_img_size=32, drop_path_rate=None)
    assert isinstance(model, timm_hff.HFFModel) and model.num_classes == 5
    assert model.model_name == 'resnet18'
    small = timm_hff.create_model('hff_resnet18_small', num_classes=10, in_chans=1)
    assert small.hff_cfg.small_input and small.split.reductions[0] == 1
    # an unregistered hff_<arch> still resolves through timm_hff.create_model
    assert timm_hff.create_model('hff_test_convnext', num_classes=2, check_img_size=32).model_name == 'test_convnext'


def test_stage_indices_choose_boundaries_and_truncate():
    model = _build('resnet18', SMALL, stage_indices=(0, 2, 3))
    assert model.num_stages == 3 and not model.split.full_tail
    assert [f['module'] for f in model.stage_info] == ['backbone.act1', 'backbone.layer2', 'backbone.layer3']
    layer4 = {n for n, _ in model.backbone.layer4.named_parameters(prefix='layer4')}
    assert set(model.split.unused_param_names) >= layer4
    x, y = _batch(model)
    out = model(x, y)
    assert len(out.stage_losses) == 3
    vit = _build('vit_tiny_patch16_224', dict(img_size=32, patch_size=8), num_stages=3)
    assert vit.split.feature_indices == (3, 7, 11)


@pytest.mark.parametrize('kwargs,match', [
    (dict(model_name='not_a_model'), "unknown model 'not_a_model'"),
    (dict(model_name='resnet18x'), "unknown model 'resnet18x'.*close timm names: resnet18"),
    (dict(num_classes=-1), 'num_classes must be an integer >= 1'),
    (dict(prototypes_per_class=0), 'prototypes_per_class must be an integer >= 1'),
    (dict(stage_indices=(1, 9)), 'stage index 9 is out of range'),
    (dict(margin=-0.1), 'margin must be'),
    (dict(scale=0), 'scale must be a positive number'),
    (dict(aux='conv5x5'), "aux must be one of"),
])
def test_bad_arguments_give_one_line_errors(kwargs, match):
    kwargs = {'model_name': 'test_resnet', 'num_classes': 3, 'check_img_size': 32, **kwargs}
    with pytest.raises(ValueError, match=match) as e:
        timm_hff.create_model(**kwargs)
    assert '\n' not in str(e.value)


def test_wrong_input_channels():
    model = _build('test_resnet', dict(check_img_size=32), in_chans=1)
    with pytest.raises(ValueError, match='expected 1 input channels, got 3') as e:
        model(torch.randn(2, 3, 32, 32))
    assert 'in_chans=3' in str(e.value)
    with pytest.raises(ValueError, match='expected images of shape'):
        model(torch.randn(2, 32, 32))


def test_unsplittable_family_names_the_family():
    # hrnet's feature taps are not on one path through forward_features (its branches fuse across scales)
    with pytest.raises(SplitError, match="family 'hrnet'") as e:
        timm_hff.create_model('hrnet_w18_small', num_classes=3, check_img_size=64)
    assert '\n' not in str(e.value)


def test_config_round_trip_rejects_unknown_keys():
    cfg = HFFConfig(prototypes_per_class=4, stage_indices=[1, 2], predict_from=[0, 1])
    assert HFFConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown HFF setting\(s\) \['protos'\]"):
        HFFConfig.from_dict({'protos': 3})


def test_deepcopy_for_ema_rebinds_the_cut():
    from timm.utils import ModelEmaV3
    model = _build('test_resnet', dict(check_img_size=32)).train()
    ema = ModelEmaV3(model, decay=0.5)
    x, y = _batch(model)
    with torch.no_grad():
        ema_logits = ema.module.forward_stages(x)
    assert len(ema_logits) == model.num_stages
    assert ema.module.split.state is not model.split.state
    out = model(x, y)   # the original still captures its own stages after the copy ran
    out.loss.backward()
    ema.update(model)
    assert all(p.grad is None for p in ema.module.parameters())


_SWIN = 'swin_tiny_patch4_window7_224'


@pytest.mark.parametrize('name,kwargs', [('resnet18', dict(check_img_size=64)), (_SWIN, MODELS[IDS.index(_SWIN)][1])],
                         ids=['resnet18', 'swin'])
def test_aux_depth_size_and_grid_pooling(name, kwargs):
    """Deeper aux blocks stack layers; aux_size pools before the aux block (cheaper, equal on small maps);
    pool_size flattens a grid of positions; every variant still trains only its own stage."""
    from torch.utils.flop_counter import FlopCounterMode
    base = _build(name, kwargs, aux='conv1x1', aux_channels=16).eval()
    deep = _build(name, kwargs, aux='conv1x1', aux_channels=16, aux_depth=3, aux_size=4, pool_size=2).eval()
    layers = [m for m in deep.heads[0].aux.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 3
    assert deep.heads[0].proj.in_features == 16 * 4                     # a 2x2 grid of 16 channels
    x, y = _batch(deep)
    with torch.no_grad():
        h = run_stages(deep.backbone, deep.split, x)
    assert h[0].shape[-2] > 4 or h[0].shape[1] > 4                        # stage 1 is larger than the aux grid
    flops = []
    for model in (base, deep):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.heads[0](h[0])
        flops.append(counter.get_total_flops())
    assert flops[1] < flops[0]                                           # 3 layers at <= 4x4 cost less than 1 at full
    assert torch.isfinite(deep(x)).all() and deep(x).shape == (3, NUM_CLASSES)
    out = deep.train()(x, y)
    out.loss.backward()
    assert all(p.grad is not None for p in deep.heads[0].parameters())
    # on a map no larger than aux_size, pooling first changes nothing
    small = _build('test_resnet', dict(check_img_size=32), aux_size=64).eval()
    ref = _build('test_resnet', dict(check_img_size=32)).eval()
    ref.load_state_dict(small.state_dict())
    xs, _ = _batch(ref)
    with torch.no_grad():
        torch.testing.assert_close(small.forward_stages(xs), ref.forward_stages(xs))


def test_grid_pooling_needs_a_feature_map():
    with pytest.raises(ValueError, match='pool_size=2 needs a feature map'):
        _build('test_vit', dict(img_size=32), pool_size=2)


@pytest.mark.parametrize('name,kwargs,cuts', [
    ('resnet18', dict(check_img_size=64, layers=(2, 2, 2, 2)),
     ['layer1.0', 1, 'layer2.0', 2, 'layer3.0', 3, 'layer4.0', 4]),
    ('convnext_atto', dict(check_img_size=64), ['stages.1', 'stages.2.blocks.2', 'stages.2', 3]),
    ('mobilenetv3_small_050', dict(check_img_size=64), ['blocks.1.0', 'blocks.2', 'blocks.3.1', -1]),
], ids=['resnet18', 'convnext_atto', 'mobilenetv3'])
def test_block_boundary_cuts(name, kwargs, cuts):
    """Cuts finer than timm's feature_info levels: each named block ends a stage, the probe verifies ownership, and
    the network computes exactly what the uncut backbone computes."""
    model = _build(name, kwargs, stage_indices=cuts).eval()
    assert model.num_stages == len(cuts)
    named = [c for c in model.split.feature_indices if isinstance(c, str)]
    assert named and all(model.stage_info[k]['module'] == f'backbone.{c}' if isinstance(c, str) else True
                         for k, c in enumerate(model.split.feature_indices))
    x, y = _batch(model)
    with torch.no_grad():
        ref = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
        outs = run_stages(model.backbone, model.split, x)
    torch.testing.assert_close(outs[-1], ref)
    out = model.train()(x, y)
    out.loss.backward()
    for k in range(model.num_stages):   # each stage's loss reached its own parameters
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stage_parameters(k, include_head=False))


def test_block_boundary_cuts_are_checked():
    with pytest.raises(SplitError, match=r"named cut must end a block.*layer1\.0\.conv2"):
        _build('resnet18', dict(check_img_size=64), stage_indices=['layer1.0.conv2', 4])
    with pytest.raises(ValueError, match=r"does not have \(close: \['layer1.1'"):
        _build('resnet18', dict(check_img_size=64), stage_indices=['layer1.7', 4])
    with pytest.raises(ValueError, match='name the same tap twice'):   # layer1 is tapped at its last block
        _build('resnet18', dict(check_img_size=64), stage_indices=['layer1.1', 1, 4])
    model = _build('resnet18', dict(check_img_size=64), stage_indices=['backbone.layer2', 'layer4'])
    assert model.split.feature_indices == (2, 4)                      # timm's own levels stay indices
    with pytest.raises(ValueError, match='integers.*or module names'):
        HFFConfig(stage_indices=[1.5])


def test_layer_decay_sees_the_backbone_layers():
    """timm's layer decay groups HFF's parameters by the backbone's layers (regexes re-rooted under backbone.)."""
    model = _build('resnet18', dict(check_img_size=64))
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.5)
    scale = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    b = model.backbone
    stem, first, last = b.conv1.weight, b.layer1[0].conv1.weight, b.layer4[1].conv2.weight
    assert scale[id(stem)] < scale[id(first)] < scale[id(last)] < 1.0
    assert scale[id(model.heads[0].prototypes)] == 1.0   # heads are new: the head group's full rate


def test_memory_efficient_releases_each_stage_output():
    """memory_efficient mode: once stage k's backward ran, nothing keeps its output alive while later stages run
    (today's peak would otherwise carry every earlier boundary tensor to the end of the forward)."""
    import gc
    import weakref
    model = _build('resnet18', SMALL).train()
    x, y = _batch(model, b=4)
    refs, alive_later = [], []
    head0 = model.heads[0].aux   # the first module of a head (a training step scores through forward_loss)
    hook = head0.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(i[0])))

    def watch(m, i, o):
        gc.collect()
        alive_later.append(refs[0]() is not None)
    late = model.heads[model.num_stages - 1].proj.register_forward_hook(watch)
    try:
        model(x, y, mode='memory_efficient')
    finally:
        hook.remove()
        late.remove()
    assert refs and alive_later == [False]    # stage 1's output was gone when the last stage ran
    # scoring (forward_stages) likewise drops each output once its head has scored it
    refs.clear()
    alive_later.clear()
    hook = head0.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(i[0])))
    late = model.heads[model.num_stages - 1].proj.register_forward_hook(watch)
    with torch.no_grad():
        model.eval().forward_stages(x)
    hook.remove()
    late.remove()
    assert alive_later == [False]


@pytest.mark.parametrize('kind', ['memory', 'time', 'step'])
def test_balanced_cut(kind, tmp_path):
    """balance= picks num_stages block-boundary cuts; the chosen cut is kept in stage_indices (a saved model rebuilds
    it without measuring), and the network is the default one (the small-input stem is that of the default cut)."""
    from timm_hff._balance import stage_costs
    kw = dict(small_input=True, check_img_size=32, num_stages=4)
    balanced = _build('resnet18', dict(kw, balance_batch=4) if kind == 'step' else kw, balance=kind)
    default = _build('resnet18', kw)
    assert balanced.num_stages == 4 and balanced.hff_cfg.stage_indices is not None
    assert balanced.split.feature_indices[-1] == 4                         # the whole network
    assert {k: v.shape for k, v in balanced.backbone.state_dict().items()} == \
        {k: v.shape for k, v in default.backbone.state_dict().items()}
    assert [m.stride for m in balanced.backbone.modules() if isinstance(m, torch.nn.Conv2d)] == \
        [m.stride for m in default.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    if kind == 'memory':
        cost = stage_costs(balanced.backbone, balanced.split.feature_indices, 3, 32)
        cost_default = stage_costs(default.backbone, default.split.feature_indices, 3, 32)
        assert max(cost) < 0.75 * max(cost_default)                        # the largest stage shrinks
    from timm_hff import hub
    path = hub.save_pretrained(balanced, str(tmp_path / kind), card=False)
    import timm_hff._builder as builder
    calls = []
    original = builder.balance_cuts
    builder.balance_cuts = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        loaded = timm_hff.create_model(f'local-dir:{path}', pretrained=True)
    finally:
        builder.balance_cuts = original
    assert loaded.split.feature_indices == balanced.split.feature_indices and not calls
    with pytest.raises(ValueError, match="balance must be one of"):
        HFFConfig(balance='speed')


def test_balanced_cut_finer_than_timms_levels_keeps_the_network():
    """More balanced stages than the backbone has reduction levels (a ResNet: 5 taps with the stem's) re-cut the same
    small-input network as the default 4 stages: the stem's max-pool stays an identity. Measured before the fix: with
    the stem adapted at the cut's own count, 6 balanced stages kept the max-pool and had a quarter of the FLOPs."""
    kw = dict(small_input=True, check_img_size=32)
    default = _build('resnet18', dict(kw, num_stages=4))
    balanced = _build('resnet18', dict(kw, num_stages=6), balance='memory')
    assert balanced.num_stages == 6
    layout = (lambda m: [(n, type(x).__name__, getattr(x, 'stride', None)) for n, x in m.backbone.named_modules()])
    assert layout(balanced) == layout(default)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        shapes = balanced.backbone.forward_features(x).shape, default.backbone.forward_features(x).shape
        assert shapes == ((2, 512, 4, 4),) * 2


@pytest.mark.parametrize('backend', ['eager', pytest.param('inductor', marks=pytest.mark.slow)])
def test_compiled_model_gives_eager_losses_and_gradients(backend):
    """torch.compile block by block: the cuts stay eager hooks, so both training modes and the adaptive path run,
    with the eager model's losses and gradients."""
    import copy
    from timm_hff._compile import compile_model, compile_units, uncompile_model
    model = _build('test_resnet', dict(check_img_size=32)).train()
    eager = copy.deepcopy(model)
    units = compile_units(model)
    assert 'heads.0' in units and not any(u == 'backbone' or u == 'backbone.layer1' for u in units)
    assert all(t.startswith(tuple(u[len('backbone.'):] for u in units)) for t in model.split.tap_names)
    compile_model(model, backend=backend)
    x, y = _batch(model, b=6)
    for mode in ('simultaneous', 'memory_efficient'):
        for m in (model, eager):
            m.zero_grad(set_to_none=True)
            out = m(x, y, mode=mode)
            if not out.backward_done:
                out.loss.backward()
            m._last = ([l.item() for l in out.stage_losses], [p.grad.clone() for p in m.parameters()])
        torch.testing.assert_close(model._last[0], eager._last[0], rtol=1e-4, atol=1e-5)
        for a, b in zip(model._last[1], eager._last[1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert set(model.state_dict()) == set(eager.state_dict())
    uncompile_model(model)
    assert not any('forward' in m.__dict__ for m in model.modules())


def test_a_folder_given_as_model_name_points_to_local_dir(tmp_path):
    run = tmp_path / 'run'
    (run / 'model').mkdir(parents=True)
    (run / 'model' / 'config.json').write_text('{}')
    with pytest.raises(ValueError, match=f"is a folder, not a model name; load a saved model with "
                                         f"'local-dir:{run}/model' " r"\(the run's saved model\)"):
        timm_hff.create_model(str(run))
    with pytest.raises(ValueError, match=f"load a saved model with 'local-dir:{run / 'model'}'$"):
        timm_hff.create_model(str(run / 'model'))


@pytest.mark.parametrize('k', [1, 3])
@pytest.mark.parametrize('soft', [False, True], ids=['hard', 'soft'])
@pytest.mark.parametrize('layout', ['NC', 'NCHW'])
def test_fused_head_equals_the_unfused_one(k, soft, layout):
    """forward_loss (one fused scoring function) against forward + loss (autograd step by step): logits, loss and
    every parameter's and the input's gradient within 1e-5."""
    from timm_hff.heads import PrototypeHead
    torch.manual_seed(0)
    cfg = HFFConfig(prototypes_per_class=k, margin=0.3, scale=12.0, embed_dim=16)
    head = PrototypeHead(8, layout, NUM_CLASSES, cfg).double().float()
    x = torch.randn(5, 8, 4, 4) if layout == 'NCHW' else torch.randn(5, 8)
    y = torch.randint(0, NUM_CLASSES, (5,))
    target = F.softmax(torch.randn(5, NUM_CLASSES) * 3, -1) if soft else y

    def grads(fused):
        head.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        if fused:
            loss, logits = head.forward_loss(xi, target)
        else:
            logits = head(xi)
            loss = head.loss(logits, target)
        loss.backward()
        return loss.detach(), logits.detach(), xi.grad, {n: p.grad.clone() for n, p in head.named_parameters()}
    (l1, z1, gx1, g1), (l0, z0, gx0, g0) = grads(True), grads(False)
    torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fused_head_counts_fewer_ops():
    """The reason for the fused head: fewer dispatched ops per local loss (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from timm_hff.heads import PrototypeHead

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    head = PrototypeHead(8, 'NC', NUM_CLASSES, HFFConfig(embed_dim=16))
    x, y = torch.randn(4, 8), torch.randint(0, NUM_CLASSES, (4,))
    counts = []
    for fused in (False, True):
        Count.n = 0
        with Count():
            loss = head.forward_loss(x, y)[0] if fused else head.loss(head(x), y)
            loss.backward()
        counts.append(Count.n)
    assert counts[1] < 0.6 * counts[0], counts
