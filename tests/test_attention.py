"""spatial_attention: every backend vs the plain-PyTorch reference, forward and backward, over
odd shapes, layouts and dtypes; degenerate maps; gradcheck; torch.compile; bad input."""
import pytest
import torch

import acq_kernels
from acq_kernels import set_backend
from acq_kernels.attention import spatial_attention, spatial_attention_reference
from acq_kernels.attention.layout import grad_layout

from conftest import cpu_backends

BACKENDS = cpu_backends()
# log(0) = -inf is intended (|F|^p = exp(p log|F|) is 0 there); numpy under the interpreter warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
LOW = (torch.float16, torch.bfloat16)
# (atol, rtol) per dtype for outputs rounded to that dtype from fp32 math on both sides.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
       torch.float64: (1e-12, 1e-10)}

SHAPES = [(2, 3, 1, 1), (2, 2048, 1, 1), (2, 2048, 7, 7), (3, 16, 7, 7), (2, 5, 14, 14),
          (2, 4, 56, 56), (3, 7, 8, 13), (1, 64, 14, 14)]


def make_feat(shape, layout, dtype, device="cpu"):
    """Random F of `shape` in one of: contiguous, channels_last, a channel-slice view of either
    (strided), or a spatially transposed view (needs a copy inside the op)."""
    N, C, H, W = shape

    def randn(*size):
        return torch.randn(*size, device=device).to(dtype)

    if layout == "contiguous":
        return randn(shape)
    if layout == "channels_last":
        return randn(shape).to(memory_format=torch.channels_last)
    if layout == "slice":
        return randn(N, C + 3, H, W)[:, 2:2 + C]
    if layout == "slice_cl":
        return randn(N, C + 3, H, W).to(memory_format=torch.channels_last)[:, 1:1 + C]
    if layout == "transposed":
        return randn(N, C, W, H).transpose(2, 3)
    raise AssertionError(layout)


def run(backend, feat, p=2):
    with set_backend(backend):
        return spatial_attention(feat, p)


def assert_close(got, want, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol,
                               equal_nan=True)


def reference_grads(feat, p, grads):
    x = feat.detach().clone().requires_grad_()
    outs = spatial_attention_reference(x, p)
    torch.autograd.backward([o for o, g in zip(outs, grads) if g is not None],
                            [g for g in grads if g is not None])
    return x.grad


def backend_grads(backend, feat, p, grads):
    x = feat.detach().clone().requires_grad_()
    outs = run(backend, x, p)
    torch.autograd.backward([o for o, g in zip(outs, grads) if g is not None],
                            [g for g in grads if g is not None])
    return x.grad


def check_forward_backward(backend, feat, p=2, which=(True, True, True)):
    dtype = feat.dtype
    want = spatial_attention_reference(feat, p)
    got = run(backend, feat, p)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    N, C, H, W = feat.shape
    assert got[0].shape == (N, H, W) and got[1].shape == (N, H * W) and got[2].shape == (N, 2)
    grads = [torch.randn_like(w) if on else None for w, on in zip(want, which)]
    gw = reference_grads(feat, p, grads)
    gg = backend_grads(backend, feat, p, grads)
    scale = float(gw.abs().max().clamp_min(1e-30))
    assert_close(gg, gw, dtype, scale=scale)
    return gg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice", "slice_cl"])
def test_matches_reference_fp32(backend, shape, layout):
    feat = make_feat(shape, layout, torch.float32)
    grad = check_forward_backward(backend, feat)
    # dF comes back in the layout the kernels read F in (channels_last stays channels_last).
    if layout in ("channels_last", "slice_cl") and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape,layout", [((2, 5, 14, 14), "slice"),
                                          ((3, 7, 8, 13), "channels_last"),
                                          ((2, 32, 56, 56), "contiguous"),
                                          ((2, 2048, 1, 1), "contiguous")],
                         ids=["14x14-slice", "8x13-cl", "56x56", "1x1-C2048"])
