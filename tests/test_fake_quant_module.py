"""acq_kernels.FakeQuant / LearnableFakeQuant against torch.ao's FakeQuantize and
_LearnableFakeQuantize: bitwise parity of outputs, gradients and buffers over many steps,
on every backend usable on CPU (Triton through the interpreter, so its cases stay small)."""
import copy

import pytest
import torch
from torch.ao.quantization import fake_quantize as tfq
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

import acq_kernels
from acq_kernels import FakeQuant, LearnableFakeQuant

from conftest import cpu_backends

# torch.ao's eager quantization warns about its own deprecation and reduce_range.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore:.*reduce_range.*:UserWarning",
                                        "ignore:.*quantized tensor creation.*:UserWarning",
                                        "ignore:.*must run observer.*:UserWarning")

BACKENDS = cpu_backends()

# torch's own configurations (the kwargs of its FakeQuantize.with_args partials) plus symmetric,
# qint8, low-bit and per-channel-axis variants; test_fused_path_is_taken_only_where... lists
# which of them take the fused moving-average path.
_MA = MovingAverageMinMaxObserver
_MAPC = MovingAveragePerChannelMinMaxObserver
CONFIGS = {
    "default_fake_quant": tfq.default_fake_quant.p.keywords,  # reduce_range=True
    "default_weight_fake_quant": tfq.default_weight_fake_quant.p.keywords,
    "default_per_channel_weight_fake_quant": tfq.default_per_channel_weight_fake_quant.p.keywords,
    "fused_act": tfq.default_fused_act_fake_quant.p.keywords,
    "fused_wt_neg127": tfq.fused_wt_fake_quant_range_neg_127_to_127.p.keywords,
    "fused_pc_wt_neg127": tfq.fused_per_channel_wt_fake_quant_range_neg_127_to_127.p.keywords,
    "act_symmetric_quint8": dict(observer=_MA, quant_min=0, quant_max=255, dtype=torch.quint8,
                                 qscheme=torch.per_tensor_symmetric),
    "act_symmetric_qint8": dict(observer=_MA, quant_min=-128, quant_max=127, dtype=torch.qint8,
                                qscheme=torch.per_tensor_symmetric),
    "act_affine_qint8_4bit": dict(observer=_MA, quant_min=-8, quant_max=7, dtype=torch.qint8,
                                  averaging_constant=0.1),
    "act_default_range": dict(observer=_MA),  # quant_min/max from the dtype, not customised
    # torch picks zero point 128 here (127 for a customised range): not the fused ops' rule
    "act_symmetric_quint8_default_range": dict(observer=_MA, qscheme=torch.per_tensor_symmetric),
    "pc_affine_axis1": dict(observer=_MAPC, quant_min=0, quant_max=15, dtype=torch.quint8,
                            qscheme=torch.per_channel_affine, ch_axis=1),
    "minmax_observer": dict(observer=MinMaxObserver, quant_min=0, quant_max=255),
    "dynamic": tfq.default_dynamic_fake_quant.p.keywords,  # observer path (is_dynamic)
    "embedding_float_qparams": tfq.default_embedding_fake_quant.p.keywords,
    "per_channel_minmax": dict(observer=PerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                               dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
}
FAST = ("default_fake_quant", "fused_act", "default_per_channel_weight_fake_quant",
        "act_symmetric_qint8")


def _inputs(step, shape, layout):
    """A fresh input per step whose range drifts, so the moving averages keep moving."""
    x = torch.randn(shape) * (0.5 + step * 0.3) + 0.2 * step - 0.3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        base = torch.randn(shape[0], shape[1] * 2, *shape[2:]) * (1 + step) + 0.1 * step
        x = base[:, ::2]  # every other channel: a non-contiguous view
        assert not x.is_contiguous()
    return x


def _assert_same_buffers(ours, ref):
    got, want = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), (k, got[k], want[k])


def _step(ours, ref, x):
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    oa, ob = ours(xa), ref(xb)
    assert torch.equal(oa, ob)
    g = torch.randn_like(ob)
    oa.backward(g)
    ob.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    _assert_same_buffers(ours, ref)
    return oa


