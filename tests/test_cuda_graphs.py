"""``cuda_graphs``: what a captured training step may not do, the refusals, and the captured step equal to the eager
one.

On a machine without a GPU the capture itself cannot run (``hff-train`` refuses it in one line, see
tests/test_bad_inputs.py). What is checked here on any machine:

- every method's and schedule's step (and the fused optimizer's) dispatches no op that makes the host wait for the
  device, by the same op-by-op check ``CapturedStep`` runs before it captures (and which finds the ops that would);
- the bookkeeping of ``CapturedStep`` (warm-up, capture, replay, a new capture when the step changes, eager steps
  for another batch shape, the scheduler's lr written into the tensors a graph reads) inside a real training run,
  with the graph replaced by ``ReplayGraph``: a stand-in that re-runs the captured function on the static buffers,
  reading the lr from the capture's tensors and writing into the capture's outputs and gradients as a graph would.

On a CUDA machine (``test_captured_step_equals_eager_on_cuda``) real graphs are compared with eager steps.
"""
import pytest
import torch
from torch.utils._pytree import tree_leaves

import timm_hff
from timm_hff.train import Trainer
from timm_hff.train.engines import cuda_graphs
from timm_hff.train.engines.cuda_graphs import CapturedStep, GraphCaptureError, host_syncs

from conftest import reset_accelerate, tiny, weights   # also the fixtures idx_root, fresh_accelerate_state

pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')


class ReplayGraph:
    """A CUDA graph's effect on a step, on any device (see the module docstring)."""

    def __init__(self, device):
        self.fn = None

    def warm(self, fn, step):
        return fn()

    def capture(self, fn, step):
        self.fn = fn
        return fn()

    def replay(self, step):
        params, groups = step.params, step.optimizer.param_groups
        for p in params:
            p.grad = None
        floats = [g['lr'] for g in groups]
        # the captured kernels read the lr from the capture's tensors: they must hold the scheduler's lr of now
        assert [t.item() for t in step.lrs] == pytest.approx(floats, rel=1e-6), 'a replay would read a stale lr'
        for g, t in zip(groups, step.lrs):
            g['lr'] = t
        try:
            out = self.fn()
        finally:
            for g, v in zip(groups, floats):
                g['lr'] = v
        with torch.no_grad():   # into the graph's own memory: its gradients and outputs
            for p, g in zip(params, step.grads):
                if g is not None and p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g
            for static, new in zip(tree_leaves(step.static_outputs), tree_leaves(out)):
                static.copy_(new)


def _model(**kw):
    return timm_hff.create_model('test_resnet', num_classes=10, in_chans=1, small_input=True, check_img_size=28, **kw)


# ----- what a graph cannot hold -----
def test_host_syncs_are_found_with_the_line_that_asks():
    x = torch.randn(8, 4)

    def step():
        y = x * 2
        if y.sum() > 0:               # bool() of a tensor
            y = y + 1
        z = y[y > 0]                  # a boolean mask
        return float(z.mean()), torch.nonzero(y)

    _, found = host_syncs(step)
    ops = [op for op, _, _ in found]
    assert 'aten::_local_scalar_dense' in ops and 'aten::nonzero' in ops
    assert any('test_cuda_graphs.py' in where and 'step' in where for _, _, where in found), found
    _, none = host_syncs(lambda: (x * 2).sum() + torch.zeros(3).masked_fill(torch.ones(3) > 0, 1.0).sum())
    assert none == []   # masked_fill / where keep their shapes: fine in a graph


def _optimizer(model, opt):
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, opt, lr=0.05, weight_decay=1e-4, **cuda_graphs.optimizer_kwargs(opt, 'cpu'))


@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
@pytest.mark.parametrize('setting', ['simultaneous', 'memory_efficient', 'sequential_stage1', 'soft_targets',
                                     'clip_grad', 'bp'])
