"""timm's model contract for HFF models: ``num_classes=0``, ``features_only``, ``forward_intermediates`` and
``feature_info`` agreeing, registered names with truthful default cfgs. timm's own ``tests/test_models.py`` on
every registered name is the slow case at the end."""
import copy
import os
import sys

import pytest
import timm
import torch

import timm_hff
from timm_hff._names import HFF_DEFAULTS
from timm_hff._timm_cfg import pool_type

# tiny models of three families (a ResNet, a ConvNeXt whose pooling sits in its head, a ViT), plus a small-input stem
MODELS = [
    ('test_resnet', dict(check_img_size=32)),
    ('test_convnext', dict(check_img_size=32)),
    ('test_vit', dict(img_size=32)),
    ('test_resnet', dict(small_input=True)),
]
IDS = [m[0] + ('_small_input' if m[1].get('small_input') else '') for m in MODELS]


def _size(model):
    return model.split.probe_img_size


def _x(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, model.in_chans, _size(model), _size(model), generator=g)


def _build(name, kwargs, **extra):
    torch.manual_seed(0)
    return timm_hff.create_model(name, **{**kwargs, **extra})


def _train_a_little(model, steps=3):
    """A few local steps, so the backbone differs from any fresh initialisation."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for i in range(steps):
        x = _x(model, b=4, seed=i)
        out = model(x, torch.arange(4) % model.num_classes)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_num_classes_zero_returns_the_backbones_pooled_features(name, kwargs):
    model = _build(name, kwargs, num_classes=0).eval()
    assert model.num_classes == 0 and len(model.heads) == 0 and model.pretrained_cfg['num_classes'] == 0
    x = _x(model)
    with torch.no_grad():
        feats = model(x)
        backbone = model.backbone
        expected = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        assert torch.equal(feats, expected)
        assert feats.shape == (2, model.head_hidden_size) == model.forward_head(model.forward_features(x)).shape
    with pytest.raises(ValueError, match='needs the prototype heads, but this model has none'):
        model(x, torch.tensor([0, 1]))


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_reset_classifier_removes_and_rebuilds_the_heads(name, kwargs):
    model = _build(name, kwargs, num_classes=3).eval()
    x = _x(model)
    pool = model._heads_pool
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3)
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (2, model.head_hidden_size) and len(model.heads) == 0
        if pool not in (None, 'token'):   # a CNN: global_pool='' gives the unpooled map, timm's pool_size at its size
            model.reset_classifier(0, '')
            unpooled = model(x)
            assert unpooled.ndim == 4 and unpooled.shape[1] == model.num_features
            model.reset_classifier(7)   # heads back: the backbone gets back the pooling the last head reads
            assert pool_type(model.backbone) == pool and model(x).shape == (2, 7)
            model.reset_classifier(0, '')
            with pytest.raises(ValueError, match='other pooling is only for num_classes=0'):
                model.reset_classifier(5, 'max' if pool != 'max' else 'avg')
        model.reset_classifier(5, pool)
        assert model.num_classes == 5 and len(model.heads) == model.num_stages
        assert model(x).shape == (2, 5)
    _train_a_little(model)   # the new heads train


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_feature_info_is_what_forward_intermediates_returns(name, kwargs):
    """timm's feature_info (the backbone's levels, with the adapted stem's true strides) against
    forward_intermediates; the HFF stages are stage_info."""
    model = _build(name, kwargs, num_classes=3).eval()
    x = _x(model)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
    assert len(inter) == len(model.feature_info) >= 3
    size = _size(model)
    for info, t in zip(model.feature_info, inter):
        assert t.shape[1] == info['num_chs']
        assert -(-size // info['reduction']) == t.shape[-1], (info, t.shape)
        model.get_submodule(info['module'])   # names this model's module
    assert len(model.stage_info) == model.num_stages
    assert [s['reduction'] for s in model.stage_info] == model.split.reductions


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
def test_features_only_of_a_saved_trained_model_gives_its_backbone_features(name, kwargs, tmp_path):
    trained = _train_a_little(_build(name, kwargs, num_classes=3))
    path = timm_hff.save_pretrained(trained, str(tmp_path / 'm'), card=False)
    x = _x(trained, seed=9)
    with torch.no_grad():
        want = trained.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
        fresh = _build(name, kwargs, num_classes=3).eval().forward_intermediates(x, indices=(1, 2),
                                                                                 intermediates_only=True)
    for source in ('timm', 'timm_hff'):
        create = timm.create_model if source == 'timm' else timm_hff.create_model
        net = create(f'local-dir:{path}', pretrained=True, features_only=True, out_indices=(1, 2)).eval()
        assert isinstance(net, timm.models._features.FeatureGetterNet)
        assert net.feature_info.channels() == [trained.feature_info[i]['num_chs'] for i in (1, 2)]
        assert net.feature_info.reduction() == [trained.feature_info[i]['reduction'] for i in (1, 2)]
        with torch.no_grad():
            got = net(x)
        assert len(got) == 2 and all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
        assert not all(torch.allclose(g, f, atol=1e-3) for g, f in zip(got, fresh))   # the trained weights, not init
        inner = net.model
        assert inner.num_classes == 0 and len(inner.heads) == 0
        with pytest.raises(ValueError, match='pruned to a feature extractor'):
            inner.reset_classifier(3)
    every = timm_hff.create_model(f'local-dir:{path}', pretrained=True, features_only=True)
    assert len(every.feature_info.channels()) == len(trained.feature_info)   # default: every level


def test_registered_names_build_with_defaults_and_carry_a_default_cfg():
    names = timm.list_models('hff_*')
    assert set(names) == set(HFF_DEFAULTS) | {'hff_timm'}
    assert set(timm.list_models('hff_*', name_matches_cfg=True)) == set(names)
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.num_classes == 1000 and not cfg.has_weights
        assert cfg.first_conv.startswith('backbone.') if isinstance(cfg.first_conv, str) else True
    generic = timm.create_model('hff_timm', check_img_size=32)
    assert generic.model_name == 'resnet18' and generic.predict_from == 'ensemble'


def test_registered_cfg_tells_the_models_truth():
    """input_size / pool_size / first_conv of the registry's cfg are what the built model does: the small-input
    variant is a 32 px model whose features are 4x4 (a 32 px build is fast; every other name is the slow case)."""
    _check_registered_cfg('hff_resnet18_small')
    assert timm.models.get_pretrained_cfg('hff_resnet18_small').input_size == (3, 32, 32)


def _check_registered_cfg(name):
    model = timm.create_model(name).eval()
    cfg, registered = model.default_cfg, timm.models.get_pretrained_cfg(name).to_dict()
    assert tuple(cfg['input_size']) == tuple(registered['input_size'])
    assert cfg.get('pool_size') == registered.get('pool_size') or \
        tuple(cfg['pool_size']) == tuple(registered['pool_size'])
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, *cfg['input_size']))
    if cfg.get('pool_size'):   # a feature map, NCHW or NHWC (token models have no pool size)
        assert feats.shape[-2:] == tuple(cfg['pool_size']) or feats.shape[1:3] == tuple(cfg['pool_size'])
    first = cfg['first_conv']
    state = model.state_dict()
    assert all(f'{f}.weight' in state for f in ((first,) if isinstance(first, str) else first))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(set(HFF_DEFAULTS) - {'hff_resnet18_small'}))
def test_registered_cfg_tells_the_models_truth_every_name(name):
    _check_registered_cfg(name)


def test_registered_names_train_every_parameter_through_a_plain_loss():
    """timm's backward contract: a loss on model(x) reaches every parameter (the registered names predict from the
    stage ensemble, so a timm training script trains every stage, each through its own head)."""
    model = timm.create_model('hff_resnet18', num_classes=42, check_img_size=32).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize('name,kwargs', [m for m in MODELS if m[0] != 'test_vit'],
                         ids=[i for i in IDS if i != 'test_vit'])
def test_eval_forward_traces_with_torch_fx(name, kwargs):
    """timm's fx feature extraction traces ``model(x)``: the prediction, tap hooks and heads, no input checks. (A ViT
    built at another size than its pos-embed's resamples it by a data-dependent branch, which fx cannot trace, as
    for timm's own; the registered ViTs are traced by timm's tests, the slow case below.)"""
    from timm.models import create_feature_extractor, get_graph_node_names   # timm's leaf modules and functions
    model = _train_a_little(_build(name, kwargs, num_classes=3))
    x = _x(model)
    _, eval_nodes = get_graph_node_names(model)
    fx = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        expected = model(x)
        got = list(fx(x).values())[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():   # the model itself still checks its input and trains
        with pytest.raises(ValueError, match='input channels'):
            model(torch.randn(2, model.in_chans + 1, _size(model), _size(model)))


def test_a_meta_build_allocates_nothing_and_matches_a_real_one():
    """timm's create_model(..., device='meta'): the cut is probed on meta tensors; the same modules and shapes."""
    meta = timm.create_model('hff_resnet18', device='meta', num_classes=7)
    real = timm.create_model('hff_resnet18', num_classes=7)
    assert {t.device.type for t in meta.state_dict().values()} == {'meta'}
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert meta.split.tap_names == real.split.tap_names and meta.split.channels == real.split.channels
    with torch.device('meta'):
        assert timm.create_model('hff_resnet18', num_classes=7).heads[0].prototypes.is_meta


