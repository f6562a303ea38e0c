"""Fake-quant ops: reference vs torch's native ops (bitwise), every CPU-usable backend vs the
reference (Triton under TRITON_INTERPRET=1, the C++ extension when it has the op), LSQ, the fused
observers, autograd, torch.compile, and edge values."""
import pytest
import torch
from torch.ao.quantization.observer import (MinMaxObserver, MovingAverageMinMaxObserver,
                                            PerChannelMinMaxObserver)

import acq_kernels as ak
from acq_kernels import _backend
from acq_kernels.fake_quant import ops, reference
from conftest import torch_per_tensor_2_9

BACKENDS = _backend.usable_backends(torch.device("cpu"))
EXT_OP = {"fake_quantize": "fq_forward", "learnable": "fq_learnable_backward",
          "minmax": "fq_minmax_forward", "moving_average": "fq_moving_average_forward"}
RANGES = [(-2, 1), (0, 3), (-8, 7), (0, 15), (-128, 127), (0, 255), (-127, 127),
          (-32768, 32767), (0, 65535)]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def use_backend(backend, family):
    """Context selecting `backend`, skipping when the extension lacks this family's op."""
    if backend in ("cpu", "cuda"):
        for name in ([EXT_OP[family]] + (["fq_mask_backward"] if family != "learnable" else [])
                     + (["fq_forward"] if family == "learnable" else [])):
            if not ops._ext_has(name):
                pytest.skip(f"the C++ extension does not provide acq_kernels_C::{name} yet")
    return ak.set_backend(backend)


def torch_fq(x, scale, zp, qmin, qmax, axis):
    """torch's native fake quant (fp32), its x-gradient mask."""
    xr = x.detach().float().clone().requires_grad_()
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(xr, scale.float(), zp.to(torch.int32), qmin, qmax)
    else:
        y = torch.fake_quantize_per_channel_affine(xr, scale.float(), zp.to(torch.int32), axis,
                                                   qmin, qmax)
    y.backward(torch.ones_like(y))
    return y.detach(), xr.grad


def qparams(x, axis, qmin, qmax, pow2=False):
    c = 1 if axis is None else x.size(axis)
    if pow2:
        scale = 2.0 ** torch.randint(-5, 1, (c,)).float()
    else:
        scale = torch.rand(c) * 0.3 + 0.01
    zp = torch.randint(qmin, qmax + 1, (c,), dtype=torch.int32)
    return scale, zp


def layouts(shape):
    """[(name, tensor)]: contiguous, channels_last, a permuted dense layout and a strided
    (non-dense) view; all fresh leaf tensors."""
    base = torch.randn(shape) * 2
    big = torch.randn([s * 2 if i == base.dim() - 1 else s for i, s in enumerate(shape)]) * 2
    out = [("contiguous", base.clone())]
    if base.dim() == 4:
        out.append(("channels_last", base.contiguous(memory_format=torch.channels_last)))
    out.append(("permuted", base.transpose(0, -1).contiguous().transpose(0, -1)))
    out.append(("strided", big[..., ::2]))
    return out


# --- reference vs torch ---------------------------------------------------------------------

def tie_input(axis, qmin, qmax):
    """[3, 160] input whose first 80 columns are exact ties (k + 0.5) * scale, with
    power-of-two scales and odd zero points (which tells a zero point added before rounding
    from one added after)."""
    x = torch.randn(3, 160)
    scale, zp = qparams(x, axis, qmin, qmax, pow2=True)
    zp = torch.where(zp % 2 == 0, torch.where(zp < qmax, zp + 1, zp - 1), zp)
    k = torch.arange(-40, 40, dtype=torch.float32)
    # exact ties, then the nearest floats on the near side of each tie (floor(v + 0.5)
    # rounds those up: v + 0.5 itself rounds to an integer)
    v = torch.cat([k + 0.5, torch.nextafter(k + 0.5, k)])
    if axis is None:
        x[:, :] = v * scale
    elif axis == 0:
        x[:, :] = v * scale[:, None]
    else:
        x[:, :] = v * scale
    return x, scale, zp


