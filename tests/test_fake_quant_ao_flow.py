"""acq_kernels.FakeQuant inside torch.ao's eager QAT flow (fuse -> prepare_qat -> train ->
convert), step for step bitwise equal to the same model prepared with torch's FakeQuantize;
state dicts interchangeable both ways."""
import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.quantization.observer import (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

import acq_kernels
from acq_kernels import FakeQuant

from conftest import cpu_backends

# torch.ao's eager quantization warns about its own deprecation and reduce_range.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore:.*reduce_range.*:UserWarning",
                                        "ignore:.*quantized tensor creation.*:UserWarning",
                                        "ignore:.*must run observer.*:UserWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        x = self.fc(torch.flatten(x, 1))
        return self.dequant(x)


def _qconfig(cls):
    return tq.QConfig(
        activation=cls.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                 dtype=torch.quint8),
        weight=cls.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                             quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )


def _prepared(float_model, cls):
    m = copy.deepcopy(float_model).train()
    m = tq.fuse_modules_qat(m, [["conv1", "bn1", "relu1"], ["conv2", "relu2"]])
    m.qconfig = _qconfig(cls)
    return tq.prepare_qat(m)


@contextlib.contextmanager
def _engine():
    before = torch.backends.quantized.engine
    supported = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = next(e for e in ("x86", "fbgemm", "qnnpack")
                                           if e in supported)
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _train(model, data, steps, freeze_at):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        if i == freeze_at:  # the usual QAT schedule: freeze ranges and BN statistics
            model.apply(tq.disable_observer)
            model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        x, y = data[i]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        yield losses[-1]


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"] + ["triton"])
def test_prepare_qat_train_convert_matches_torch(backend):
    triton = backend == "triton"
    steps, freeze_at = (3, 2) if triton else (8, 5)
    float_model = Net()
    data = [(torch.randn(4 if triton else 16, 3, 8, 8) * (1 + 0.2 * i),
             torch.randint(0, 10, (4 if triton else 16,))) for i in range(steps)]
    with acq_kernels.set_backend(backend), _engine():
        ref = _prepared(float_model, tq.FakeQuantize)
        ours = _prepared(float_model, FakeQuant)
        n_ours = sum(type(m) is FakeQuant for m in ours.modules())
        assert n_ours == 7  # 4 activations (quant stub, 2 fused relus, fc) + 3 weights
        assert not any(type(m) is FakeQuant for m in ref.modules())
        steps_ours = _train(ours, data, steps, freeze_at)
        steps_ref = _train(ref, data, steps, freeze_at)
        for la, lb in zip(steps_ours, steps_ref):
            assert torch.equal(la, lb)
            _assert_same_state(ours, ref)  # parameters, BN statistics, qparams, observers

        ours.eval()
        ref.eval()
        qa, qb = tq.convert(ours), tq.convert(ref)
        assert isinstance(qa.fc, torch.ao.nn.quantized.Linear)
        x = torch.randn(5, 3, 8, 8)
        out_a, out_b = qa(x), qb(x)
        assert torch.equal(out_a, out_b)
        assert torch.equal(qa.conv1.weight().int_repr(), qb.conv1.weight().int_repr())
        assert qa.fc.scale == qb.fc.scale and qa.fc.zero_point == qb.fc.zero_point


def test_state_dicts_interchange_both_ways():
    float_model = Net()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    with _engine():
        trained_ref = _prepared(float_model, tq.FakeQuantize)
        trained_ours = _prepared(float_model, FakeQuant)
        for _ in zip(_train(trained_ref, data, 3, 99), _train(trained_ours, data, 3, 99)):
            pass
        # fresh models: per-channel scale/zero_point still hold one element, min_val none
        fresh_ours = _prepared(float_model, FakeQuant)
        fresh_ref = _prepared(float_model, tq.FakeQuantize)
        assert fresh_ours.conv1.weight_fake_quant.scale.numel() == 1
        fresh_ours.load_state_dict(trained_ref.state_dict())
        fresh_ref.load_state_dict(trained_ours.state_dict())
        assert fresh_ours.conv1.weight_fake_quant.scale.numel() == 8
        _assert_same_state(fresh_ours, trained_ref)
        _assert_same_state(fresh_ref, trained_ours)
        # and the loaded models keep training in lock step
        more = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
        for la, lb in zip(_train(fresh_ours, more, 2, 1), _train(fresh_ref, more, 2, 1)):
            assert torch.equal(la, lb)
        _assert_same_state(fresh_ours, fresh_ref)
        fresh_ours.eval()
        fresh_ref.eval()
        x = torch.randn(3, 3, 8, 8)
        assert torch.equal(tq.convert(fresh_ours)(x), tq.convert(fresh_ref)(x))


def test_gdfq_style_minmax_weights_convert_with_last_step_range():
    """range_mode="minmax" weights (per-step per-channel range, pure STE) through prepare_qat and
    convert: the converted weights use the range of the final float weights."""
    qconfig = tq.QConfig(
        activation=FakeQuant.with_args(observer=MovingAverageMinMaxObserver, quant_min=0,
                                       quant_max=255, averaging_constant=0.1, ste="pure"),
        weight=FakeQuant.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                   quant_min=-128, quant_max=127, dtype=torch.qint8,
                                   qscheme=torch.per_channel_affine, range_mode="minmax",
                                   ste="pure"),
    )
    m = tq.fuse_modules_qat(Net().train(), [["conv1", "bn1", "relu1"], ["conv2", "relu2"]])
    m.qconfig = qconfig
    m = tq.prepare_qat(m)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    losses = list(_train(m, data, 3, 99))
    assert all(torch.isfinite(v) for v in losses)
    wfq = m.conv2.weight_fake_quant
    assert wfq.activation_post_process.min_val.numel() == 0  # the observer never ran
    m.eval()
    with _engine():
        q = tq.convert(m)
        out = q(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    want = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_affine, quant_min=-128,
        quant_max=127)
    want(m.conv2.weight.detach())
    scale, zp = want.calculate_qparams()
    qw = q.conv2.weight()
    assert torch.equal(qw.q_per_channel_scales().float(), scale)
    assert torch.equal(qw.q_per_channel_zero_points(), zp)