def _run_schedule(ours, ref, shape, layout, steps):
    """Observer on, then frozen ranges, then fake quant toggled off and on again."""
    for i in range(steps):
        _step(ours, ref, _inputs(i, shape, layout))
    for m in (ours, ref):
        m.disable_observer()
    for i in range(2):
        _step(ours, ref, _inputs(steps + i, shape, layout))
    for m in (ours, ref):
        m.disable_fake_quant()
    x = _inputs(0, shape, layout)
    assert torch.equal(ours(x), x)
    for m in (ours, ref):
        m.enable_fake_quant()
        m.enable_observer()
    _step(ours, ref, _inputs(steps + 3, shape, layout))


def _pair(name, **extra):
    kw = CONFIGS[name]
    return FakeQuant(**kw, **extra), tfq.FakeQuantize(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bitwise_parity_with_torch_fake_quantize(backend, name):
    if backend == "triton" and name not in FAST:
        pytest.skip("interpreter: the fast subset covers the Triton kernels")
    small = backend == "triton"
    shape = (3, 5, 7, 9) if small else (6, 10, 13, 11)
    steps = 3 if small else 8
    with acq_kernels.set_backend(backend):
        ours, ref = _pair(name)
        _run_schedule(ours, ref, shape, "contiguous", steps)
        # and on other layouts, continuing from the ranges reached so far
        for layout in ("channels_last", "strided"):
            _step(ours, ref, _inputs(1, shape, layout))


def test_histogram_observer_runs_torch_observer_then_our_kernel():
    ours, ref = FakeQuant(observer=HistogramObserver, quant_min=0, quant_max=127), \
        tfq.FakeQuantize(observer=HistogramObserver, quant_min=0, quant_max=127)
    for i in range(3):
        _step(ours, ref, _inputs(i, (4, 6, 5, 5), "contiguous"))


def test_fused_path_is_taken_only_where_it_reproduces_the_observer():
    fused = {name: _pair(name)[0]._plan.observe_fused for name in CONFIGS}
    # torch.ao's four min/max observers, per tensor and per channel, affine and symmetric, any
    # range (customised or not) and reduce_range
    for name in ("default_fake_quant", "fused_act", "default_weight_fake_quant",
                 "default_per_channel_weight_fake_quant", "fused_pc_wt_neg127",
                 "act_symmetric_quint8", "act_symmetric_qint8", "act_affine_qint8_4bit",
                 "act_default_range", "act_symmetric_quint8_default_range", "pc_affine_axis1",
                 "minmax_observer", "per_channel_minmax"):
        assert fused[name], name
    assert not fused["dynamic"] and not fused["embedding_float_qparams"]
    assert not FakeQuant(observer=HistogramObserver)._plan.observe_fused

    class MyObserver(_MA):  # a subclass may change forward: torch's code path
        pass
    assert not FakeQuant(observer=MyObserver)._plan.observe_fused


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(acq_kernels, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(acq_kernels, name, wrapper)
    return calls


def _count_ops(monkeypatch):
    from acq_kernels.fake_quant import ops
    calls = []
    for name in ("fake_quant_observe", "fake_quant"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n),
                                                                             _real(*a, **k))[1])
    # the eager C++ autograd ops (the extension's hot path) count as the op they run
    for picker, name in (("observe_train_op", "fake_quant_observe"), ("fixed_train_op", "fake_quant")):
        real_pick = getattr(ops, picker)

        def pick(x, _real_pick=real_pick, _n=name):
            op = _real_pick(x)
            return None if op is None else (lambda *a, **k: (calls.append(_n), op(*a, **k))[1])
        monkeypatch.setattr(ops, picker, pick)
    return calls


