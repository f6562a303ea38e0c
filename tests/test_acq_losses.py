"""Each ACQ loss term against a value computed by hand on a fixed input."""
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from acqtrain import losses, ops
from acqtrain.models import digits_net
from acqtrain.trainer import freeze_teacher


@pytest.fixture(autouse=True)
def _reference_ops():
    """The hand values check the loop's definitions; backend equivalence is tested separately."""
    import acq_kernels
    with acq_kernels.set_backend("reference"):
        yield


def _one_hot_feature(n, c, h, w, hot):
    """A feature map whose attention is a single pixel per sample (hot = [(row, col)] per sample)."""
    f = torch.zeros(n, c, h, w)
    for i, (r, col) in enumerate(hot):
        f[i, :, r, col] = 2.0
    return f


def test_kd_loss_matches_hand_value_and_gdfq_mean_switch():
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # softmax(t) rows: [3/4, 1/4], [1/2, 1/2]
    # T = 1: KL(p || q) per row = sum p log(p / q)
    row0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    q1 = torch.softmax(s[1], 0).tolist()
    row1 = 0.5 * math.log(0.5 / q1[0]) + 0.5 * math.log(0.5 / q1[1])
    expect = (row0 + row1) / 2
    assert losses.kd_loss(s, t, 1.0).item() == pytest.approx(expect, rel=1e-5)
    # GDFQ's 'mean' divides by the element count (batch x classes); T^2 scaling
    assert losses.kd_loss(s, t, 1.0, "mean").item() == pytest.approx(expect / 2, rel=1e-5)
    s20, t20 = s * 20, t * 20
    assert losses.kd_loss(s20, t20, 20.0).item() == pytest.approx(400 * expect, rel=1e-4)


def test_acm_center_of_single_pixel_attention():
    # 4x4 map: pixel (row 1, col 3) -> center (u_3, v_1) = ((2*3+1)/4-1, (2*1+1)/4-1) = (0.75, -0.25)
    f = _one_hot_feature(2, 3, 4, 4, [(1, 3), (0, 0)])
    _, _, center = ops.spatial_attention(f)
    assert torch.allclose(center, torch.tensor([[0.75, -0.25], [-0.75, -0.75]]), atol=1e-6)
    target = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    # sample 0: 0.25^2 + 0.25^2 = 0.125; sample 1: 0.75^2 * 2 = 1.125 -> mean 0.625
    got = losses.acm_loss([center, center], target)
    assert got.item() == pytest.approx(0.625, abs=1e-6)


def test_pair_hinge_hand_value():
    # normalised maps: identical pair -> d = 0 -> hinge = margin; orthogonal unit maps -> d = sqrt(2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # pairs (0,2) same, (1,3) orthogonal
    got = losses.pair_loss([a], margin=1.0)
    assert got.item() == pytest.approx((1.0 + max(0.0, 1.0 - math.sqrt(2))) / 2, abs=1e-6)
    got = losses.pair_loss([a, a], margin=2.0)  # averaged over layers
    assert got.item() == pytest.approx((2.0 + 2.0 - math.sqrt(2)) / 2, abs=1e-5)


def test_pair_distance_is_averaged_over_layers_before_the_hinge():
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])       # one pair, d = 0
    ortho = torch.tensor([[1.0, 0.0], [0.0, 1.0]])      # one pair, d = sqrt(2)
    got = losses.pair_loss([same, ortho], margin=1.0)
    # spec: relu(margin - mean_l d_l) = 1 - sqrt(2)/2; a per-layer hinge would give 0.5
    assert got.item() == pytest.approx(1.0 - math.sqrt(2) / 2, abs=1e-6)


def test_cons_sq_distance_of_stacked_halves():
    eval_maps = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    train_maps = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    got = losses.stacked_sq_distance([torch.cat([eval_maps, train_maps])])
    assert got.item() == pytest.approx((2.0 + 0.0) / 2, abs=1e-6)


def test_bns_loss_hand_value():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    x = torch.zeros(2, 2, 1, 2)
    x[:, 0] = 3.0                       # ch0: mean 3, var 0
    x[0, 1, 0] = torch.tensor([1.0, -1.0])
    x[1, 1, 0] = torch.tensor([1.0, -1.0])  # ch1: mean 0, var 1
    model = nn.Sequential(bn)
    with ops.bn_stat_collector(model) as col:
        model(x)
    loss = col.loss()[0]
    # MSE(mean) = ((3-1)^2 + 0)/2 = 2; MSE(var) = ((0-1)^2 + (1-4)^2)/2 = 5; one layer -> 7
    assert loss.item() == pytest.approx(7.0, rel=1e-5)


def test_batch_stat_bn_leaves_running_stats_untouched():
    teacher = freeze_teacher(digits_net())
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(5, 1, 16, 16)
    with losses.batch_stat_bn(teacher):
        out_train = teacher(x)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    # batch statistics were really used: differs from the eval pass, equals a train-mode copy
    import copy
    ref = copy.deepcopy(teacher).train()
    assert torch.allclose(out_train, ref(x), atol=1e-5)
    assert not torch.allclose(out_train, teacher(x), atol=1e-3)


def test_frozen_teacher_has_no_parameter_grads_but_input_grads():
    teacher = freeze_teacher(digits_net())
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    F.cross_entropy(teacher(x), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0