def test_output_dtype_follows_the_model_dtype_and_unpruned_keeps_its_heads():
    model = _train_a_little(_build('test_resnet', dict(check_img_size=32), num_classes=3))
    x = _x(model)
    with torch.no_grad():
        expected = model(x)
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([len(model.feature_info) - 1], prune_head=False)   # prunes nothing
        assert len(kept.heads) == model.num_stages and torch.equal(kept(x), expected)
        model.to(torch.bfloat16)
        assert model(x.bfloat16()).dtype == torch.bfloat16
        model.set_predict_from('ensemble')
        assert model(x.bfloat16()).dtype == torch.bfloat16


REQUIRED = ['test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_default_cfgs_non_std',
            'test_model_forward_features', 'test_model_forward_intermediates',
            'test_model_forward_intermediates_features', 'test_model_forward_fx', 'test_model_backward_fx',
            'test_prune_intermediate_layers_contract']


@pytest.mark.slow
def test_timms_own_model_tests_pass_on_every_hff_model():
    """timm's tests/test_models.py (vendored unedited, tests/timm_upstream) over every hff_* name: every case of the
    contract's tests passes (TorchScript is not run: HFF's tap hooks and dataclass configs do not script)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks.timm_contract import run_upstream, summarise
    code, out, outcomes = run_upstream(REQUIRED)
    summary = summarise(outcomes)
    assert set(summary) == set(REQUIRED), out[-3000:]
    failing = {t: s['failing'] for t, s in summary.items() if s['failed'] or not s['passed']}
    assert not failing, out[-3000:]
    assert sum(s['passed'] for s in summary.values()) >= len(REQUIRED) * 3, summary
    assert code == 0, out[-3000:]
