"""FakeQuant / LearnableFakeQuant models under torch._dynamo, torch.compile and torch.export:
no graph breaks, training equal to eager (outputs, gradients, buffers), flag changes seen
(a recompile, never a stale graph). Tiny models: compiling is the slow part."""
import copy

import pytest
import torch
import torch.ao.nn.qat as nnqat
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization.observer import (MovingAverageMinMaxObserver,
                                            MovingAveragePerChannelMinMaxObserver)

from acq_kernels import FakeQuant, LearnableFakeQuant

from conftest import TORCH_VERSION

# Seen on torch 2.7: dynamo refuses to trace torch.ao's QuantStub and prepare_qat's hooks
# (skipped by its trace rules), and torch.export lifts the LSQ parameters as fake constants;
# torch 2.11 and 2.14 (the CI legs) pass every test here. Versions in between are untested.
_COMPILE_FLOOR = pytest.mark.skipif(TORCH_VERSION < (2, 11), reason="compile/export of torch.ao QAT models "
                                    "needs torch >= 2.11 (tested on 2.11 and 2.14; fails on 2.7)")

pytestmark = [_COMPILE_FLOOR, pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore:.*reduce_range.*:UserWarning",
                                        "ignore:.*must run observer.*:UserWarning")]

ACT = FakeQuant.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=15,
                          dtype=torch.quint8)
WEIGHT = FakeQuant.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-8,
                             quant_max=7, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
QCONFIG = tq.QConfig(activation=ACT, weight=WEIGHT)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 5, 6)

    def forward(self, x):
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(x.flatten(1)))


def prepared():
    m = Net().train()
    m.qconfig = QCONFIG
    return tq.prepare_qat(m)


class HookFree(nn.Module):
    """torch.ao.nn.qat modules plus explicit fake-quant modules, no hooks."""

    def __init__(self):
        super().__init__()
        self.fq_in = FakeQuant(observer=MovingAverageMinMaxObserver, quant_min=-8, quant_max=7,
                               dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        self.conv = nnqat.Conv2d(3, 4, 3, padding=1, qconfig=QCONFIG)
        self.lsq = LearnableFakeQuant(quant_min=0, quant_max=15, scale=0.1, zero_point=0.0)
        self.lsq.enable_param_learning()
        self.fc = nnqat.Linear(4 * 5 * 5, 6, qconfig=QCONFIG)

    def forward(self, x):
        x = self.lsq(torch.relu(self.conv(self.fq_in(x))))
        return self.fc(x.flatten(1))


def _x(i):
    """Step i's input: the same tensor for every model that asks for it."""
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randn(2, 3, 5, 5, generator=gen) * (1 + 0.3 * i)


@pytest.mark.parametrize("build", [prepared, HookFree])
def test_dynamo_explain_reports_no_graph_breaks(build):
    m = build()
    explanation = torch._dynamo.explain(m)(_x(0))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _train(model, steps, x_of):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs = []
    for i in range(steps):
        opt.zero_grad()
        out = model(x_of(i))
        out.square().mean().backward()
        outs.append((out.detach().clone(), [None if p.grad is None else p.grad.clone()
                                            for p in model.parameters()]))
        opt.step()
    return outs


def _assert_same_training(a, b):
    for (oa, ga), (ob, gb) in zip(a, b):
        torch.testing.assert_close(oa, ob, rtol=0, atol=0)
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def _assert_same_state(ma, mb):
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("build", [prepared, HookFree])
def test_compiled_training_equals_eager_and_sees_flag_changes(build):
    torch._dynamo.reset()
    if build is HookFree:
        # Traced for inductor's layout optimization, the conv weight's fake quant comes out
        # channels-last, and so does the conv output LSQ then reads: its scale gradient sums
        # in that memory order (ops.conv_weight_channels_last). Bitwise eager with the
        # optimization off; test_layout_optimized_lsq_training_matches_eager covers it on.
        with torch._inductor.config.patch(layout_optimization=False):
            return _compiled_training_equals_eager_and_sees_flag_changes(build)
    _compiled_training_equals_eager_and_sees_flag_changes(build)


def test_layout_optimized_lsq_training_matches_eager():
    torch._dynamo.reset()
    eager = HookFree()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    a, b = _train(eager, 3, _x), _train(compiled, 3, _x)
    # only the summation order of LSQ's scale/zero-point gradients differs (a few ulps)
    torch.testing.assert_close(a[0][0], b[0][0], rtol=0, atol=0)
    for (oa, ga), (ob, gb) in zip(a, b):
        torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-6)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    sa, sb = eager.state_dict(), compiled_model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def _compiled_training_equals_eager_and_sees_flag_changes(build):
    eager = build()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    _assert_same_training(_train(eager, 3, _x), _train(compiled, 3, _x))
    _assert_same_state(eager, compiled_model)
    # frozen observers, then fake quant off: each change takes effect in the compiled model
    for toggle in (tq.disable_observer, tq.disable_fake_quant, tq.enable_observer):
        for m in (eager, compiled_model):
            m.apply(toggle)
        _assert_same_training(_train(eager, 2, lambda i: _x(i + 5)),
                              _train(compiled, 2, lambda i: _x(i + 5)))
        _assert_same_state(eager, compiled_model)
    # observers off after a compiled run with them on: the state stays frozen
    frozen = copy.deepcopy(compiled_model)
    compiled_model.apply(tq.disable_observer)
    frozen.apply(tq.disable_observer)
    compiled(_x(9))
    _assert_same_state(frozen, compiled_model)


