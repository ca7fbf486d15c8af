"""``balance='step'``: the cut chosen by each stage's measured training step (blocks, head, backward, AdamW).

The time balancer timed the backbone alone and missed the heads, so on the stage-parallel recipe it chose a cut whose
stages' steps were 1.98x apart. These tests pin the two things that fixed it: the partition charges each group the
head at its end, and a model whose heads decide the cut gets the cut they decide.
"""
import itertools
import random

import pytest
import torch

import timm_hff
from timm_hff import HFFConfig
from timm_hff._balance import _partition


def _brute_force(costs, k, ends):
    """The smallest largest-group cost over every way to cut ``costs`` into ``k`` contiguous groups."""
    n, best = len(costs), None
    for cut in itertools.combinations(range(n - 1), k - 1):
        bounds = list(cut) + [n - 1]
        start, worst = 0, 0.0
        for end in bounds:
            worst = max(worst, sum(costs[start:end + 1]) + ends[end])
            start = end + 1
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize('seed', range(6))
def test_partition_charges_the_head_at_each_group_end(seed):
    rng = random.Random(seed)
    n, k = rng.randint(3, 9), rng.randint(2, 4)
    k = min(k, n)
    costs = [rng.uniform(0.1, 5.0) for _ in range(n)]
    ends = [rng.uniform(0.0, 8.0) for _ in range(n)]
    got = _partition(costs, k, ends)
    assert len(got) == k and got[-1] == n - 1 and got == sorted(set(got))
    start, worst = 0, 0.0
    for end in got:
        worst = max(worst, sum(costs[start:end + 1]) + ends[end])
        start = end + 1
    assert worst == pytest.approx(_brute_force(costs, k, ends))
    assert _partition(costs, k) == _partition(costs, k, [0.0] * n)   # no heads: the old balancer


def test_partition_moves_off_an_expensive_head():
    """Equal blocks: without heads the middle cut; a costly head there moves the cut to a boundary with a cheap one."""
    assert _partition([1.0, 1.0, 1.0, 1.0], 2) == [1, 3]
    assert _partition([1.0, 1.0, 1.0, 1.0], 2, [0.0, 5.0, 0.0, 0.0]) in ([0, 3], [2, 3])


# A network built to have one best 2-stage cut once heads count, and another without them: layer2 (16x16, 96 wide)
# and layer4 (4x4, 512 wide) hold nearly all the blocks' work, layer3 (8 wide) almost none. Backbone alone, cutting
# after layer2 or after layer3 is about a tie; but a stage ending at layer2 carries a 96-wide 3x3 aux block at 16x16
# (about as costly as layer2 itself), one ending at layer3 an 8-wide one at 8x8, and stages ending at the 32x32
# stem or layer1 carry full-resolution heads and leave layer2 + layer4 to the second stage. Measured per stage
# (1 thread, batch 32; probes while writing this test, not a stored benchmark), the cut after layer3 was about 1.3x
# faster than any other.
HEADS_DECIDE = dict(layers=[1, 1, 1, 1], channels=[8, 96, 8, 512], stem_width=8, stem_type='deep', small_input=True,
                    aux='conv3x3', aux_channels=96, embed_dim=32, check_img_size=32)


def test_step_balance_picks_the_cut_the_heads_decide():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = timm_hff.create_model('resnet18', num_classes=10, in_chans=1, balance='step', num_stages=2,
                                      balance_batch=32, **HEADS_DECIDE)
    finally:
        torch.set_num_threads(threads)
    assert model.hff_cfg.stage_indices == (3, 4)
    assert model.hff_cfg.balance == 'step' and model.hff_cfg.balance_batch == 32
    hooked = [n for n, m in model.backbone.named_modules() if m._forward_hooks]
    assert sorted(hooked) == sorted(model.split.tap_names)   # the cut's own taps only: the probe ran on a copy


def test_train_times_the_cut_at_the_runs_batch_and_layout():
    """hff-train's build passes its batch size and memory format to balance='step' (a user's own setting wins)."""
    from timm_hff.train import TrainConfig, build_model
    base = dict(model='resnet18', img_size=32, in_chans=1, batch_size=6, channels_last=True,
                model_kwargs=dict(layers=[1, 1, 1, 1], channels=[8, 8, 8, 8], stem_width=4, stem_type='deep'),
                hff=dict(small_input=True, balance='step', num_stages=2, embed_dim=8))
    cfg = TrainConfig.from_dict(base)
    model = build_model(cfg, 3)
    assert model.hff_cfg.balance_batch == 6 and model.hff_cfg.balance_channels_last is True
    assert len(model.hff_cfg.stage_indices) == 2
    own = TrainConfig.from_dict(dict(base, hff=dict(base['hff'], balance_batch=3, balance_channels_last=False)))
    model = build_model(own, 3)
    assert model.hff_cfg.balance_batch == 3 and model.hff_cfg.balance_channels_last is False


@pytest.mark.parametrize('bad, match', [
    (dict(balance_batch=0), 'balance_batch must be an integer >= 1'),
    (dict(balance_batch=True), 'balance_batch must be an integer'),
    (dict(balance_channels_last='yes'), 'balance_channels_last must be true or false'),
])
def test_balance_settings_refused_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as e:
        HFFConfig(**bad)
    assert '\n' not in str(e.value)