def test_training_steps_have_no_host_syncs(setting, opt):
    """Every step ``hff-train`` would capture, with the fused optimizer step: nothing a graph could not replay."""
    from timm_hff.train import get_method
    from timm_hff.train.methods import NoAccelerator
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    if setting == 'bp':
        from timm_hff.baselines.bp import create_bp_model
        method, model = get_method('bp'), create_bp_model('test_resnet', num_classes=10, in_chans=1,
                                                          small_input=True)
    else:
        method, model = get_method('hff'), _model()
    model.train()
    if setting == 'soft_targets':   # mixup / smoothing: (B, C) targets
        y = torch.softmax(torch.randn(8, 10), -1)
    opt_ = _optimizer(model, opt)
    mode = 'memory_efficient' if setting == 'memory_efficient' else 'simultaneous'
    stage = 1 if setting == 'sequential_stage1' else None

    def step():
        _, stage_losses = method.step(NoAccelerator, model, model, x, y, stage, mode)
        if setting == 'clip_grad':
            for k in range(model.num_stages):
                params = [p for p in model.stage_parameters(k) if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt_.step()
        return stage_losses

    for _ in range(2):   # the second step has the optimizer's state (its first step creates it)
        opt_.zero_grad(set_to_none=True)
        losses, found = host_syncs(step)
        assert found == [], found
    assert all(torch.isfinite(v).all() for v in losses)


def test_a_step_with_a_host_read_stops_before_capture():
    model = _model().train()
    opt = _optimizer(model, 'sgd')
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))

    def step(x, y):
        out = model(x, y)
        out.loss.backward()
        print(f'loss {out.loss.item():.3f}')   # the habit a graph cannot replay
        opt.step()
        return out.loss.detach()

    captured = CapturedStep(opt, list(model.parameters()), torch.device('cpu'), backend=ReplayGraph)
    with pytest.raises(GraphCaptureError, match=r"^cuda_graphs: the training step reads a tensor value on the host "
                                                r"\(.*\): aten::_local_scalar_dense at .*test_cuda_graphs.py:\d+ in "
                                                r"step, which a CUDA graph cannot replay") as e:
        captured(step, (x, y))
    assert '\n' not in str(e.value)


