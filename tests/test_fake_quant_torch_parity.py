"""Bitwise parity with torch's native fake-quant ops where the two semantics are easy to mix up:
float64 input (torch multiplies by an fp32 1/scale in float64; per-tensor it rounds the output
through fp32) and the learnable (LSQ) ops at exact ties (torch's forwards add the rounded zero
point after rounding, its backwards before)."""
import pytest
import torch

import acq_kernels as ak
from acq_kernels import _backend
from acq_kernels.fake_quant import ops
from conftest import torch_per_tensor_2_9

BACKENDS = _backend.usable_backends(torch.device("cpu"))
F64_BACKENDS = [b for b in BACKENDS if b in ("reference", "cpu")]  # Triton takes no float64


def use_backend(backend, *ext_ops):
    if backend in ("cpu", "cuda"):
        for name in ext_ops:
            if not ops._ext_has(name):
                pytest.skip(f"the C++ extension does not provide acq_kernels_C::{name} yet")
    return ak.set_backend(backend)


def ties(k_lo, k_hi, scale, dtype):
    """Exact ties (k + 0.5) * scale (scale a power of two) and their neighbours on both sides
    (in dtype: the float64 neighbours are the values an fp32 computation would round onto the
    tie)."""
    v = torch.arange(k_lo, k_hi, dtype=dtype) + 0.5
    inf = torch.full_like(v, float("inf"))
    return torch.cat([v, torch.nextafter(v, inf), torch.nextafter(v, -inf)]) * scale


def torch_fq_f64(x, scale, zp, qmin, qmax, axis):
    xr = x.detach().clone().requires_grad_()
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(xr, float(scale), int(zp), qmin, qmax)
    else:
        y = torch.fake_quantize_per_channel_affine(xr, scale, zp, axis, qmin, qmax)
    y.backward(torch.ones_like(y))
    return y.detach(), xr.grad


@torch_per_tensor_2_9
@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("qrange", [(0, 255), (-128, 127), (-8, 7)], ids=str)
def test_float64_per_tensor_matches_torch_bitwise(backend, qrange):
    qmin, qmax = qrange
    with use_backend(backend, "fq_forward", "fq_mask_backward"):
        for scale in (0.0371, 2.0 ** -4, float(torch.rand(()) * 0.1 + 1e-3)):
            scale = float(torch.tensor(scale, dtype=torch.float32))  # what torch uses
            zp = int(torch.randint(qmin, qmax + 1, ()))
            span = (qmax - qmin) * scale
            rand = (torch.rand(1_000_000, dtype=torch.float64) * 1.2 - 0.1) * span \
                - (zp - qmin) * scale
            x = torch.cat([rand, ties(qmin - zp - 3, qmax - zp + 3, scale, torch.float64)])
            x = x[torch.randperm(x.numel())].requires_grad_()
            y = ak.fake_quantize(x, scale, zp, qmin, qmax)
            y.backward(torch.ones_like(y))
            want, want_grad = torch_fq_f64(x, scale, zp, qmin, qmax, None)
            assert y.dtype == torch.float64
            assert torch.equal(y, want), (scale, zp, (y != want).sum().item())
            assert torch.equal(x.grad, want_grad)


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("axis", [0, 1, 3])
def test_float64_per_channel_matches_torch_bitwise(backend, axis):
    qmin, qmax = 0, 15
    with use_backend(backend, "fq_forward", "fq_mask_backward"):
        x = torch.randn(16, 8, 25, 320, dtype=torch.float64) * 0.5  # 1,024,000 values
        if axis == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        c = x.size(axis)
        scale = 2.0 ** torch.randint(-6, -1, (c,)).float()
        scale[::2] = torch.rand(c)[::2] * 0.1 + 1e-3
        zp = torch.randint(qmin, qmax + 1, (c,), dtype=torch.int32)
        # put exact ties (and their float64 neighbours) into the power-of-two channels
        t = ties(-20, 20, 1.0, torch.float64)  # 120 values
        shape = [1] * 4
        shape[axis] = -1
        idx = [slice(None)] * 4
        idx[axis] = slice(1, None, 2)
        idx[3 if axis != 3 else 2] = slice(0, 1)
        sel = x[tuple(idx)]
        reps = sel.numel() // t.numel() + 1
        sel.copy_(t.repeat(reps)[:sel.numel()].reshape(sel.shape)
                  * scale.double().reshape(shape)[tuple(idx)])
        x.requires_grad_()
        y = ak.fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
        y.backward(torch.ones_like(y))
        want, want_grad = torch_fq_f64(x, scale, zp, qmin, qmax, axis)
        assert y.dtype == torch.float64 and y.stride() == x.stride()
        assert torch.equal(y, want), (y != want).sum().item()
        assert torch.equal(x.grad, want_grad)


# --- learnable (LSQ) at exact ties ---------------------------------------------------------