@pytest.mark.parametrize("qrange", RANGES, ids=str)
def test_reference_matches_torch_on_exact_ties(qrange):
    qmin, qmax = qrange
    for axis in (None, 0, 1):
        x, scale, zp = tie_input(axis, qmin, qmax)
        out, mask = reference.fq_forward(x, scale, zp, qmin, qmax, -1 if axis is None else axis,
                                         True)
        want, want_grad = torch_fq(x, scale, zp, qmin, qmax, axis)
        assert torch.equal(out, want)
        assert torch.equal(reference.unpack_mask(mask, x).float(), want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_torch_on_exact_ties(backend):
    with use_backend(backend, "fake_quantize"):
        for qmin, qmax in ((-8, 7), (0, 255), (-127, 127), (-32768, 32767)):
            for axis in (None, 0, 1):
                x, scale, zp = tie_input(axis, qmin, qmax)
                x.requires_grad_()
                y = ak.fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
                y.backward(torch.ones_like(y))
                want, want_grad = torch_fq(x, scale, zp, qmin, qmax, axis)
                assert torch.equal(y, want) and torch.equal(x.grad, want_grad)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided"])
def test_reference_matches_torch_layouts(layout):
    x = dict(layouts((4, 6, 5, 7)))[layout]
    for axis in (None, 0, 1, 2, 3):
        scale, zp = qparams(x, axis, -8, 7)
        xd = ak.fake_quant.functional._dense(x)
        out, mask = reference.fq_forward(xd, scale, zp, -8, 7, -1 if axis is None else axis, True)
        want, grad = torch_fq(x, scale, zp, -8, 7, axis)
        assert torch.equal(out, want)
        assert out.stride() == xd.stride()
        assert torch.equal(reference.unpack_mask(mask, xd).float(), grad)


def test_mask_format_is_memory_order_lsb_first():
    x = torch.tensor([0.0, 100.0, 0.0, -100.0, 0.0, 0.0, 0.0, 0.0, 100.0, 0.0])
    _, mask = reference.fq_forward(x, torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32),
                                   -8, 7, -1, True)
    # in range: elements 0, 2, 4, 5, 6, 7 -> 0b11110101; 9 -> byte 1 = 0b10, trailing bits 0
    assert mask.tolist() == [0b11110101, 0b00000010]


# --- every backend vs reference / torch -----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quantize_backends_match_torch(backend, dtype):
    with use_backend(backend, "fake_quantize"):
        for n in (1, 7, 1000, 4099):
            x = (torch.randn(n) * 3).to(dtype).requires_grad_()
            qmin, qmax = RANGES[torch.randint(len(RANGES), ()).item()]
            scale, zp = qparams(x, None, qmin, qmax)
            scale = scale * (qmax - qmin) ** -0.5 * 8
            y = ak.fake_quantize(x, scale, zp, qmin, qmax)
            g = torch.randn_like(y)
            y.backward(g)
            want, mask = torch_fq(x, scale, zp, qmin, qmax, None)
            assert y.dtype == dtype
            assert torch.equal(y, want.to(dtype))  # fp32 result rounded once
            assert torch.equal(x.grad, (g.float() * mask).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_per_channel_layouts(backend, dtype):
    with use_backend(backend, "fake_quantize"):
        for axis in (0, 1, -1, -2):
            for name, base in layouts((3, 5, 4, 7)):  # fresh tensors: grads do not accumulate
                x = base.to(dtype).requires_grad_()
                scale, zp = qparams(x, axis % 4, -8, 7)
                y = ak.fake_quantize(x, scale, zp, -8, 7, axis=axis)
                g = torch.randn_like(y)
                y.backward(g)
                want, mask = torch_fq(x, scale, zp, -8, 7, axis % 4)
                assert torch.equal(y, want.to(dtype)), (name, axis)
                assert torch.equal(x.grad, (g.float() * mask).to(dtype)), (name, axis)
                if name != "strided":  # a dense input keeps its strides
                    assert y.stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_quantize_float64(backend):
    if backend == "triton":
        pytest.skip("float64 runs on the reference and cpu backends only")
    with use_backend(backend, "fake_quantize"):
        x = torch.randn(5, 301, dtype=torch.float64, requires_grad=True)
        scale, zp = qparams(x, 0, 0, 15)
        y = ak.fake_quantize(x, scale, zp, 0, 15, axis=0)
        y.sum().backward()
        # torch's own CPU kernel computes double inputs with an fp32 1/scale, like us
        want = torch.fake_quantize_per_channel_affine(x.detach(), scale, zp, 0, 0, 15)
        assert torch.equal(y, want)
        inv = (1.0 / scale).double()[:, None]
        q = torch.round(x.detach() * inv) + zp[:, None]
        assert torch.equal(x.grad, ((q >= 0) & (q <= 15)).double())


@torch_per_tensor_2_9
@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_quantize_float64_per_tensor(backend):
    if backend == "triton":
        pytest.skip("float64 runs on the reference and cpu backends only")
    with use_backend(backend, "fake_quantize"):
        # per-tensor: torch (>= 2.9) computes float64 input in fp32
        x = torch.randn(5, 301, dtype=torch.float64, requires_grad=True)
        y = ak.fake_quantize(x, 0.0123, 3, -128, 127)
        y.backward(torch.ones_like(y))
        xr = x.detach().clone().requires_grad_()
        want = torch.fake_quantize_per_tensor_affine(xr, 0.0123, 3, -128, 127)
        want.backward(torch.ones_like(want))
        assert torch.equal(y, want) and torch.equal(x.grad, xr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pure_vs_clipped_ste(backend):
    with use_backend(backend, "fake_quantize"):
        x = (torch.randn(999) * 4).requires_grad_()
        g = torch.randn(999)
        y_pure = ak.fake_quantize(x, 0.1, 0, -8, 7, ste="pure")
        (dx_pure,) = torch.autograd.grad(y_pure, x, g)
        y_clip = ak.fake_quantize(x, 0.1, 0, -8, 7, ste="clipped")
        (dx_clip,) = torch.autograd.grad(y_clip, x, g)
        assert torch.equal(y_pure, y_clip)
        assert torch.equal(dx_pure, g)
        inside = (torch.round(x.detach() / 0.1) >= -8) & (torch.round(x.detach() / 0.1) <= 7)
        assert torch.equal(dx_clip, g * inside)
        assert not torch.equal(dx_clip, dx_pure)  # the data reaches outside the range


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [None, 1])
def test_nan_propagates_and_inf_clamps(backend, axis):
    with use_backend(backend, "fake_quantize"):
        x = torch.randn(2, 11)
        x[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
        x[1, 4:6] = torch.tensor([float("inf"), float("nan")])
        x.requires_grad_()
        scale = torch.full((11,), 0.25) if axis is not None else torch.tensor(0.25)
        zp = torch.full((11,), 3, dtype=torch.int32) if axis is not None else torch.tensor(3)
        y = ak.fake_quantize(x, scale, zp, -8, 7, axis=axis)
        y.sum().backward()
        assert torch.isnan(y[0, 0]) and torch.isnan(y[1, 5])
        assert y[0, 1] == (7 - 3) * 0.25 and y[1, 4] == (7 - 3) * 0.25
        assert y[0, 2] == (-8 - 3) * 0.25
        assert torch.equal(x.grad[0, :3], torch.zeros(3))
        finite = torch.isfinite(x.detach())
        want, _ = torch_fq(x, scale.reshape(-1), zp.reshape(-1), -8, 7, axis)
        assert torch.equal(y.detach()[finite], want[finite])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors(backend):
    with use_backend(backend, "fake_quantize"):
        for shape, axis in (((0,), None), ((0, 3), 1), ((2, 0, 4), 0)):
            x = torch.randn(shape, requires_grad=True)
            c = 1 if axis is None else shape[axis]
            y = ak.fake_quantize(x, torch.ones(c), torch.zeros(c, dtype=torch.int32), -8, 7,
                                 axis=axis)
            y.sum().backward()
            assert y.shape == x.shape and x.grad.shape == x.shape
            out, s, z = ak.fake_quantize_minmax(x.detach(), -8, 7, axis=axis)
            assert out.shape == x.shape and torch.equal(s, torch.ones(c))
            assert torch.equal(z, torch.zeros(c, dtype=torch.int32))


# --- LSQ ----------------------------------------------------------------------------------

def _torch_lsq(x, scale, zp, qmin, qmax, axis, grad_factor, g):
    xs, ss, zz = (t.detach().clone().requires_grad_() for t in (x, scale, zp))
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xs, ss, zz, qmin, qmax, grad_factor)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xs, ss, zz, axis, qmin, qmax,
                                                              grad_factor)
    y.backward(g)
    return y.detach(), xs.grad, ss.grad, zz.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