@pytest.mark.parametrize("name", ["fused_act", "default_per_channel_weight_fake_quant"])
def test_fused_path_updates_observer_and_qparams_in_place(monkeypatch, name):
    calls = _count_ops(monkeypatch)
    ours, ref = _pair(name)
    x = torch.randn(4, 8, 3) * 3
    ours(x)
    ref(x)
    obs = ours.activation_post_process
    min_val, scale = obs.min_val, ours.scale
    _assert_same_buffers(ours, ref)
    assert calls == ["fake_quant_observe"]  # one op per step
    ours(x * 2)
    ref(x * 2)
    assert obs.min_val is min_val and ours.scale is scale  # updated in place
    _assert_same_buffers(ours, ref)
    assert ours.calculate_qparams()[0].tolist() == scale.tolist()
    ours.disable_observer()
    ours(x)
    assert calls == ["fake_quant_observe"] * 2 + ["fake_quant"]  # frozen range: plain fake quant


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["fused_act", "default_per_channel_weight_fake_quant"])
def test_half_inputs_match_reference_backend(backend, dtype, name):
    ours = FakeQuant(**CONFIGS[name])
    ref = copy.deepcopy(ours)
    for i in range(3):
        x = _inputs(i, (3, 6, 5, 7), "contiguous").to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with acq_kernels.set_backend(backend):
            oa = ours(xa)
        with acq_kernels.set_backend("reference"):
            ob = ref(xb)
        assert oa.dtype == dtype and oa.shape == x.shape
        torch.testing.assert_close(oa, ob, rtol=0, atol=0)
        g = torch.randn_like(ob)
        oa.backward(g)
        ob.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
        _assert_same_buffers(ours, ref)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # no fp64 Triton
@pytest.mark.parametrize("name", ["fused_act", "default_fake_quant",
                                  "default_per_channel_weight_fake_quant"])
def test_float64_inputs_match_torch(backend, name):
    from conftest import TORCH_VERSION
    if name != "default_per_channel_weight_fake_quant" and TORCH_VERSION < (2, 9):
        pytest.skip("torch < 2.9's per-tensor fake quant computes float64 input in float64; "
                    "acq_kernels follows torch >= 2.9")
    with acq_kernels.set_backend(backend):
        ours, ref = _pair(name)
        for i in range(3):
            _step(ours, ref, _inputs(i, (3, 6, 5, 7), "contiguous").double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["fused_act", "default_per_channel_weight_fake_quant"])
def test_pure_ste_passes_gradient_everywhere(backend, name):
    with acq_kernels.set_backend(backend):
        fq = FakeQuant(**CONFIGS[name], ste="pure")
        clipped = FakeQuant(**CONFIGS[name])
        x = torch.randn(4, 6, 5, 3)
        fq(x)
        clipped(x)
        fq.disable_observer()
        clipped.disable_observer()
        x = (x * 4).requires_grad_()  # now far outside the frozen range
        out = fq(x)
        torch.testing.assert_close(out, clipped(x.detach()), rtol=0, atol=0)
        g = torch.randn_like(out)
        out.backward(g)
        assert torch.equal(x.grad, g)
        x2 = x.detach().requires_grad_()
        clipped(x2).backward(g)
        assert (x2.grad == 0).any()  # the clipped STE would have masked some


def _fresh_minmax_observer(name, fq):
    """What GDFQ's per-step range means in torch.ao terms: a new MinMaxObserver (per-channel
    for per-channel schemes) with the module's configuration, fed only this batch."""
    kw = {k: v for k, v in CONFIGS[name].items() if k not in ("observer", "averaging_constant")}
    if fq.is_per_channel:
        return PerChannelMinMaxObserver(**kw)
    return MinMaxObserver(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["fused_act", "act_symmetric_qint8", "default_fake_quant",
                                  "act_symmetric_quint8_default_range",
                                  "default_per_channel_weight_fake_quant", "pc_affine_axis1"])