def lsq_tie_input(axis, qmin, qmax, zp_values):
    """[3, M] ties (M = 3 * 2 * (qmax - qmin + 2), each row a permutation) and their fp32
    neighbours at power-of-two scales, with zero points drawn from zp_values (odd integers and
    halves: where the order of rounding and adding the zero point matters, and where torch's
    forward and backward round a float zero point differently)."""
    span = qmax - qmin + 2
    v = ties(-span, span, 1.0, torch.float32)
    x = torch.stack([v[torch.randperm(v.numel())] for _ in range(3)])
    c = {None: 1, 0: x.size(0), 1: x.size(1)}[axis]
    scale = 2.0 ** torch.randint(-5, 2, (c,)).float()
    zp = torch.tensor(zp_values, dtype=torch.float32)[torch.randint(len(zp_values), (c,))]
    return x * (scale[:, None] if axis == 0 else scale), scale, zp


def backward_masks_differ(x, scale, zp, qmin, qmax, axis):
    """Whether adding torch's backward zero point after rounding instead of before would change
    the x-gradient of any element (so the test below can tell the two apart)."""
    if axis is None:
        zb = torch.trunc(torch.clamp(zp + 0.5, qmin, qmax))
    else:
        zb = torch.clamp(torch.round(zp), qmin, qmax)
    shape = [-1, 1] if axis == 0 else [-1]
    v = x * (1.0 / scale).reshape(shape)
    zb = zb.reshape(shape)
    after, before = torch.round(v) + zb, torch.round(v + zb)
    return (((after >= qmin) & (after <= qmax)) != ((before >= qmin) & (before <= qmax))).any()


def torch_lsq(x, scale, zp, qmin, qmax, axis, gf, g):
    xs, ss, zz = (t.detach().clone().requires_grad_() for t in (x, scale, zp))
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xs, ss, zz, qmin, qmax, gf)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xs, ss, zz, axis, qmin, qmax, gf)
    y.backward(g)
    return y.detach(), xs.grad, ss.grad, zz.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_learnable_matches_torch_on_exact_ties(backend, axis):
    with use_backend(backend, "fq_forward", "fq_learnable_backward"):
        for qmin, qmax, zps in ((-8, 7, (3.0, -5.0, 1.0, 2.5, -2.5, 0.5)),
                                (0, 15, (3.0, 7.0, 9.0, 4.5, 7.5, 12.5))):
            x0, scale, zp = lsq_tie_input(axis, qmin, qmax, zps)
            x, s, z = (t.clone().requires_grad_() for t in (x0, scale, zp))
            y = ak.fake_quantize_learnable(x, s, z, qmin, qmax, axis=axis, grad_factor=0.5)
            g = torch.randn_like(y)
            y.backward(g)
            want, dx, ds, dz = torch_lsq(x0, scale, zp, qmin, qmax, axis, 0.5, g)
            assert torch.equal(y, want), (y != want).sum().item()
            assert torch.equal(x.grad, dx), (x.grad != dx).sum().item()
            torch.testing.assert_close(s.grad, ds, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(z.grad, dz, rtol=1e-4, atol=1e-4)
            assert backward_masks_differ(x0, scale, zp, qmin, qmax, axis)


# --- observer qparams at a -inf minimum ------------------------------------------------------

@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("qrange", [(0, 255), (-128, 127)], ids=str)
def test_minmax_negative_infinity_matches_torch_observers(backend, qrange):
    """min_val = -inf gives scale = inf and round(min / scale) = NaN, which torch's CPU cast
    turns into INT32_MIN before an int32 (wrapping) subtraction: zero point quant_min on an
    unsigned range, quant_max on a signed one."""
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    qmin, qmax = qrange
    dtype = torch.quint8 if qmin == 0 else torch.qint8
    x = torch.randn(4, 67)
    x[0, 5] = -float("inf")
    with use_backend(backend, "fq_minmax_forward"):
        for axis in (None, 0):
            if axis is None:
                obs = MinMaxObserver(dtype=dtype, quant_min=qmin, quant_max=qmax)
            else:
                obs = PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, quant_min=qmin,
                                               quant_max=qmax)
            obs(x)
            want_s, want_z = obs.calculate_qparams()
            _, s, z = ak.fake_quantize_minmax(x, qmin, qmax, axis=axis)
            assert torch.equal(s, want_s.reshape(s.shape))
            assert torch.equal(z, want_z.to(torch.int32).reshape(z.shape))
            assert z[0] == (qmin if qmin >= 0 else qmax)


def test_triton_size_limit_keeps_every_lane_offset_in_int32():
    """The last block's masked-off lanes address up to one block past the end; a tensor just
    under 2**31 elements would wrap them to negative offsets that pass `offs < N`."""
    pytest.importorskip("triton")
    from acq_kernels.fake_quant import triton_kernels as K, triton_launch as L
    block = max(K.BLOCK, K.RED_BLOCK, K.ROW_BLOCK_MAX)
    assert L.MAX_NUMEL + block <= 2 ** 31 - 1
    L._check_size(L.MAX_NUMEL)
    for n in (L.MAX_NUMEL + 1, 2 ** 31 - 100, 2 ** 31):
        with pytest.raises(ValueError, match="triton backend"):
            L._check_size(n)
