"""The head contract (``timm_hff.heads.Head``): a head type that defines only what the contract asks for works
everywhere a head is used (training in both modes, every prediction, adaptive exit, weight decay groups, save and
load, transfer to a new label set), and the model reads no head's internals."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_hff
from timm_hff.heads import HEADS, Head, PrototypeHead, pool_stage, register_head
from timm_hff.hub import ExportError, export_timm, save_pretrained

KW = dict(in_chans=1, check_img_size=32)


class LinearHead(Head):
    """A plain softmax classifier on the pooled stage output: forward, loss and reset_prototypes, nothing more."""

    def __init__(self, in_chs, layout, num_classes, cfg, num_prefix_tokens=0):
        super().__init__()
        self.layout, self.num_prefix_tokens = layout, num_prefix_tokens
        self.fc = nn.Linear(in_chs, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.fc(pool_stage(x, self.layout, self.num_prefix_tokens))

    def loss(self, logits, target):
        return F.cross_entropy(logits.float(), target)

    def reset_prototypes(self, num_classes):
        self.fc = nn.Linear(self.fc.in_features, num_classes).to(self.fc.weight)
        self.num_classes = num_classes


@pytest.fixture
def linear_head():
    register_head('linear_test')(LinearHead)
    yield 'linear_test'
    HEADS.pop('linear_test', None)


def _model(head, num_classes=5, seed=0):
    torch.manual_seed(seed)
    return timm_hff.create_model('test_resnet', num_classes=num_classes, head=head, **KW)


def _batch(model, b=6):
    g = torch.Generator().manual_seed(1)
    s = model.split.probe_img_size
    return torch.randn(b, 1, s, s, generator=g), torch.randint(0, model.num_classes, (b,), generator=g)


def test_a_new_head_is_one_class_and_one_registration(linear_head, tmp_path):
    model = _model(linear_head)
    assert all(type(h) is LinearHead for h in model.heads)
    x, y = _batch(model)
    grads = {}
    for mode in ('simultaneous', 'memory_efficient'):
        model.zero_grad(set_to_none=True)
        out = model(x, y, mode=mode)
        if not out.backward_done:
            out.loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
        assert len(out.stage_losses) == model.num_stages and out.logits.shape == (6, 5)
    for a, b in zip(*grads.values()):   # the default forward_loss / fused_losses give both modes the same gradients
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        stages = model.forward_stages(x)
        for pf in ('last', 'ensemble', 1):
            model.set_predict_from(pf)
            assert model(x).shape == (6, 5)
        model.set_exits(thresholds=[0.5] * (model.num_stages - 1), rule='max_prob')
        model.set_predict_from('adaptive')
        logits, exit_stage = model.forward_adaptive(x)
    probs = [F.softmax(s, -1).amax(-1) for s in stages]   # each image leaves at its first stage sure past 0.5
    for i, k in enumerate(exit_stage.tolist()):
        assert all(probs[j][i] < 0.5 for j in range(k)) and (k == model.num_stages - 1 or probs[k][i] >= 0.5)
        torch.testing.assert_close(logits[i], stages[k][i])
    assert not any(n.startswith('heads.') for n in model.no_weight_decay())   # the head asks for none
    save_pretrained(model, tmp_path / 'm')
    loaded = timm_hff.create_model(f'local-dir:{tmp_path / "m"}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ExportError, match='not linear'):   # Head.linear_classifier: None by default
        export_timm(model, tmp_path / 'plain')
    model.reset_classifier(3)
    assert all(h.num_classes == 3 and h.fc.out_features == 3 for h in model.heads)


def test_the_prototype_head_names_its_own_weight_decay_exemptions():
    model = _model('prototype')
    assert {f'heads.{k}.prototypes' for k in range(model.num_stages)} <= model.no_weight_decay()
    assert PrototypeHead.no_weight_decay(model.heads[0]) == {'prototypes'}


def test_register_head_refuses_a_class_outside_the_contract():
    with pytest.raises(TypeError, match=r"register_head\('plain'\) takes a subclass of timm_hff.heads.Head"):
        register_head('plain')(nn.Linear)
    assert 'plain' not in HEADS


def test_an_incomplete_head_says_what_it_lacks(linear_head):
    class NoLoss(LinearHead):
        loss = Head.loss
    register_head('linear_test')(NoLoss)
    model = _model(linear_head)
    x, y = _batch(model)
    with pytest.raises(NotImplementedError, match='must define loss'):
        model(x, y)