def test_minmax_range_mode_recomputes_range_every_step(backend, name):
    with acq_kernels.set_backend(backend):
        fq = FakeQuant(**CONFIGS[name], range_mode="minmax")
        for i in range(3):
            x = _inputs(i, (4, 6, 5, 3), "contiguous").requires_grad_()
            out = fq(x)
            obs = _fresh_minmax_observer(name, fq)
            obs(x.detach())
            scale, zp = obs.calculate_qparams()
            assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp.int())
            if fq.is_per_channel:
                want = torch.fake_quantize_per_channel_affine(
                    x, scale, zp.int(), fq.ch_axis, obs.quant_min, obs.quant_max)
            else:
                want = torch.fake_quantize_per_tensor_affine(
                    x, scale, zp.int(), obs.quant_min, obs.quant_max)
            assert torch.equal(out, want)
            g = torch.randn_like(out)
            out.backward(g)
            (gw,) = torch.autograd.grad(want, x, g)
            assert torch.equal(x.grad, gw)
        # fake quant off: the range still follows each batch
        fq.disable_fake_quant()
        x = _inputs(5, (4, 6, 5, 3), "contiguous")
        assert fq(x) is x
        obs = _fresh_minmax_observer(name, fq)
        obs(x)
        assert torch.equal(fq.scale, obs.calculate_qparams()[0])
        fq.enable_fake_quant()
        # calculate_qparams (what convert() reads) reports the last step's range
        s, z = fq.calculate_qparams()
        assert torch.equal(s, fq.scale) and torch.equal(z, fq.zero_point)
        # observer off: the range stays frozen
        fq.disable_observer()
        frozen = fq.scale.clone()
        fq(torch.randn(4, 6, 5, 3) * 10)
        assert torch.equal(fq.scale, frozen)


def test_extra_repr_with_args_and_state():
    ctor = FakeQuant.with_args(observer=_MA, quant_min=0, quant_max=15, ste="pure",
                               range_mode="minmax")
    fq = ctor()
    assert isinstance(fq, FakeQuant) and isinstance(fq, tfq.FakeQuantize)
    assert fq.ste == "pure" and fq.range_mode == "minmax" and fq.quant_max == 15
    text = repr(fq)
    for part in ("ste='pure'", "range_mode='minmax'", "backend=", "quant_max=15"):
        assert part in text
    assert fq.state_dict().keys() == tfq.FakeQuantize(quant_min=0, quant_max=15).state_dict().keys()


def test_toggles_and_mirrors():
    ours, ref = _pair("fused_act")
    torch.ao.quantization.disable_observer(ours)
    torch.ao.quantization.disable_fake_quant(ours)
    assert ours.observer_enabled.item() == 0 and ours.fake_quant_enabled.item() == 0
    assert not ours.observer_on and not ours.fake_quant_on
    x = torch.randn(20)
    assert ours(x) is x and ours.activation_post_process.min_val.isinf()
    ours.enable_observer()
    ours(x)
    assert torch.equal(ours.activation_post_process.min_val, x.min())
    # fake quant off, observer on: statistics still move, as in torch
    ref.disable_fake_quant()
    ours.enable_observer()
    y = torch.randn(30)
    ref(x)
    out = ours(y)
    ref(y)
    assert out is y
    _assert_same_buffers(ours, ref)
    # load_state_dict refreshes the mirrors
    ref.disable_observer()
    ours.load_state_dict(ref.state_dict())
    assert not ours.observer_on and not ours.fake_quant_on


@pytest.mark.parametrize("name", ["fused_act", "default_per_channel_weight_fake_quant"])
def test_empty_input(name):
    ours, ref = _pair(name)
    x = torch.randn(4, 3, 2, 2)
    _step(ours, ref, x)
    e = torch.randn(4, 3, 0, 2, requires_grad=True)
    out = ours(e)
    assert out.shape == e.shape
    ref(e.detach())
    _assert_same_buffers(ours, ref)
    out.sum().backward()
    assert e.grad.shape == e.shape


def test_bad_constructor_arguments_name_the_argument():
    with pytest.raises(ValueError, match="ste"):
        FakeQuant(ste="foo")
    with pytest.raises(TypeError, match="ste"):
        FakeQuant(ste=None)
    with pytest.raises(ValueError, match="range_mode"):
        FakeQuant(range_mode="x")
    with pytest.raises(TypeError, match="range_mode"):
        FakeQuant(range_mode=1)
    with pytest.raises(ValueError, match="ste"):
        FakeQuant(**CONFIGS["embedding_float_qparams"], ste="pure")
    with pytest.raises(ValueError, match="quant_min"):
        LearnableFakeQuant(observer=_MA, quant_min=5, quant_max=5)
    with pytest.raises(TypeError, match="quant_max"):
        LearnableFakeQuant(observer=_MA, quant_min=0, quant_max=2.5)
    with pytest.raises(ValueError, match="channel_len"):
        LearnableFakeQuant(observer=_MAPC, channel_len=0)