def test_the_graph_is_captured_on_the_warm_up_shape():
    """A smaller batch while warming up runs eagerly and never becomes the graph; no capture without a warm-up step
    (the optimizer's lazy state would be captured, re-initialised at every replay)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, fused=True)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(lin(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    captured = CapturedStep(opt, list(lin.parameters()), torch.device('cpu'), backend=ReplayGraph, warmup=2)
    full, small = (torch.randn(8, 4), torch.randint(0, 3, (8,))), (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    for batch in (full, small, full, small, full, full, small):
        captured(step, batch)
    assert captured.counts == dict(warmup=2, capture=1, replay=1, eager=3), captured.counts
    assert captured.static_inputs[0].shape == (8, 4)
    with pytest.raises(ValueError, match='at least one warm-up step before capture'):
        CapturedStep(opt, list(lin.parameters()), torch.device('cpu'), warmup=0)


# ----- refusals -----
@pytest.mark.parametrize('settings, pattern', [
    (dict(mixed_precision='fp16'), r"fp16's loss scaler reads an overflow flag on the host every step; use "
                                   r"mixed_precision: bf16"),
    (dict(grad_accum_steps=2), r'a graph is one optimizer step per batch, and grad_accum_steps=2 is not captured'),
    (dict(torchcompile='inductor'), r'give cuda_graphs or torchcompile, not both'),
    (dict(grad_checkpointing=True), r'drop grad_checkpointing'),
    (dict(schedule='stage_parallel', hff=dict(small_input=True, num_stages=2)), r'stage_parallel runs one process'),
    (dict(opt='lion'), r"opt 'lion' has no device-side \(fused\) step"),
])
def test_settings_a_graph_cannot_hold_are_refused(idx_root, tmp_path, settings, pattern):
    with pytest.raises(ValueError, match=r'^cuda_graphs: .*' + pattern) as e:
        tiny(idx_root, tmp_path, cuda_graphs=True, **settings)
    assert '\n' not in str(e.value) and str(e.value).endswith('(or drop cuda_graphs)')
    tiny(idx_root, tmp_path, **settings)   # each is fine without cuda_graphs


def test_the_optimizer_gets_its_fused_step():
    from timm_hff.train.optim import build_optimizer
    from timm_hff.train import TrainConfig
    model = _model()
    for opt, device, expect in [('sgd', 'cuda', dict(fused=True)), ('adamw', 'cuda', dict(fused=True, capturable=True)),
                                ('adamw', 'cpu', dict(fused=True, capturable=False))]:
        cfg = TrainConfig(cuda_graphs=True, opt=opt, val_split='test')
        group = build_optimizer(cfg, model, device_type=device).param_groups[0]
        assert {k: group.get(k, False) for k in expect} == expect, (opt, device)
    assert not build_optimizer(TrainConfig(val_split='test'), model).param_groups[0]['fused']


# ----- the captured step in a training run -----
def _run(idx_root, out, monkeypatch, warmup, **kw):
    """A tiny run, ``cuda_graphs`` with ReplayGraph for the graph (warmup=None: never capture, every step eager), or
    warmup=False: a plain run without cuda_graphs."""
    reset_accelerate()
    monkeypatch.setattr(cuda_graphs, 'check_device', lambda device, n: None)
    monkeypatch.setattr(cuda_graphs, 'CudaGraph', ReplayGraph)
    monkeypatch.setattr(cuda_graphs, 'WARMUP_STEPS', 10 ** 9 if warmup is None else warmup)
    # 44 images of 8: five full batches and one of 4 (run eagerly beside the graph); the lr changes every update
    cfg = tiny(idx_root, out, cuda_graphs=warmup is not False, train_num_samples=44, epochs=3, head_warmup_epochs=1,
               sched='cosine', warmup_epochs=1, checkpoint_hist=3, **kw)
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


@pytest.mark.parametrize('opt, extra', [('sgd', {}), ('adamw', dict(clip_grad=0.5, lr=0.01, smoothing=0.1))])
def test_replayed_steps_train_as_eager_ones(idx_root, tmp_path, monkeypatch, opt, extra):
    """SGD against a plain run (fused vs foreach kernels: equal to float rounding); AdamW against the same run with
    every step eager, as this tiny network under AdamW turns rounding differences (the fused kernels' tensor-lr and
    float-lr paths) into weight differences of 1e-3."""
    eager = _run(idx_root, tmp_path / 'eager', monkeypatch, False if opt == 'sgd' else None, opt=opt, **extra)
    graphed = _run(idx_root, tmp_path / 'graphed', monkeypatch, 2, opt=opt, **extra)
    counts = graphed.captured.counts
    # epoch 1 (heads only): 2 warm-up steps, the capture, 2 replays, the 4-image batch eager beside the graph; epoch 2
    # (everything trains: a new capture) the same; epoch 3 (the same step) replays its five full batches
    assert counts == dict(warmup=4, capture=2, replay=9, eager=3), counts
    # each epoch's row says how its steps ran (metrics.json / csv)
    assert [r['cuda_graph_replay'] for r in graphed.history] == [2, 2, 5]
    assert [r['cuda_graph_capture'] for r in graphed.history] == [1, 1, 0]
    assert eager.captured is None or eager.captured.counts['capture'] == 0
    step = graphed.captured   # after an eager step the gradients are the graph's tensors again (the eager ones freed)
    assert all(p.grad is g for p, g in zip(step.params, step.grads)) and any(g is not None for g in step.grads)
    lrs = [r['lr'] for r in graphed.history]
    assert len(set(lrs)) == 3   # the scheduler moved the lr between (and within) epochs
    tol = dict(rtol=1e-5, atol=1e-6) if opt == 'sgd' else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(eager.history, graphed.history):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=tol['rtol'], abs=tol['atol'])
        assert a['lr'] == b['lr']
    wa = weights(str(tmp_path / 'eager' / 'run' / 'model'))
    wb = weights(str(tmp_path / 'graphed' / 'run' / 'model'))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **tol, msg=k)


# ----- real graphs -----
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@needs_cuda
@pytest.mark.parametrize('method', ['hff_simultaneous', 'hff_memory_efficient', 'bp'])
@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
def test_captured_step_equals_eager_on_cuda(method, opt):
    """Eight steps, the lr changed before each (values exact in float32, as the graph's lr tensors hold them):
    captured and eager give the same losses and weights (fp32, deterministic cuDNN)."""
    import copy
    from timm_hff.baselines.bp import create_bp_model
    device = torch.device('cuda')
    torch.manual_seed(0)
    if method == 'bp':
        model = create_bp_model('resnet18', num_classes=10, in_chans=1, small_input=True)
    else:
        model = timm_hff.create_model('resnet18', num_classes=10, in_chans=1, small_input=True, check_img_size=28)
    models = [model.to(device).train(), copy.deepcopy(model).to(device).train()]
    from timm.optim import create_optimizer_v2
    opts = [create_optimizer_v2(m, opt, lr=0.05, weight_decay=1e-4, **cuda_graphs.optimizer_kwargs(opt, 'cuda'))
            for m in models]
    batches = [(torch.randn(32, 1, 28, 28, device=device), torch.randint(0, 10, (32,), device=device))
               for _ in range(8)]

    def make_step(m, o):
        def step(x, y):
            if method == 'bp':
                loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                losses = [loss.detach()]
            else:
                mode = method.split('_', 1)[1]
                out = m(x, y, mode=mode, backward_fn=(lambda l: l.backward()) if mode == 'memory_efficient' else None)
                if not out.backward_done:
                    out.loss.backward()
                losses = [s.detach() for s in out.stage_losses]
            o.step()
            return losses
        return step

    captured = CapturedStep(opts[1], list(models[1].parameters()), device)
    eager_step, graph_step = make_step(models[0], opts[0]), make_step(models[1], opts[1])
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for i, (x, y) in enumerate(batches):
            for o in opts:
                for g in o.param_groups:
                    g['lr'] = (8 - i) / 128
            opts[0].zero_grad(set_to_none=True)
            a = [t.clone() for t in eager_step(x, y)]
            b = [t.clone() for t in captured(graph_step, (x, y))]
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f'step {i}')
    assert captured.counts['capture'] == 1 and captured.counts['replay'] == 8 - cuda_graphs.WARMUP_STEPS - 1
    for (n, pa), pb in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)


@needs_cuda
@pytest.mark.parametrize('schedule', ['simultaneous', 'memory_efficient'])
def test_hff_train_with_cuda_graphs_on_cuda(idx_root, tmp_path, schedule):
    """A whole run as a user starts it (Accelerate, bf16, channels_last, clipping, EMA, the partial last batch):
    it replays, and trains as the eager run does (to bf16 and kernel-order noise)."""
    settings = dict(train_num_samples=44, epochs=2, mixed_precision='bf16', channels_last=True, clip_grad=1.0,
                    model_ema=True, schedule=schedule, save_model=False)
    reset_accelerate()
    plain = Trainer(tiny(idx_root, tmp_path / 'eager', **settings))
    eager = plain.fit()
    reset_accelerate()
    trainer = Trainer(tiny(idx_root, tmp_path / 'graphed', cuda_graphs=True, **settings))
    graphed = trainer.fit()
    assert trainer.captured.counts['capture'] == 1 and trainer.captured.counts['replay'] == 2 * 5 - 3 - 1
    assert trainer.captured.counts['eager'] == 2   # each epoch's 4-image batch
    assert graphed['train_loss'] == pytest.approx(eager['train_loss'], rel=0.05)
