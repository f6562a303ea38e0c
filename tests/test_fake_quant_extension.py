"""The fake-quant operators of the C++ extension (CPU kernels), called directly through
torch.ops.acq_kernels_C and compared with PyTorch's own fake-quant ops and observers."""
import itertools

import pytest
import torch
from torch.ao.quantization import observer as tq_obs

from acq_kernels import _extension
from conftest import torch_per_tensor_2_9

if _extension.load() is None:
    pytest.skip("acq_kernels._C (the compiled extension) is not available", allow_module_level=True)

ops = _extension.ops()
if not hasattr(ops, "fq_forward"):
    pytest.skip("the extension was built without the fake-quant operators", allow_module_level=True)

RANGES = [(-2, 1), (0, 3), (-4, 3), (0, 7), (-8, 7), (0, 15), (-16, 15), (0, 31), (-32, 31),
          (0, 63), (-64, 63), (0, 127), (-128, 127), (0, 255), (-32768, 32767), (0, 65535)]


# ----------------------------------------------------------------------------- helpers

def memory_order(t, like):
    """t's values in the memory order of `like` (a dense tensor with the same shape)."""
    perm = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    return t.permute(perm).reshape(-1)


def unpack(mask, n):
    """Bit-packed mask -> bool vector of n; also checks the unused trailing bits are 0."""
    assert mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == (n + 7) // 8
    bits = ((mask.to(torch.int32)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    assert not bits[n:].any(), "unused trailing mask bits must be 0"
    return bits[:n].bool()


def layouts(shape):
    """Dense layouts of a tensor with `shape`: contiguous, channels_last (4-D), permuted."""
    out = [("contiguous", torch.randn(shape))]
    if len(shape) == 4:
        out.append(("channels_last", torch.randn(shape).to(memory_format=torch.channels_last)))
        # A different permutation: stored as (W, N, H, C) in memory.
        base = torch.randn(shape[3], shape[0], shape[2], shape[1])
        out.append(("permuted", base.permute(1, 3, 2, 0)))
    return out


def random_qparams(channels, qmin, qmax, float_zp=False):
    scale = torch.rand(channels) * 0.2 + 0.01
    if float_zp:
        zp = torch.rand(channels) * (qmax - qmin) + qmin
    else:
        zp = torch.randint(qmin, qmax + 1, (channels,), dtype=torch.int32)
    return scale, zp


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"max abs diff {(a.double() - b.double()).abs().max()}"


def torch_fq(x, scale, zp, axis, qmin, qmax):
    """PyTorch's fake quant and its bool mask (fp32 compute for 16-bit inputs)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if axis < 0:
        out, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(
            xf, float(scale[0]), int(round(float(zp[0]))), qmin, qmax)
    elif zp.dtype == torch.float32:
        out = torch.fake_quantize_per_channel_affine(xf, scale, zp, axis, qmin, qmax)
        mask = None
    else:
        out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            xf, scale, zp, axis, qmin, qmax)
    return out.to(x.dtype), mask


def check_forward(x, scale, zp, axis, qmin, qmax):
    out, mask = ops.fq_forward(x, scale, zp, qmin, qmax, axis, True)
    ref, ref_mask = torch_fq(x, scale, zp, axis, qmin, qmax)
    assert out.stride() == x.stride()
    assert_same(out, ref)
    bits = unpack(mask, x.numel())
    if ref_mask is not None:
        assert torch.equal(bits, memory_order(ref_mask, x))
    out2, mask2 = ops.fq_forward(x, scale, zp, qmin, qmax, axis, False)
    assert_same(out2, out)
    assert mask2.numel() == 0 and mask2.dtype == torch.uint8
    return out, bits


# ----------------------------------------------------------------------------- fq_forward

@pytest.mark.parametrize("n", [0, 1, 7, 63, 64, 65, 4099, 100003])
def test_forward_per_tensor_sizes(n):
    x = torch.randn(n) * 4
    for qmin, qmax in [(-128, 127), (0, 255), (-8, 7)]:
        scale, zp = random_qparams(1, qmin, qmax)
        out, bits = check_forward(x, scale, zp, -1, qmin, qmax)
        assert out.shape == x.shape
        if n > 1000:  # the data really exercises both sides of the clamp
            assert bits.any() and not bits.all()


@pytest.mark.parametrize("qrange", RANGES)
def test_forward_quant_ranges(qrange):
    qmin, qmax = qrange
    x = torch.randn(2, 3, 5, 7) * (qmax - qmin) * 0.06
    scale, zp = random_qparams(1, qmin, qmax)
    check_forward(x, scale, zp, -1, qmin, qmax)
    scale, zp = random_qparams(3, qmin, qmax)
    check_forward(x, scale, zp, 1, qmin, qmax)


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
@pytest.mark.parametrize("float_zp", [False, True])
def test_forward_per_channel_every_axis_and_layout(axis, float_zp):
    shape = (3, 6, 5, 7)
    for name, x in layouts(shape):
        x = x * 3
        for qmin, qmax in [(-128, 127), (0, 15)]:
            scale, zp = random_qparams(shape[axis], qmin, qmax, float_zp)
            check_forward(x, scale, zp, axis, qmin, qmax)


def test_forward_per_tensor_layouts_and_float_zero_point():
    for name, x in layouts((2, 8, 9, 11)):
        scale, zp = random_qparams(1, -8, 7)
        check_forward(x, scale, zp, -1, -8, 7)
        # A float zero point per tensor is rounded (half to even) and clamped, as torch does.
        zf = torch.tensor([2.5])
        out, _ = ops.fq_forward(x, scale, zf, -8, 7, -1, False)
        ref, _ = torch_fq(x, scale, torch.tensor([2], dtype=torch.int32), -1, -8, 7)
        assert_same(out, ref)


def test_forward_exact_ties_round_half_to_even():
    k = torch.arange(-300, 300, dtype=torch.float32)
    for scale_val, zp_val in [(0.5, 3), (0.25, -5), (2.0 ** -6, 7), (1.0, 1)]:
        x = (k + 0.5) * scale_val  # exactly representable ties of x / scale
        scale = torch.tensor([scale_val])
        zp = torch.tensor([zp_val], dtype=torch.int32)
        out, _ = check_forward(x, scale, zp, -1, -128, 127)
        # Ties go to even *before* the zero point is added (torch's int zero point).
        expect_q = torch.round(k + 0.5).clamp(-128 - zp_val, 127 - zp_val)
        assert torch.equal(out, expect_q * scale_val)
        x2 = x.reshape(4, -1)
        check_forward(x2, scale.repeat(4), zp.repeat(4), 0, -128, 127)
        check_forward(x2, scale.repeat(4), zp.repeat(4).float() + 0.5, 0, -128, 127)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [-1, 1])
def test_forward_half_precision(dtype, axis):
    for name, x in layouts((2, 4, 9, 13)):
        x = (x * 3).to(dtype)
        qmin, qmax = (0, 255) if axis < 0 else (-128, 127)
        scale, zp = random_qparams(1 if axis < 0 else 4, qmin, qmax)
        out, bits = check_forward(x, scale, zp, axis, qmin, qmax)
        assert out.dtype == dtype


@pytest.mark.parametrize("axis", [pytest.param(-1, marks=torch_per_tensor_2_9), 2])
def test_forward_float64(axis):
    x = torch.randn(3, 4, 33, dtype=torch.float64) * 2
    scale, zp = random_qparams(1 if axis < 0 else 33, -128, 127)
    out, _ = check_forward(x, scale, zp, axis, -128, 127)
    assert out.dtype == torch.float64


def test_forward_nan_and_inf():
    x = torch.randn(200)
    x[[3, 50, 77]] = float("nan")
    x[[4, 90]] = float("inf")
    x[[5, 130]] = float("-inf")
    scale = torch.tensor([0.1])
    zp = torch.tensor([2], dtype=torch.int32)
    for axis, s, z in [(-1, scale, zp), (0, scale.repeat(200), zp.repeat(200))]:
        out, mask = ops.fq_forward(x, s, z, -8, 7, axis, True)
        bits = unpack(mask, 200)
        assert torch.isnan(out[[3, 50, 77]]).all()  # documented: NaN propagates
        assert torch.equal(out[[4, 90]], torch.full((2,), (7 - 2) * 0.1))
        assert torch.equal(out[[5, 130]], torch.full((2,), (-8 - 2) * 0.1))
        assert not bits[[3, 4, 5, 50, 77, 90, 130]].any()
        finite = torch.isfinite(x)
        ref, ref_mask = torch_fq(x[finite], scale, zp, -1, -8, 7)
        assert torch.equal(out[finite], ref) and torch.equal(bits[finite], ref_mask)


@torch_per_tensor_2_9
def test_forward_inf_per_tensor_matches_torch():
    x = torch.tensor([float("inf"), float("-inf")])
    scale = torch.tensor([0.1])
    zp = torch.tensor([2], dtype=torch.int32)
    out, _ = ops.fq_forward(x, scale, zp, -8, 7, -1, False)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, 0.1, 2, -8, 7))


def test_forward_rejects_bad_input():
    x = torch.randn(10)
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.fq_forward(x.int(), s, z, -8, 7, -1, True)
    with pytest.raises(RuntimeError, match="non-overlapping and dense"):
        ops.fq_forward(torch.randn(10, 2)[:, 0], s, z, -8, 7, -1, True)
    with pytest.raises(RuntimeError, match="scale must have"):
        ops.fq_forward(x, s.repeat(2), z, -8, 7, -1, True)
    with pytest.raises(RuntimeError, match="zero_point must be"):
        ops.fq_forward(x, s, z.long(), -8, 7, -1, True)
    with pytest.raises(RuntimeError, match="quant_min"):
        ops.fq_forward(x, s, z, 7, -8, -1, True)
    with pytest.raises(RuntimeError, match="axis"):
        ops.fq_forward(x, s, z, -8, 7, 1, True)


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_mask_backward(dtype):
    for n in [1, 7, 64, 65, 4099, 70001]:
        x = (torch.randn(n) * 3).to(dtype)
        scale, zp = random_qparams(1, -8, 7)
        _, mask = ops.fq_forward(x, scale, zp, -8, 7, -1, True)
        grad = torch.randn(n).to(dtype)
        grad[0] = float("nan")
        _, ref_mask = torch_fq(x, scale, zp, -1, -8, 7)
        got = ops.fq_mask_backward(grad, mask)
        assert torch.equal(torch.isnan(got), torch.isnan(grad * ref_mask))
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(grad * ref_mask))
    for name, x in layouts((2, 4, 9, 13)):
        out, mask = ops.fq_forward(x, scale, zp, -8, 7, -1, True)
        grad = torch.randn_like(out)  # randn_like keeps out's (dense) strides
        assert grad.stride() == out.stride()
        _, ref_mask = torch_fq(x, scale, zp, -1, -8, 7)
        got = ops.fq_mask_backward(grad, mask)
        assert got.stride() == grad.stride()
        assert_same(got, grad * ref_mask)


def torch_learnable_grads(x, scale, zp, axis, qmin, qmax, grad_factor, grad):
    x = x.detach().clone().requires_grad_(True)
    scale = scale.detach().clone().requires_grad_(True)
    zp = zp.detach().clone().requires_grad_(True)
    if axis < 0:
        out = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, qmin, qmax,
                                                               grad_factor)
    else:
        out = torch._fake_quantize_learnable_per_channel_affine(x, scale, zp, axis, qmin, qmax,
                                                                grad_factor)
    out.backward(grad)
    return x.grad, scale.grad, zp.grad


def check_learnable(x, scale, zp, axis, qmin, qmax, grad_factor):
    grad = torch.randn_like(x)
    dx, ds, dz = ops.fq_learnable_backward(grad, x, scale, zp, qmin, qmax, axis, grad_factor)
    rdx, rds, rdz = torch_learnable_grads(x, scale, zp, axis, qmin, qmax, grad_factor, grad)
    assert dx.stride() == x.stride()
    assert_same(dx, rdx)
    assert ds.shape == scale.shape and dz.shape == zp.shape
    # Sums: fp32 reduction-order tolerance, relative to the sum of magnitudes.
    n_per = x.numel() // scale.numel()
    tol = 1e-6 * n_per + 1e-5
    mag = (rds.abs() + 1).max()
    torch.testing.assert_close(ds, rds, rtol=tol, atol=tol * float(mag))
    mag = (rdz.abs() + 1).max()
    torch.testing.assert_close(dz, rdz, rtol=tol, atol=tol * float(mag))
    return dx, ds, dz


@pytest.mark.parametrize("n", [1, 65, 4099, 100003])
def test_learnable_backward_per_tensor(n):
    x = torch.randn(n) * 2
    for (qmin, qmax), zval, gf in [((0, 255), 100.3, 1.0), ((-128, 127), -3.5, 0.5),
                                   ((-8, 7), 2.5, 1.0 / (n * 7) ** 0.5), ((0, 15), 20.0, 1.0)]:
        scale = torch.tensor([0.07])
        zp = torch.tensor([zval])
        check_learnable(x, scale, zp, -1, qmin, qmax, gf)


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_learnable_backward_per_channel(axis):
    shape = (4, 6, 5, 7)
    for name, x in layouts(shape):
        C = shape[axis]
        scale = torch.rand(C) * 0.1 + 0.02
        zp = torch.randn(C) * 4  # fractional, some ties handled by round()
        zp[0] = 2.5
        check_learnable(x * 2, scale, zp, axis, -8, 7, 0.7)


def test_learnable_backward_accepts_grad_in_another_layout():
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    scale, zp = torch.rand(8) * 0.1 + 0.05, torch.randn(8)
    for grad in [torch.randn(2, 8, 5, 5), torch.ones(()).expand(2, 8, 5, 5)]:
        got = ops.fq_learnable_backward(grad, x, scale, zp, -8, 7, 1, 1.0)
        ref = ops.fq_learnable_backward(grad.contiguous(memory_format=torch.channels_last), x,
                                        scale, zp, -8, 7, 1, 1.0)
        for u, v in zip(got, ref):
            assert torch.equal(u, v)
        assert got[0].stride() == x.stride()


def test_learnable_backward_sums_like_torch_at_each_thread_count():
    """fp32 dscale/dzero_point are torch's own sum of the per-element gradients: bitwise
    torch's at each thread count (and, like torch's, not fixed across thread counts)."""
    x = torch.randn(300001)
    scale, zp = torch.tensor([0.05]), torch.tensor([1.2])
    grad = torch.randn_like(x)
    prev = torch.get_num_threads()
    try:
        for threads in (1, max(2, prev)):
            torch.set_num_threads(threads)
            ours = ops.fq_learnable_backward(grad, x, scale, zp, -8, 7, -1, 1.0)
            xt, st, zt = (t.clone().requires_grad_() for t in (x, scale, zp))
            torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, -8, 7, 1.0).backward(grad)
            for u, v in zip(ours, (xt.grad, st.grad, zt.grad)):
                assert torch.equal(u, v)
    finally:
        torch.set_num_threads(prev)


# ----------------------------------------------------------------------------- observers

def make_observer(cls, qmin, qmax, symmetric, eps, per_channel, **kw):
    dtype = torch.qint8 if qmin < 0 else torch.quint8
    if qmax - qmin > 255:
        dtype = torch.qint32
    if per_channel:
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    else:
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    return cls(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax, eps=eps, **kw)


OBS_RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1), (0, 3), (-32768, 32767)]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("qrange", OBS_RANGES)
def test_minmax_forward_per_tensor(symmetric, qrange):
    qmin, qmax = qrange
    eps = torch.finfo(torch.float32).eps
    for n, shift in [(1, 0.0), (4099, 0.0), (1000, 3.0), (1000, -3.0)]:
        x = torch.randn(n) + shift
        out, mask, scale, zp = ops.fq_minmax_forward(x, -1, qmin, qmax, symmetric, eps, True)
        obs = make_observer(tq_obs.MinMaxObserver, qmin, qmax, symmetric, eps, False)
        obs(x)
        rs, rz = obs.calculate_qparams()
        assert_same(scale, rs.float())
        assert_same(zp, rz.to(torch.int32))
        ref, ref_mask = torch_fq(x, rs, rz.int(), -1, qmin, qmax)
        assert_same(out, ref)
        assert torch.equal(unpack(mask, n), ref_mask)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_minmax_forward_per_channel(symmetric, axis):
    shape = (5, 4, 3, 8)
    eps = 1e-5
    for (name, x), (qmin, qmax) in itertools.product(layouts(shape), [(-8, 7), (0, 255)]):
        x = x.clone()
        x.select(axis, 0).fill_(0.0)  # an all-zero channel: scale = eps
        out, mask, scale, zp = ops.fq_minmax_forward(x, axis, qmin, qmax, symmetric, eps, True)
        obs = make_observer(tq_obs.PerChannelMinMaxObserver, qmin, qmax, symmetric, eps, True,
                            ch_axis=axis)
        obs(x)
        rs, rz = obs.calculate_qparams()
        assert_same(scale, rs.float())
        assert_same(zp, rz.to(torch.int32))
        ref, ref_mask = torch_fq(x, rs.float(), rz.int(), axis, qmin, qmax)
        assert_same(out, ref)
        assert torch.equal(unpack(mask, x.numel()), memory_order(ref_mask, x))


def test_minmax_forward_half_and_empty():
    x = (torch.randn(16, 40) * 2).to(torch.bfloat16)
    out, mask, scale, zp = ops.fq_minmax_forward(x, 0, -8, 7, False, 1e-6, False)
    obs = make_observer(tq_obs.PerChannelMinMaxObserver, -8, 7, False, 1e-6, True, ch_axis=0)
    obs(x.float())
    rs, rz = obs.calculate_qparams()
    assert_same(scale, rs.float())
    ref, _ = torch_fq(x, rs.float(), rz.int(), 0, -8, 7)
    assert_same(out, ref)
    assert mask.numel() == 0
    out, mask, scale, zp = ops.fq_minmax_forward(torch.empty(0), -1, 0, 255, False, 1e-6, True)
    assert out.numel() == 0 and mask.numel() == 0
    assert scale.tolist() == [1.0] and zp.tolist() == [0]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("qrange", [(0, 255), (-128, 127), (-8, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moving_average_forward(symmetric, qrange, dtype):
    qmin, qmax = qrange
    eps, c = 1e-6, 0.1
    obs = make_observer(tq_obs.MovingAverageMinMaxObserver, qmin, qmax, symmetric, eps, False,
                        averaging_constant=c)
    min_val = torch.tensor(float("inf"))
    max_val = torch.tensor(float("-inf"))
    scale = torch.tensor([1.0])
    zp = torch.tensor([0], dtype=torch.int32)
    for step in range(4):
        x = ((torch.randn(3, 5, 67) + 0.3 * step) * (1 + step)).to(dtype)
        out, mask = ops.fq_moving_average_forward(x, min_val, max_val, scale, zp, c, qmin, qmax,
                                                  symmetric, eps, True, True)
        obs(x)
        rs, rz = obs.calculate_qparams()
        assert_same(min_val, obs.min_val)
        assert_same(max_val, obs.max_val)
        assert_same(scale, rs.float())
        assert_same(zp, rz.to(torch.int32))
        ref, ref_mask = torch_fq(x, rs, rz.int(), -1, qmin, qmax)
        assert_same(out, ref)
        assert torch.equal(unpack(mask, x.numel()), ref_mask.reshape(-1))
    # observe=False: quantize with the current buffers, leave them untouched.
    before = [t.clone() for t in (min_val, max_val, scale, zp)]
    x = (torch.randn(100) * 10).to(dtype)
    out, mask = ops.fq_moving_average_forward(x, min_val, max_val, scale, zp, c, qmin, qmax,
                                              symmetric, eps, False, False)
    for t, b in zip((min_val, max_val, scale, zp), before):
        assert_same(t, b)
    ref, _ = torch_fq(x, scale, zp, -1, qmin, qmax)
    assert_same(out, ref)
    assert mask.numel() == 0


# ----------------------------------------------------------------------------- CUDA kernels
# The CUDA kernels must reproduce the CPU kernels bit for bit (same expressions, no FMA
# contraction); the observers' qparams follow torch's own CUDA arithmetic (a tensor divided by
# a Python scalar is a multiply by the fp32 reciprocal there), so they are compared with
# torch's observers run on the GPU.

def _cuda_ready():
    return torch.cuda.is_available() and _extension.build_info().get("with_cuda", False)


def assert_same_nan(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def cuda_inputs(dtype):
    """(name, cpu tensor) pairs: odd sizes, views with misaligned data pointers, layouts."""
    cases = []
    for n in [1, 31, 33, 257, 4099, 65537, 1 << 20]:
        cases.append((f"n{n}", (torch.randn(n) * 4).to(dtype)))
    cases.append(("misaligned", (torch.randn(4101) * 4).to(dtype)[3:]))
    for name, x in layouts((4, 12, 9, 11)):
        cases.append((name, (x * 4).to(dtype)))
    x = cases[-1][1].clone()
    x.view(-1)[::97] = float("nan")
    x.view(-1)[5::101] = float("inf")
    cases.append(("nan_inf", x))
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_forward_and_mask_backward_match_cpu(dtype):
    if not _cuda_ready():
        pytest.skip("extension built without CUDA")
    for name, x in cuda_inputs(dtype):
        axes = [-1] + (list(range(x.dim())) if x.dim() > 1 else [0])
        for axis, float_zp in itertools.product(axes, [False, True]):
            C = 1 if axis < 0 else x.size(axis)
            scale, zp = random_qparams(C, -8, 7, float_zp)
            out, mask = ops.fq_forward(x, scale, zp, -8, 7, axis, True)
            cout, cmask = ops.fq_forward(x.cuda(), scale.cuda(), zp.cuda(), -8, 7, axis, True)
            assert_same_nan(cout.cpu(), out)
            assert torch.equal(cmask.cpu(), mask), (name, axis)
            grad = torch.randn_like(out)
            cgrad = ops.fq_mask_backward(grad.cuda(), cmask)
            assert_same_nan(cgrad.cpu(), ops.fq_mask_backward(grad, mask))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_learnable_backward(dtype):
    if not _cuda_ready():
        pytest.skip("extension built without CUDA")
    for name, x in cuda_inputs(dtype)[:-1]:
        for axis in [-1] + ([1] if x.dim() > 1 else []):
            C = 1 if axis < 0 else x.size(axis)
            scale = torch.rand(C) * 0.1 + 0.02
            zp = torch.randn(C) * 3
            grad = torch.randn_like(x)
            ref = ops.fq_learnable_backward(grad, x, scale, zp, -8, 7, axis, 0.5)
            args = (grad.cuda(), x.cuda(), scale.cuda(), zp.cuda(), -8, 7, axis, 0.5)
            got = ops.fq_learnable_backward(*args)
            again = ops.fq_learnable_backward(*args)
            assert_same_nan(got[0].cpu(), ref[0])
            for u, v, w in zip(got[1:], ref[1:], again[1:]):
                assert torch.equal(u, w)  # deterministic
                tol = 1e-6 * x.numel() / C + 1e-5
                torch.testing.assert_close(u.cpu(), v, rtol=tol, atol=tol * float(v.abs().max() + 1))


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_minmax_forward(symmetric):
    if not _cuda_ready():
        pytest.skip("extension built without CUDA")
    eps = 1e-6
    shapes = [(64, 3, 3, 3), (32, 16, 3, 3), (5, 7), (1 << 20,)]
    for shape, (qmin, qmax), save_mask in itertools.product(shapes, [(-8, 7), (0, 255)],
                                                            [True, False]):
        for name, x in layouts(shape):
            x = x.cuda()
            for axis in [-1, 0] + ([1] if x.dim() == 4 else []):
                out, mask, scale, zp = ops.fq_minmax_forward(x, axis, qmin, qmax, symmetric,
                                                             eps, save_mask)
                cls = tq_obs.MinMaxObserver if axis < 0 else tq_obs.PerChannelMinMaxObserver
                kw = {} if axis < 0 else {"ch_axis": axis}
                obs = make_observer(cls, qmin, qmax, symmetric, eps, axis >= 0, **kw).cuda()
                obs(x)
                rs, rz = obs.calculate_qparams()
                assert_same(scale, rs.float())
                assert_same(zp, rz.to(torch.int32))
                ref, ref_mask = ops.fq_forward(x.cpu(), scale.cpu(), zp.cpu(), qmin, qmax, axis,
                                               save_mask)
                assert_same(out.cpu(), ref)
                assert torch.equal(mask.cpu(), ref_mask)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_moving_average_forward(dtype):
    if not _cuda_ready():
        pytest.skip("extension built without CUDA")
    qmin, qmax, eps, c = 0, 255, 1e-6, 0.05
    obs = make_observer(tq_obs.MovingAverageMinMaxObserver, qmin, qmax, False, eps, False,
                        averaging_constant=c).cuda()
    bufs = [torch.tensor(float("inf")), torch.tensor(float("-inf")), torch.tensor([1.0]),
            torch.tensor([0], dtype=torch.int32)]
    bufs = [b.cuda() for b in bufs]
    for step in range(4):
        x = ((torch.randn(8, 16, 33, 33) + 0.2 * step) * (1 + step)).to(dtype).cuda()
        x = x.to(memory_format=torch.channels_last) if step % 2 else x
        out, mask = ops.fq_moving_average_forward(x, *bufs, c, qmin, qmax, False, eps, True, True)
        obs(x)
        rs, rz = obs.calculate_qparams()
        assert_same(bufs[0], obs.min_val)
        assert_same(bufs[1], obs.max_val)
        assert_same(bufs[2], rs.float())
        assert_same(bufs[3], rz.to(torch.int32))
        ref, ref_mask = ops.fq_forward(x.cpu(), bufs[2].cpu(), bufs[3].cpu(), qmin, qmax, -1, True)
        assert_same(out.cpu(), ref)
        assert torch.equal(mask.cpu(), ref_mask)
    before = [b.clone() for b in bufs]
    out, _ = ops.fq_moving_average_forward(x, *bufs, c, qmin, qmax, False, eps, False, False)
    for b, a in zip(bufs, before):
        assert_same(b, a)