def test_learnable_matches_torch(backend, axis):
    with use_backend(backend, "learnable"):
        for layout, x0 in list(layouts((4, 6, 5, 3)))[:2]:
            x0[:2, :4, :5, 0] = ((torch.arange(40) - 20 + 0.5) * 0.25).view(2, 4, 5)  # ties, clips
            c = 1 if axis is None else x0.size(axis)
            scale = torch.rand(c) * 0.3 + 0.1
            zp = torch.randn(c) * 3
            zp[0] = 1.5 if axis is not None else -1.5  # torch's fwd/bwd zp rounding differs
            gf = 0.37
            x = x0.clone().requires_grad_()
            s = scale.clone().requires_grad_()
            z = zp.clone().requires_grad_()
            y = ak.fake_quantize_learnable(x, s, z, -8, 7, axis=axis, grad_factor=gf)
            g = torch.randn_like(y)
            y.backward(g)
            want, dx, ds, dz = _torch_lsq(x0, scale, zp, -8, 7, axis, gf, g)
            assert torch.equal(y, want), layout
            assert torch.equal(x.grad, dx), layout
            torch.testing.assert_close(s.grad, ds, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(z.grad, dz, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_learnable_low_precision_matches_reference(backend, dtype):
    x0 = (torch.randn(7, 301) * 2).to(dtype)
    scale, zp = torch.rand(7) * 0.2 + 0.05, torch.randn(7) * 2
    g = torch.randn(7, 301).to(dtype)
    results = []
    for b in ("reference", backend):
        with use_backend(b, "learnable"):
            x, s, z = (t.clone().requires_grad_() for t in (x0, scale, zp))
            y = ak.fake_quantize_learnable(x, s, z, 0, 15, axis=0)
            y.backward(g)
            results.append((y, x.grad, s.grad, z.grad))
    (y0, dx0, ds0, dz0), (y1, dx1, ds1, dz1) = results
    assert y1.dtype == dtype and torch.equal(y0, y1) and torch.equal(dx0, dx1)
    torch.testing.assert_close(ds1, ds0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dz1, dz0, rtol=1e-4, atol=1e-4)


def _lsq_surrogate(x0, s0, z0, qmin, qmax, axis):
    """A smooth function whose exact gradient at (x0, s0, z0) is LSQ's straight-through
    gradient: the rounding residual of x0 / s0, the in-range mask and the rounded zero point are
    frozen at that point."""
    shape = [1] * x0.dim()
    if axis is not None:
        shape[axis] = -1
    v = x0 / s0.reshape(shape)
    zr = torch.clamp(torch.round(z0), qmin, qmax).reshape(shape)
    q = torch.round(v) + zr
    inside = (q >= qmin) & (q <= qmax)
    clipped = torch.where(q < qmin, torch.full_like(q, qmin), torch.full_like(q, qmax))
    r = torch.round(v) - v
    dz = zr - z0.reshape(shape)

    def f(x, s, z):
        sv, zv = s.reshape(shape), z.reshape(shape)
        return torch.where(inside, x + sv * r, sv * (clipped - (zv + dz)))
    return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [None, 1])
def test_learnable_gradcheck_float64(backend, axis):
    """torch.autograd.gradcheck in float64: the op's analytical gradients against numerical
    ones of the LSQ surrogate (the op itself is piecewise constant), at inputs away from
    rounding boundaries."""
    if backend == "triton":
        pytest.skip("float64 runs on the reference and cpu backends only")
    c = 1 if axis is None else 5
    scale = torch.rand(c, dtype=torch.float64) * 0.2 + 0.2
    if backend != "reference":  # the extension takes fp32 qparams: check the x-gradient only
        scale = scale.float().double()
    zp = torch.randint(0, 3, (c,)).double() + 0.2    # the same integer forward and backward
    k = torch.randint(-12, 12, (4, 5)).double() + torch.rand(4, 5, dtype=torch.float64) * 0.6 + 0.2
    x = k * (scale.view(1, -1) if axis is not None else scale)   # residuals in [0.2, 0.8)

    surrogate = _lsq_surrogate(x, scale, zp, -8, 7, axis)

    def fn(a, s, z):
        # value: the smooth surrogate (numerical Jacobian); gradient: the op's backward
        y = ak.fake_quantize_learnable(a, s, z, -8, 7, axis=axis)
        return surrogate(a, s, z).detach() + (y - y.detach())

    with use_backend(backend, "learnable"):
        if backend == "reference":
            args = tuple(t.clone().requires_grad_() for t in (x, scale, zp))
            assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)
        else:
            s32, z32 = scale.float(), zp.float()
            assert torch.autograd.gradcheck(lambda a: fn(a, s32, z32),
                                            (x.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


# --- fused observers ------------------------------------------------------------------------

def _observer(axis, qmin, qmax, symmetric, cls=None):
    dtype = torch.quint8 if qmin >= 0 else torch.qint8
    if axis is None:
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        return (cls or MinMaxObserver)(dtype=dtype, qscheme=qscheme, quant_min=qmin,
                                       quant_max=qmax)
    qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    return PerChannelMinMaxObserver(ch_axis=axis, dtype=dtype, qscheme=qscheme, quant_min=qmin,
                                    quant_max=qmax)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("qrange", [(-8, 7), (0, 15), (-128, 127), (0, 255)], ids=str)
def test_minmax_matches_torch_observers(backend, symmetric, qrange):
    qmin, qmax = qrange
    cases = [((16, 8, 3, 3), 0, "contiguous"),       # a conv weight: one fused launch
             ((16, 3, 3, 3), 0, "contiguous"),       # rows not byte-aligned
             ((3, 4099), 0, "contiguous"),           # rows longer than a block
             ((2, 6, 5, 7), 1, "channels_last"),     # activations per channel
             ((5, 7, 3), None, "contiguous"), ((4099,), None, "contiguous")]
    with use_backend(backend, "minmax"):
        for shape, axis, layout in cases:
            x = torch.randn(shape) * 2 + 0.3
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            out, scale, zp = ak.fake_quantize_minmax(x, qmin, qmax, axis=axis,
                                                     symmetric=symmetric)
            obs = _observer(axis, qmin, qmax, symmetric)
            obs(x.detach())
            want_s, want_z = obs.calculate_qparams()
            assert torch.equal(scale, want_s), (shape, axis)
            assert torch.equal(zp, want_z.to(torch.int32)), (shape, axis)
            want, mask = torch_fq(x, want_s, want_z, qmin, qmax, axis)
            assert torch.equal(out, want), (shape, axis)
            out.backward(torch.ones_like(out))
            assert torch.equal(x.grad, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_minmax_low_precision_matches_reference(backend, dtype):
    x = torch.randn(16, 8, 3, 3).to(dtype)
    with use_backend(backend, "minmax"):
        got = ak.fake_quantize_minmax(x, -8, 7, axis=0)
    with ak.set_backend("reference"):
        want = ak.fake_quantize_minmax(x, -8, 7, axis=0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric,qrange", [(False, (0, 255)), (True, (-128, 127)),
                                              (True, (0, 255)), (False, (-8, 7))])
def test_moving_average_matches_torch_observer(backend, symmetric, qrange):
    qmin, qmax = qrange
    c = 0.1
    obs = MovingAverageMinMaxObserver(averaging_constant=c, dtype=torch.quint8 if qmin >= 0
                                      else torch.qint8, quant_min=qmin, quant_max=qmax,
                                      qscheme=torch.per_tensor_symmetric if symmetric
                                      else torch.per_tensor_affine)
    min_val, max_val = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    scale, zp = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    with use_backend(backend, "moving_average"):
        for step in range(5):
            x = (torch.randn(3, 4099 if step % 2 else 1000) * (1 + step) + step).requires_grad_()
            observe = step != 3
            y = ak.fake_quantize_moving_average(x, min_val, max_val, scale, zp, qmin, qmax,
                                                averaging_constant=c, symmetric=symmetric,
                                                observe=observe)
            if observe:
                obs(x.detach())
                want_s, want_z = obs.calculate_qparams()
            assert torch.equal(min_val, obs.min_val) and torch.equal(max_val, obs.max_val)
            assert torch.equal(scale, want_s) and torch.equal(zp, want_z.to(torch.int32))
            want, mask = torch_fq(x, want_s, want_z, qmin, qmax, None)
            assert torch.equal(y, want), step
            y.backward(torch.ones_like(y))
            assert torch.equal(x.grad, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_average_low_precision_and_empty(backend):
    x = (torch.randn(2000) * 3).to(torch.bfloat16)
    results = []
    for b in ("reference", backend):
        bufs = [torch.tensor([-1.0]), torch.tensor([2.0]), torch.ones(1),
                torch.zeros(1, dtype=torch.int32)]
        with use_backend(b, "moving_average"):
            y = ak.fake_quantize_moving_average(x, *bufs, 0, 255, averaging_constant=0.3)
            empty = ak.fake_quantize_moving_average(x[:0], *bufs, 0, 255)
        results.append((y, bufs))
        assert empty.shape == (0,)
    (y0, b0), (y1, b1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(b0, b1):
        assert torch.equal(a, b)


# --- byte masks (what traced graphs keep) -------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 8, 31, 32, 33, 257, 32768 * 2 + 13])
def test_unpack_mask_matches_the_bits(n):
    """The extension's unpack (AVX2 and its scalar tail) and the reference's give each element
    its bit, laid out like `like`."""
    mask = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8)
    like = torch.empty(n)
    want = torch.tensor([(int(mask[i // 8]) >> (i % 8)) & 1 for i in range(min(n, 4096))],
                        dtype=torch.bool)
    got = [reference.unpack_mask(mask, like)]
    if ops._ext_has("fq_unpack_mask"):
        got.append(torch.ops.acq_kernels_C.fq_unpack_mask(mask, like))
    for g in got:
        assert g.dtype == torch.bool and g.shape == like.shape
        assert torch.equal(g[:want.numel()], want)
        assert torch.equal(g, got[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_byte_mask_is_the_bit_mask_laid_out_like_the_output(backend):
    with use_backend(backend, "fake_quantize"), use_backend(backend, "minmax"):
        for name, x in layouts((3, 6, 5, 7)):
            x = x.detach()
            s, z = qparams(x, 1, -8, 7)
            out, bits = ops.fake_quant(x, s, z, -8, 7, 1, True)
            out_b, mask = ops.fake_quant(x, s, z, -8, 7, 1, True, True)
            assert torch.equal(out, out_b), name
            assert mask.dtype == torch.bool and mask.stride() == out.stride(), name
            assert torch.equal(mask, reference.unpack_mask(bits, out)), name
            assert 0 < mask.sum() < mask.numel(), name  # clipped and unclipped elements
            out_m, bits_m, _, _ = ops.fake_quant_minmax(x, 1, -8, 7, False, 1e-7, True)
            mask_m = ops.fake_quant_minmax(x, 1, -8, 7, False, 1e-7, True, True)[1]
            assert mask_m.stride() == out_m.stride(), name
            assert torch.equal(mask_m, reference.unpack_mask(bits_m, out_m)), name
    if ops._ext_has("fq_unpack_mask"):  # its own check of what only the op body guarantees
        with pytest.raises(RuntimeError, match="like must be non-overlapping and dense"):
            torch.ops.acq_kernels_C.fq_unpack_mask(torch.zeros(3, dtype=torch.uint8),
                                                   torch.empty(4, 10)[:, ::2])


# --- torch.library registration -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schemas, fake (meta) impls, autograd registration and AOT dispatch of every op."""
    x = torch.randn(4, 6, 5, requires_grad=True)
    s, z = torch.full((6,), 0.1), torch.zeros(6, dtype=torch.int32)
    sl, zl = torch.full((6,), 0.1, requires_grad=True), torch.zeros(6, requires_grad=True)
    g = torch.randn(4, 6, 5)
    bufs = [torch.tensor(float("inf")), torch.tensor(float("-inf")), torch.ones(1),
            torch.zeros(1, dtype=torch.int32)]
    with use_backend(backend, "minmax"), use_backend(backend, "learnable"), \
            use_backend(backend, "moving_average"):
        mask = ops.fake_quant(x, s, z, -8, 7, 1, True)[1]
        cases = [(ops.fake_quant, (x, s, z, -8, 7, 1, True)),
                 (ops.fake_quant, (x, s, z, -8, 7, 1, True, True)),  # byte mask
                 (ops.fake_quant, (x.transpose(0, 2), s, z, -8, 7, 1, True, True)),
                 (ops.fake_quant_mask_backward, (g, mask)),
                 (ops.fake_quant_learnable, (x, sl, zl, -8, 7, 1, 1.0)),
                 (ops.fake_quant_learnable_backward, (g, x.detach(), s, zl.detach(), -8, 7, 1,
                                                      0.5)),
                 (ops.fake_quant_minmax, (x, 1, -8, 7, False, 1e-7, True)),
                 (ops.fake_quant_minmax, (x, 1, -8, 7, False, 1e-7, True, True)),
                 (ops.fake_quant_moving_average, (x.detach(), *bufs, 0.1, 0, 255, False, 1e-7,
                                                  True, True))]
        for op, args in cases:
            result = torch.library.opcheck(op, args)
            assert all(v == "SUCCESS" for v in result.values()), (op, result)


# --- torch.compile --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    """All four ops trace without graph breaks (aot_eager: inductor is too slow here) and
    match eager, gradients and buffer updates included."""
    torch._dynamo.reset()
    with use_backend(backend, "fake_quantize"):
        def step(x, s, z, bufs):
            a = ak.fake_quantize(x, 0.05, 3, -8, 7)
            b = ak.fake_quantize_learnable(x, s, z, -8, 7, axis=1)
            c, cs, cz = ak.fake_quantize_minmax(x, -8, 7, axis=1)
            d = ak.fake_quantize_moving_average(x, *bufs, 0, 255, averaging_constant=0.5)
            return (a * 1 + b * 2 + c * 3 + d * 4).sum(), cs, cz

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        x0 = torch.randn(4, 6, 5)
        res = []
        for fn in (step, compiled):
            x = x0.clone().requires_grad_()
            s = torch.full((6,), 0.1, requires_grad=True)
            z = torch.zeros(6, requires_grad=True)
            bufs = [torch.tensor(float("inf")), torch.tensor(float("-inf")), torch.ones(1),
                    torch.zeros(1, dtype=torch.int32)]
            for _ in range(2):
                loss, cs, cz = fn(x, s, z, bufs)
                loss.backward()
            res.append([loss, cs, cz, x.grad, s.grad, z.grad] + bufs)
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --- GPU (auto-skipped without CUDA) --------------------------------------------------------

def cuda_qparams(min_val, max_val, quant_min, quant_max, symmetric, eps):
    """torch.ao's _calculate_qparams as torch computes it on CUDA, evaluated on CPU: there
    `tensor / python_float` is a multiply by the fp32 reciprocal (ATen's div_true_kernel_cuda
    with a CPU scalar: x * (1.0f / d)), where the CPU divides. Tensor / tensor divides on both."""
    f32 = torch.float32
    min_val, max_val = min_val.to(f32), max_val.to(f32)
    eps_t = torch.tensor(eps, dtype=f32, device=min_val.device)
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))

    def times_reciprocal(t, d):
        return t * (torch.tensor(1.0, dtype=f32) / torch.tensor(d, dtype=f32)).to(t.device)

    if symmetric:
        max_pos = torch.maximum(-min_neg, max_pos)
        scale = torch.maximum(times_reciprocal(max_pos, float(quant_max - quant_min) / 2), eps_t)
        zp_val = (quant_min + quant_max) // 2 if quant_min >= 0 else 0
        return scale, torch.full_like(min_val, zp_val, dtype=torch.int32)
    scale = torch.maximum(times_reciprocal(max_pos - min_neg, float(quant_max - quant_min)), eps_t)
    zero_point = quant_min - torch.round(min_neg / scale).to(torch.int32)
    return scale, torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)


def _random_ranges(n=4000):
    mn = -torch.rand(n) * torch.exp(torch.randn(n) * 3)
    mx = torch.rand(n) * torch.exp(torch.randn(n) * 3)
    return mn, mx


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("qrange", [(-8, 7), (0, 15), (-128, 127), (0, 255)], ids=str)
def test_cuda_qparams_oracle_is_a_multiply_by_the_fp32_reciprocal(symmetric, qrange):
    """The CUDA oracle's scale is x * fp32(1/d), rounded once (checked in float64, where the
    product of two fp32 values is exact), and it differs from the CPU's true division on many
    random ranges: a CPU-computed oracle would fail bitwise CUDA comparisons."""
    qmin, qmax = qrange
    mn, mx = _random_ranges()
    eps = torch.finfo(torch.float32).eps
    scale, zp = cuda_qparams(mn, mx, qmin, qmax, symmetric, eps)
    d = float(qmax - qmin) / 2 if symmetric else float(qmax - qmin)
    span = torch.maximum(-mn, mx) if symmetric else mx - mn
    inv32 = torch.tensor(1.0 / d, dtype=torch.float64).float()  # == fp32 1.0f / d for these d
    assert inv32 == torch.tensor(1.0, dtype=torch.float32) / torch.tensor(d, dtype=torch.float32)
    want = torch.maximum((span.double() * inv32.double()).float(), torch.tensor(eps))
    assert torch.equal(scale, want)
    cpu_scale, cpu_zp = reference.calculate_qparams(mn, mx, qmin, qmax, symmetric, eps)
    differ = (scale != cpu_scale).float().mean().item()
    assert differ > 0.1, differ  # ~60-70% for most ranges: the oracle must be the CUDA one
    if not symmetric:
        assert torch.equal(zp, torch.clamp(qmin - torch.round(mn / scale).to(torch.int32), qmin, qmax))


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_qparams_oracle_matches_torch_ao_on_cuda(symmetric):
    mn, mx = _random_ranges()
    obs = _observer(0, -8, 7, symmetric)
    want_s, want_z = obs._calculate_qparams(mn.cuda(), mx.cuda())
    scale, zp = cuda_qparams(mn, mx, -8, 7, symmetric, float(obs.eps))
    assert torch.equal(scale, want_s.cpu()) and torch.equal(zp, want_z.cpu().to(torch.int32))


def _cpu_reference(fn, *tensors):
    """The reference backend on CPU copies of `tensors`, with the qparams torch computes on
    CUDA (cuda_qparams): the oracle for CUDA results."""
    from unittest import mock
    with ak.set_backend("reference"), mock.patch.object(reference, "calculate_qparams", cuda_qparams):
        return fn(*[t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in tensors])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_backends_match_reference(backend, dtype):
    dev = torch.device("cuda")
    if not _backend.backend_usable(backend, dev):
        pytest.skip(f"backend {backend} is not usable on CUDA here")
    with use_backend(backend, "fake_quantize"):
        x = (torch.randn(8, 32, 17, 9, device=dev) * 3).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        for axis in (None, 1, 0):
            c = 1 if axis is None else x.size(axis)
            scale = torch.rand(c, device=dev) * 0.2 + 0.05
            zp = torch.randint(-8, 8, (c,), device=dev, dtype=torch.int32)
            y = ak.fake_quantize(x, scale, zp, -8, 7, axis=axis)
            g = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, x, g)
            xr = x.detach().cpu().requires_grad_()
            with ak.set_backend("reference"):
                yr = ak.fake_quantize(xr, scale.cpu(), zp.cpu(), -8, 7, axis=axis)
                (dxr,) = torch.autograd.grad(yr, xr, g.cpu())
            assert torch.equal(y.cpu(), yr) and torch.equal(dx.cpu(), dxr)
            assert y.stride() == x.stride()
        out, s, z = ak.fake_quantize_minmax(x.detach(), -8, 7, axis=1)
        want = _cpu_reference(lambda t: ak.fake_quantize_minmax(t, -8, 7, axis=1), x)
        for a, b in zip((out, s, z), want):
            assert torch.equal(a.cpu(), b)
        w = torch.randn(64, 32, 3, 3, device=dev).to(dtype)
        got = ak.fake_quantize_minmax(w, -8, 7, axis=0, symmetric=True)
        want = _cpu_reference(lambda t: ak.fake_quantize_minmax(t, -8, 7, axis=0, symmetric=True),
                              w)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b)
        bufs = [torch.tensor(float("inf"), device=dev), torch.tensor(float("-inf"), device=dev),
                torch.ones(1, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)]
        ref_bufs = [b.cpu().clone() for b in bufs]
        for step in range(3):
            xs = (torch.randn(1 << 20, device=dev) * (step + 1)).to(dtype)
            y = ak.fake_quantize_moving_average(xs, *bufs, 0, 255, averaging_constant=0.1)
            yr = _cpu_reference(lambda t: ak.fake_quantize_moving_average(
                t, *ref_bufs, 0, 255, averaging_constant=0.1), xs)
            assert torch.equal(y.cpu(), yr)
            for a, b in zip(bufs, ref_bufs):
                assert torch.equal(a.cpu(), b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_learnable_matches_torch(backend):
    dev = torch.device("cuda")
    if not _backend.backend_usable(backend, dev):
        pytest.skip(f"backend {backend} is not usable on CUDA here")
    with use_backend(backend, "learnable"):
        for axis in (None, 1):
            x0 = torch.randn(16, 24, 33, device=dev) * 2
            c = 1 if axis is None else 24
            scale, zp = torch.rand(c, device=dev) * 0.2 + 0.05, torch.randn(c, device=dev) * 2
            g = torch.randn_like(x0)
            x, s, z = (t.clone().requires_grad_() for t in (x0, scale, zp))
            y = ak.fake_quantize_learnable(x, s, z, -8, 7, axis=axis, grad_factor=0.5)
            y.backward(g)
            want, dx, ds, dz = _torch_lsq(x0, scale, zp, -8, 7, axis, 0.5, g)
            assert torch.equal(y, want) and torch.equal(x.grad, dx)
            torch.testing.assert_close(s.grad, ds, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(z.grad, dz, rtol=1e-4, atol=1e-3)


# --- Triton: multi-block paths at interpreter-friendly sizes -------------------------------

@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not usable on CPU here")
def test_triton_looped_paths_match_reference(monkeypatch):
    """Tiny blocks and program caps force every loop, partial-sum and multi-program path
    (grid-stride reductions, looped per-channel rows, several finishing programs)."""
    from acq_kernels.fake_quant import triton_kernels as K
    for name, value in (("BLOCK", 64), ("RED_BLOCK", 64), ("MAX_PARTIALS", 4),
                        ("ROW_BLOCK_MAX", 64)):
        monkeypatch.setattr(K, name, value)
    # The Triton LSQ backward rounds zp + x * inv and (q - zp) * scale - x twice; the reference
    # follows torch's CPU kernels, FMAs on AVX2/AVX512 (docs/fake_quant.md): compare like forms.
    from acq_kernels.fake_quant import reference
    monkeypatch.setattr(reference, "lsq_uses_fma", lambda device: False)
    x = torch.randn(3, 136) * 2
    g = torch.randn_like(x)
    w = torch.randn(3, 200) * 2             # fused looped rows (200 % 8 == 0)
    w_odd = torch.randn(3, 203) * 2         # looped rows + a separate fake-quant launch
    act = torch.randn(2, 3, 4, 8)           # NCHW: per-channel rows with an outer dim
    qp = {axis: (torch.rand(c) + 0.1, torch.randn(c) * 2)
          for axis, c in ((None, 1), (0, x.size(0)), (1, x.size(1)))}
    results = {}
    for b in ("reference", "triton"):
        gen = torch.Generator().manual_seed(0)  # the same qparams for both backends
        with ak.set_backend(b):
            r = []
            for axis in (None, 0, 1):
                s, z = qp[axis]
                xs, ss, zs = (t.clone().requires_grad_() for t in (x, s, z))
                y = ak.fake_quantize_learnable(xs, ss, zs, -8, 7, axis=axis)
                y.backward(g)
                r += [y, xs.grad, ss.grad, zs.grad]
                r += list(ak.fake_quantize_minmax(x, 0, 15, axis=axis))
            for t in (w, w_odd, w.view(3, 25, 8).transpose(1, 2), act):
                xs = t.clone().requires_grad_()
                out, s, z = ak.fake_quantize_minmax(xs, -8, 7, axis=0)
                out.backward(torch.ones_like(out))
                r += [out, s, z, xs.grad]
                # per-channel rows of a fixed-qparam fake quant, axis 0 and a middle axis
                for axis in (0, 1):
                    c = t.size(axis)
                    y = ak.fake_quantize(xs, torch.rand(c, generator=gen) + 0.05,
                                         torch.randint(-8, 8, (c,), generator=gen), -8, 7,
                                         axis=axis)
                    r += [y, torch.autograd.grad(y, xs, torch.ones_like(y))[0]]
            bufs = [torch.tensor(float("inf")), torch.tensor(float("-inf")), torch.ones(1),
                    torch.zeros(1, dtype=torch.int32)]
            for step in range(2):
                r.append(ak.fake_quantize_moving_average(x * (step + 1), *bufs, 0, 255))
            r += bufs
        results[b] = r
    for a, b in zip(results["reference"], results["triton"]):
        if a.dtype == torch.float32 and a.dim() == 1 and a.numel() <= 5:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)   # LSQ qparam grads
        else:
            assert torch.equal(a, b)