def test_matches_reference_low_precision(backend, dtype, shape, layout):
    check_forward_backward(backend, make_feat(shape, layout, dtype))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
def test_matches_reference_float64(backend, layout):
    check_forward_backward(backend, make_feat((3, 9, 8, 13), layout, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 1.5, 3.0, 0.5])
def test_general_p(backend, p):
    check_forward_backward(backend, make_feat((2, 6, 7, 7), "contiguous", torch.float32), p)
    check_forward_backward(backend, make_feat((2, 6, 8, 13), "channels_last", torch.float32), p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which",
                         [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["amap", "anorm", "center"])
def test_backward_each_output_alone(backend, which):
    check_forward_backward(backend, make_feat((2, 5, 8, 13), "contiguous", torch.float32),
                           which=which)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_view_is_copied_and_correct(backend):
    check_forward_backward(backend, make_feat((2, 5, 6, 9), "transposed", torch.float32))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
@pytest.mark.parametrize("p", [2, 1.5, 3.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(backend, p, layout):
    x = make_feat((2, 3, 4, 5), layout, torch.float64).requires_grad_()
    w = torch.randn(2, 20, dtype=torch.float64)

    def fn(x):
        amap, anorm, center = run(backend, x, p)
        return amap, anorm * w, center  # weighting keeps the anorm term from vanishing

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- degenerate maps

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [2, 1, 0.5])
def test_all_zero_map(backend, p):
    x = torch.zeros(2, 4, 5, 6, requires_grad=True)
    amap, anorm, center = run(backend, x, p)
    assert (amap == 0).all() and (anorm == 0).all() and (center == 0).all()
    (amap.sum() + anorm.sum() + center.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [2, 1.5])
def test_single_nonzero_pixel(backend, p):
    N, C, H, W = 2, 3, 5, 7
    x = torch.zeros(N, C, H, W)
    h, w = 3, 1
    x[0, 1, h, w] = 2.0
    x[1, :, 0, 6] = -1.0
    x.requires_grad_()
    amap, anorm, center = run(backend, x, p)
    onehot = torch.zeros(H * W)
    onehot[h * W + w] = 1
    torch.testing.assert_close(anorm[0], onehot)
    u, v = (2 * w + 1) / W - 1, (2 * h + 1) / H - 1
    torch.testing.assert_close(center[0], torch.tensor([u, v]))
    torch.testing.assert_close(center[1], torch.tensor([(2 * 6 + 1) / W - 1, 1 / H - 1]))
    (anorm.pow(2).sum() + center.sum() + amap.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[x.detach() == 0] == 0).all()  # zero activations get zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_below_one_zero_entries_get_zero_grad(backend):
    x = torch.randn(2, 4, 5, 5)
    x[:, :, 1:3] = 0
    x.requires_grad_()
    amap, anorm, center = run(backend, x, 0.5)
    (amap.sum() + anorm.sum() + center.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, :, 1:3] == 0).all() and (x.grad[:, :, 3:] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    x = torch.randn(2, 4, 5, 6)
    x[0, 2, 1, 3] = float("nan")
    amap, anorm, center = run(backend, x, 2)
    assert torch.isnan(amap[0, 1, 3])
    assert torch.isnan(anorm[0]).all() and torch.isnan(center[0]).all()
    assert not torch.isnan(amap[1]).any() and not torch.isnan(anorm[1]).any()
    assert not torch.isnan(center[1]).any()


# ---------------------------------------------------------------- usage patterns

@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_batch_equals_separate_calls(backend):
    x1, x2 = torch.randn(3, 6, 7, 7), torch.randn(3, 6, 7, 7)
    both = run(backend, torch.cat([x1, x2]), 2)
    for got, a, b in zip(both, run(backend, x1, 2), run(backend, x2, 2)):
        torch.testing.assert_close(got, torch.cat([a, b]), atol=0, rtol=0)


def test_backward_uses_the_forward_backend(monkeypatch):
    """Autograd may run the backward on another thread (CUDA): it must not re-select."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not usable here")
    from acq_kernels.attention import triton_launch

    def boom(*a, **k):
        raise AssertionError("backward re-selected the backend")

    monkeypatch.setattr(triton_launch, "map_grad", boom)
    monkeypatch.setattr(triton_launch, "pair_sq_dist_backward", boom)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    with set_backend("reference"):
        amap, anorm, center = spatial_attention(x)
        loss = acq_kernels.attention_sq_distance(anorm) + amap.sum() + center.sum()
    with set_backend("triton"):
        loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    target = torch.rand(2, 2) * 2 - 1

    def loss_fn(x):
        amap, anorm, center = acq_kernels.spatial_attention(x)
        return (acq_kernels.attention_sq_distance(anorm)
                + acq_kernels.attention_center_loss(center[:2], target)
                + acq_kernels.attention_pair_hinge(anorm, margin=0.5) + amap.mean())

    with set_backend(backend):
        eager = loss_fn(x)
        (g_eager,) = torch.autograd.grad(eager, x)
        torch._dynamo.reset()
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        (g_comp,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
def test_opcheck(backend):
    from acq_kernels.attention import ops
    with set_backend(backend):
        for x in (torch.randn(2, 3, 4, 5, requires_grad=True),
                  torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()):
            torch.library.opcheck(ops._map_fwd, (x, 2.0))
            _, _, _, a32, stats = ops._map_fwd(x.detach(), 1.5)
            torch.library.opcheck(ops._map_bwd, (x.detach(), a32, stats, torch.randn(2, 4, 5),
                                                 None, torch.randn(2, 2), 1.5))


def test_grad_layout_rules():
    x = torch.randn(2, 5, 4, 3)
    assert not grad_layout(x).channels_last
    assert grad_layout(x.to(memory_format=torch.channels_last)).channels_last
    assert grad_layout(x.to(memory_format=torch.channels_last)[:, 1:3]).channels_last
    assert not grad_layout(x[:, 1:3]).channels_last


# ---------------------------------------------------------------- GPU (skipped without CUDA)

def _gpu_backends():
    return [b for b in ("triton", "cuda") if acq_kernels._backend.backend_usable(b, "cuda")]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 2048, 7, 7), (32, 64, 56, 56),
                                   (3, 7, 8, 13), (4, 256, 14, 14), (8, 128, 28, 28)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice", "slice_cl",
                                    "transposed"])
@pytest.mark.parametrize("p", [2, 1.5])
def test_gpu_backends_match_reference(dtype, shape, layout, p):
    backends = _gpu_backends()
    assert backends, "no GPU backend usable"
    feat = make_feat(shape, layout, dtype, device="cuda")
    for backend in backends:
        check_forward_backward(backend, feat, p)


@pytest.mark.cuda
def test_gpu_degenerate_maps():
    for backend in _gpu_backends():
        x = torch.zeros(2, 4, 5, 6, device="cuda", requires_grad=True)
        amap, anorm, center = run(backend, x, 2)
        assert (anorm == 0).all() and (center == 0).all()
        (amap.sum() + anorm.sum() + center.sum()).backward()
        assert (x.grad == 0).all()
        y = torch.randn(2, 4, 5, 6, device="cuda")
        y[0, 1, 2, 3] = float("nan")
        amap, anorm, center = run(backend, y, 2)
        assert torch.isnan(anorm[0]).all() and torch.isnan(center[0]).all()
        assert torch.isfinite(anorm[1]).all() and torch.isfinite(center[1]).all()


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_naming_the_argument():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="feat"):
        spatial_attention(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="feat"):
        spatial_attention(torch.randn(2, 0, 4, 5))
    with pytest.raises(TypeError, match="feat"):
        spatial_attention(torch.ones(2, 3, 4, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="feat"):
        spatial_attention(x.numpy())
    for bad_p in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p"):
            spatial_attention(x, bad_p)
    with pytest.raises(TypeError, match="p"):
        spatial_attention(x, "2")
    with pytest.raises(TypeError, match="p"):
        spatial_attention(x, True)


def test_float64_not_offered_by_triton():
    if "triton" not in BACKENDS:
        pytest.skip("triton not usable here")
    with pytest.raises(RuntimeError, match="triton"):
        run("triton", torch.randn(1, 2, 3, 3, dtype=torch.float64))


# ---------------------------------------------------------------- odd NCHW maps (plane kernels)

# (shape, the plane kernels run on it contiguous in fp32, in bf16): H*W not a multiple of the
# 16-byte vector; samples starting unaligned (C*H*W not a whole number of vectors: batch 3 with
# 5 channels of 7x7) take the channel-tile kernels.
ODD_MAPS = [((2, 16, 7, 7), True, True), ((3, 5, 7, 7), False, False),
            ((3, 8, 5, 5), True, True), ((2, 8, 3, 3), True, True),
            ((2, 4, 14, 14), False, True), ((1, 5, 14, 14), False, False),
            ((2, 7, 4, 4), False, False), ((2, 16, 33, 31), True, True),
            ((2, 3, 9, 9), False, False), ((2, 4, 9, 9), True, False)]


def _spy_plane(monkeypatch):
    """The names of the plane kernels launched from now on."""
    from acq_kernels.attention import triton_kernels as tk
    used = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            used.append(self.name)
            return self.kernel[grid]

    for name in ("_attn_map_plane_kernel", "_attn_feat_grad_plane_kernel"):
        monkeypatch.setattr(tk, name, Spy(name, getattr(tk, name)))
    return used


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,plane_fp32,plane_bf16", ODD_MAPS,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_odd_nchw_maps_match_reference(monkeypatch, shape, plane_fp32, plane_bf16, dtype):
    """7x7, 14x14, 5x5, 3x3, 9x9, 33x31 NCHW maps (the plane kernels: rows of G channels,
    several column blocks folded by the finalize kernel) against the reference, forward and
    backward, p = 2 and general p, contiguous and channel-slice views; and the plane kernels
    run exactly where expected."""
    used = _spy_plane(monkeypatch)
    feat = make_feat(shape, "contiguous", dtype)
    check_forward_backward("triton", feat)
    expected = plane_fp32 if dtype == torch.float32 else plane_bf16
    assert bool(used) == expected and len(set(used)) in (0, 2), used
    check_forward_backward("triton", feat, p=1.5)
    check_forward_backward("triton", make_feat(shape, "slice", dtype))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
@pytest.mark.parametrize("shape,dtype", [((2, 5, 7, 7), torch.float32),
                                         ((2, 5, 7, 7), torch.bfloat16),
                                         ((3, 1, 7, 7), torch.float32),
                                         ((2, 5, 33, 31), torch.float32),
                                         ((2, 5, 33, 31), torch.bfloat16)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_odd_nchw_channel_slices_with_a_partial_row(monkeypatch, shape, dtype):
    """A channel slice of C of C + 3 channels (sample stride (C + 3)*H*W, a whole number of
    vectors): C % G channels make a partial last row of the forward's plane view, alone
    (C = 1) or after full rows, in one or several column blocks. (dF is contiguous, C*H*W
    not a whole number of vectors: its backward takes the channel-tile kernel.)"""
    used = _spy_plane(monkeypatch)
    feat = make_feat(shape, "slice", dtype)
    check_forward_backward("triton", feat)
    check_forward_backward("triton", feat, p=3.0)
    assert set(used) == {"_attn_map_plane_kernel"}, used


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 72, 5, 7), (2, 20, 7, 7), (3, 6, 4, 4), (2, 24, 14, 14)],
                         ids=lambda s: "x".join(map(str, s)))
def test_channels_last_channel_counts_in_vector_units(shape, dtype):
    """channels_last maps with channel counts that are not 16-divisible (72, 20, 6, 24): the
    channel-tile kernels take C and the strides across it in units of the widest vector
    dividing them (4 / 8 / 2), against the reference, p = 2 and general p."""
    feat = make_feat(shape, "channels_last", dtype)
    check_forward_backward("triton", feat)
    check_forward_backward("triton", feat, p=1.5)