def test_inductor_compiled_training_equals_eager():
    torch._dynamo.reset()
    eager = prepared()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="inductor")
    a, b = _train(eager, 2, _x), _train(compiled, 2, _x)
    # inductor may fuse the float ops around the fake-quant ops (conv bias, the loss)
    for (oa, ga), (ob, gb) in zip(a, b):
        torch.testing.assert_close(oa, ob)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y)
    for k, v in eager.state_dict().items():
        if "fake_quant" in k or "post_process" in k:
            torch.testing.assert_close(v, compiled_model.state_dict()[k], msg=k)


def test_traced_conv_weight_fake_quant_is_channels_last_and_unchanged(monkeypatch):
    """Under compile a conv weight's fake quant (4-D, per output channel) is laid out
    channels-last, as inductor runs CPU convs, with the values, mask and observer state of the
    NCHW call; activations and other tensors keep their layout; eager never changes it."""
    from acq_kernels.fake_quant import ops
    seen, original = [], ops.conv_weight_channels_last

    def record(x, axis):
        flag = original(x, axis)
        seen.append((tuple(x.shape), axis, flag))
        return flag

    torch._dynamo.reset()
    m = prepared()
    m(_x(0))
    eager_flags = [ops.conv_weight_channels_last(m.conv.weight, 0),
                   ops.conv_weight_channels_last(_x(0), -1)]
    assert eager_flags == [False, False]
    monkeypatch.setattr(ops, "conv_weight_channels_last", record)
    torch.compile(m, fullgraph=True, backend="aot_eager")(_x(1))
    monkeypatch.undo()
    expected = torch._C._has_mkldnn and torch._inductor.config.layout_optimization
    assert ((4, 3, 3, 3), 0, expected) in seen
    assert all(not flag for shape, axis, flag in seen if shape != (4, 3, 3, 3))

    w = torch.randn(6, 5, 3, 3) * 2
    results = []
    for channels_last in (False, True):
        state = [torch.full((6,), float("inf")), torch.full((6,), float("-inf")),
                 torch.ones(6), torch.zeros(6, dtype=torch.int32)]
        out, mask = ops.fake_quant_observe(w, *state, 0, 0.01, True, -8, 7, True, 0,
                                           torch.finfo(torch.float32).eps, True, True, True,
                                           channels_last)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                 else torch.contiguous_format)
        assert mask.stride() == out.stride()
        fixed, fixed_mask = ops.fake_quant(w, state[2], state[3], -8, 7, 0, True, True,
                                           channels_last)
        assert fixed.stride() == out.stride() and fixed_mask.stride() == out.stride()
        results.append([out, mask, fixed, fixed_mask, *state])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("build", [prepared, HookFree])
def test_torch_export(build):
    m = build()
    m(_x(0))  # per-channel state takes its size on the first call
    ep = torch.export.export(m, (_x(1),))
    ref = copy.deepcopy(m)
    out = ep.module()(_x(2))
    torch.testing.assert_close(out, ref(_x(2)), rtol=0, atol=0)
