"""The eager hot path of FakeQuant: the extension's C++ autograd ops (fq_observe_train,
fq_forward_train) against the torch.library custom ops they stand in for, bitwise (outputs,
gradients, observer state, qparams), on awkward sizes and layouts, with and without a graph,
and the conditions under which the module must not take them (tracing, Python modes)."""
import pytest
import torch

import acq_kernels
from acq_kernels import FakeQuant
from acq_kernels.fake_quant import ops

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(ops._extension_op("fq_observe_train") is None,
                                 reason="the C++ extension is not built")]

MA = torch.ao.quantization.observer.MovingAverageMinMaxObserver
MAPC = torch.ao.quantization.observer.MovingAveragePerChannelMinMaxObserver

# (shape, layout, axis): numel not a multiple of 8 or of the AVX2 width, channel runs that
# start off a mask byte, channels innermost.
CASES = [((1,), "contiguous", -1), ((7,), "contiguous", -1), ((9,), "contiguous", -1),
         ((3, 5, 7), "contiguous", -1), ((2, 3, 5, 7), "channels_last", -1),
         ((4, 16, 9, 9), "contiguous", -1), ((65537,), "contiguous", -1),
         ((5, 3, 3, 3), "contiguous", 0), ((3, 13, 5, 7), "contiguous", 1),
         ((3, 13, 5, 7), "channels_last", 1), ((2, 6, 9), "transposed", 2)]


def _x(shape, layout, seed, nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    if nan:
        flat[::17] = float("nan")
    flat[:: 11] = 0.0
    flat[5 :: 37] = -0.0
    flat[3 :: 53] = torch.round(flat[3 :: 53] * 4) / 4  # near ties at a power-of-two scale
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _state(axis, channels):
    c = 1 if axis < 0 else channels
    return [torch.full((c,), float("inf")), torch.full((c,), float("-inf")), torch.ones(c),
            torch.zeros(c, dtype=torch.int32)]


def _args(axis, moving):
    # axis, averaging_constant, moving_average, quant_min, quant_max, symmetric,
    # symmetric_zero_point, eps
    return (axis, 0.1, moving, 0, 15, False, 0, torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("shape,layout,axis", CASES)
@pytest.mark.parametrize("clipped", [True, False])
def test_observe_train_matches_the_custom_op(shape, layout, axis, clipped):
    channels = shape[axis] if axis >= 0 else 1
    s_train, s_ref = _state(axis, channels), _state(axis, channels)
    train = ops._extension_op("fq_observe_train")
    for step, moving in enumerate((True, True, False)):
        x = _x(shape, layout, step)
        g = torch.randn(shape).to(memory_format=torch.contiguous_format)  # other layout
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        out = train(a, *s_train, *_args(axis, moving), clipped)
        ref = ops.ObserveFakeQuant.apply(b, *s_ref, *_args(axis, moving), clipped)[0]
        assert torch.equal(out, ref) and out.stride() == ref.stride()
        assert torch.equal(torch.signbit(out), torch.signbit(ref))
        out.backward(g)
        ref.backward(g)
        assert torch.equal(a.grad, b.grad)
        for t, r in zip(s_train, s_ref):
            assert torch.equal(t, r)


@pytest.mark.parametrize("shape,layout,axis", CASES)
def test_fixed_train_matches_the_custom_op(shape, layout, axis):
    channels = shape[axis] if axis >= 0 else 1
    scale = torch.rand(channels) * 0.3 + 0.05
    zp = torch.randint(0, 16, (channels,), dtype=torch.int32)
    x = _x(shape, layout, 7, nan=True)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out = ops._extension_op("fq_forward_train")(a, scale, zp, 0, 15, axis, True)
    ref = ops.fake_quant(b, scale, zp, 0, 15, axis, True)[0]
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
    g = torch.randn(shape)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_no_graph_no_mask_and_inference_mode():
    train = ops._extension_op("fq_observe_train")
    x = torch.randn(100, requires_grad=True)
    with torch.no_grad():
        out = train(x, *_state(-1, 1), *_args(-1, True), True)
    assert out.grad_fn is None and not out.requires_grad
    with torch.inference_mode():  # below autograd: the plain kernel
        state = _state(-1, 1)
        out = train(torch.randn(100), *state, *_args(-1, True), True)
        assert torch.isfinite(state[0]).all() and out.shape == (100,)
    out = train(torch.randn(100), *_state(-1, 1), *_args(-1, True), True)  # needs no grad
    assert out.grad_fn is None


def test_the_module_takes_the_eager_ops_and_the_custom_ops_under_modes(monkeypatch):
    taken = []
    real = ops.observe_train_op
    monkeypatch.setattr(ops, "observe_train_op", lambda x: (taken.append(real(x)), taken[-1])[1])
    fq = FakeQuant(observer=MA, quant_min=0, quant_max=15, dtype=torch.quint8)
    x = torch.randn(4, 8, requires_grad=True)
    fq(x).sum().backward()
    assert taken[-1] is not None
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:  # no fake kernel for the C++ op: the custom op runs
        fake = FakeQuant(observer=MA, quant_min=0, quant_max=15, dtype=torch.quint8)
        out = fake(mode.from_tensor(torch.randn(4, 8)))
    assert taken[-1] is None and out.shape == (4, 8)
    with acq_kernels.set_backend("reference"):  # another backend: its custom-op path
        fq(x)
    assert taken[-1] is None


def test_the_module_matches_torch_through_the_eager_ops():
    """Per-channel weights and per-tensor activations over several steps, bitwise torch."""
    for kw, shape in ((dict(observer=MA, quant_min=0, quant_max=15, dtype=torch.quint8), (8, 9, 7)),
                      (dict(observer=MAPC, quant_min=-8, quant_max=7, dtype=torch.qint8,
                            qscheme=torch.per_channel_symmetric, ch_axis=0), (6, 5, 3, 3))):
        ours, ref = FakeQuant(**kw), torch.ao.quantization.FakeQuantize(**kw)
        for step in range(4):
            x = _x(shape, "contiguous", step)
            a = x.clone().requires_grad_(True)
            b = x.clone().requires_grad_(True)
            out, want = ours(a), ref(b)
            assert torch.equal(out, want)
            g = torch.randn(shape)
            out.backward(g)
            want.backward(g)
            assert torch.equal(a.grad, b.grad)
            assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.zero_point, ref.zero_point)
        ours.disable_observer()
        ref.disable_observer()
        a = torch.randn(shape, requires_grad=True)
        b = a.detach().clone().requires_grad_(True)
        out, want = ours(a), ref(b)
        assert torch.equal(out, want)
        out.sum().backward()
        want.sum().backward()
        assert torch.equal(a.grad, b.grad)