def test_state_dict_interchange_per_channel_resizes():
    ours, ref = _pair("default_per_channel_weight_fake_quant")
    w = torch.randn(8, 4, 3, 3)
    ref(w)
    fresh = FakeQuant(**CONFIGS["default_per_channel_weight_fake_quant"])
    assert fresh.scale.numel() == 1
    fresh.load_state_dict(ref.state_dict())
    _assert_same_buffers(fresh, ref)
    ours(w)
    back = tfq.FakeQuantize(**CONFIGS["default_per_channel_weight_fake_quant"])
    back.load_state_dict(ours.state_dict())
    _assert_same_buffers(back, ours)
    w2 = torch.randn(8, 4, 3, 3) * 2
    _step(fresh, back, w2)


# ----------------------------------------------------------------------------- learnable
LEARNABLE = {
    "per_tensor_affine": dict(observer=_MA, quant_min=0, quant_max=15),
    "per_tensor_symmetric": dict(observer=_MA, quant_min=-8, quant_max=7, dtype=torch.qint8,
                                 qscheme=torch.per_tensor_symmetric),
    "per_channel_affine": dict(observer=_MAPC, quant_min=0, quant_max=255, channel_len=5,
                               qscheme=torch.per_channel_affine, ch_axis=1),
    "per_channel_symmetric": dict(observer=_MAPC, quant_min=-128, quant_max=127, channel_len=6,
                                  dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
}


def _learnable_step(ours, ref, x, learn):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = ours(xa), ref(xb)
    assert torch.equal(oa, ob)
    g = torch.randn_like(ob)
    oa.backward(g)
    ob.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    if learn:
        for p in ("scale", "zero_point"):
            ga, gb = getattr(ours, p).grad, getattr(ref, p).grad
            # scale/zero-point grads are reductions: equal up to summation order
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for m in (ours, ref):
                m.scale -= 1e-2 * ref.scale.grad  # the same update for both
                m.zero_point -= 1e-1 * ref.zero_point.grad
                m.scale.grad = None
                m.zero_point.grad = None
    assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.zero_point, ref.zero_point)
    _assert_same_buffers(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_grad_scaling", [False, True])
@pytest.mark.parametrize("name", list(LEARNABLE))
def test_learnable_matches_torch(backend, name, use_grad_scaling):
    kw = dict(LEARNABLE[name], use_grad_scaling=use_grad_scaling)
    shape = {"per_channel_affine": (3, 5, 4, 7), "per_channel_symmetric": (6, 3, 5, 2)}.get(
        name, (4, 5, 6, 3))
    with acq_kernels.set_backend(backend):
        ours, ref = LearnableFakeQuant(**kw), _LearnableFakeQuantize(**kw)
        for i in range(2):  # static estimates from the observer
            _learnable_step(ours, ref, _inputs(i, shape, "contiguous"), learn=False)
        ours.enable_param_learning()
        ref.enable_param_learning()
        assert ours.scale.requires_grad and ours.learning_enabled.item() == 1
        for i in range(3):
            _learnable_step(ours, ref, _inputs(2 + i, shape, "contiguous"), learn=True)
        _learnable_step(ours, ref, _inputs(5, shape, "channels_last"), learn=True)
        ours.enable_static_observation()
        ref.enable_static_observation()
        x = _inputs(6, shape, "contiguous")
        assert torch.equal(ours(x), x)
        ref(x)
        _assert_same_buffers(ours, ref)
        for a, b in zip(ours.calculate_qparams(), ref.calculate_qparams()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_learnable_half_inputs_match_reference_backend(backend, dtype):
    kw = dict(LEARNABLE["per_channel_affine"], use_grad_scaling=True)
    ours = LearnableFakeQuant(**kw)
    ref = copy.deepcopy(ours)
    calib = torch.randn(3, 5, 4, 7)
    for m in (ours, ref):
        m(calib)  # static estimate in fp32
        m.enable_param_learning()
    x = (torch.randn(3, 5, 4, 7) * 2).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with acq_kernels.set_backend(backend):
        oa = ours(xa)
    with acq_kernels.set_backend("reference"):
        ob = ref(xb)
    assert oa.dtype == dtype
    assert torch.equal(oa, ob)
    g = torch.randn_like(ob)
    oa.backward(g)
    ob.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(ours.scale.grad, ref.scale.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.zero_point.grad, ref.zero_point.grad, rtol=1e-4, atol=1e-6)


def test_learnable_state_dict_and_repr():
    kw = LEARNABLE["per_channel_affine"]
    ours, ref = LearnableFakeQuant(**kw), _LearnableFakeQuantize(**kw)
    ref(torch.randn(3, 5, 4, 7))
    ref.enable_param_learning()
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert torch.equal(ours.scale, ref.scale) and not ours.static_on
    assert "use_grad_scaling=False" in repr(ours) and "backend=" in repr(ours)
    x = torch.randn(3, 5, 4, 7)
    assert torch.equal(ours(x), ref(x))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["fused_act", "act_symmetric_qint8", "default_fake_quant",
                                  "default_per_channel_weight_fake_quant"])
def test_cuda_parity_and_no_host_sync_on_fused_path(name):
    ours, ref = _pair(name)
    ours.cuda()
    ref.cuda()
    shape = (8, 16, 9, 11)
    for i in range(5):
        _step(ours, ref, _inputs(i, shape, "contiguous").cuda())
    _step(ours, ref, _inputs(5, shape, "channels_last").cuda())
    if ours._plan.observe_fused:
        x = _inputs(6, shape, "contiguous").cuda().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in forward/backward raises
        try:
            ours(x).sum().backward()
            ours.disable_observer()  # the mirror, not the CUDA buffer, is read
            ours(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # toggles reach the CUDA forward through the mirrors
    ours.disable_fake_quant()
    x = torch.randn(shape, device="cuda")
    assert ours(x) is x


@pytest.mark.cuda
def test_cuda_learnable_matches_torch():
    kw = dict(LEARNABLE["per_channel_affine"], use_grad_scaling=True)
    ours, ref = LearnableFakeQuant(**kw).cuda(), _LearnableFakeQuantize(**kw).cuda()
    shape = (3, 5, 4, 7)
    _learnable_step(ours, ref, _inputs(0, shape, "contiguous").cuda(), learn=False)
    ours.enable_param_learning()
    ref.enable_param_learning()
    for i in range(3):
        _learnable_step(ours, ref, _inputs(1 + i, shape, "contiguous").cuda(), learn=True)


def test_new_paths_reject_bad_input_naming_the_argument():
    fq = FakeQuant(**CONFIGS["default_per_channel_weight_fake_quant"])
    with pytest.raises(ValueError, match="ch_axis=0"):
        fq(torch.tensor(1.0))  # a 0-d x has no channel axis
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fq(torch.ones(3, 2, dtype=torch.int32))
    assert fq.activation_post_process.min_val.numel() == 0  # nothing observed
    with pytest.raises(ValueError, match="ste must be one of"):
        fq.ste = "straight"
    with pytest.raises(TypeError, match="range_mode must be a str"):
        fq.range_mode = 1
    assert fq.ste == "clipped" and fq._plan.clipped
    fq.disable_observer()
    with pytest.raises(ValueError, match="scale/zero_point hold 1 values but x has 4 channels"):
        fq(torch.randn(4, 3))


@pytest.mark.parametrize("static", [False, True])
def test_learnable_module_called_twice_in_one_step_matches_torch(static):
    """A LearnableFakeQuant used at two places of one forward (PT2E shares one per edge): its
    in-place scale clamp / static estimate must not invalidate the first call's saved scale."""
    def run(cls):
        m = cls(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=15, scale=0.1,
                zero_point=0.0, use_grad_scaling=True)
        m.enable_fake_quant()
        if static:
            m.enable_static_estimate()
        else:
            m.toggle_observer_update(False)
        x = torch.randn(257, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y = m(x) + m(x * 2)
        y.sum().backward()
        return y.detach(), x.grad, m.scale.grad, m.zero_point.grad, m.scale.detach()
    for ours, theirs in zip(run(LearnableFakeQuant), run(_LearnableFakeQuantize)):
        assert (ours is None and theirs is None) if static and ours is None else torch.equal(ours, theirs)
