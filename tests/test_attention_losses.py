"""ACQ attention losses (squared distance, center matching, pair hinge): every backend vs the
plain-PyTorch formulas, forward and backward, stacked-batch usage, degenerate pairs, bad input."""
import pytest
import torch

import acq_kernels
from acq_kernels import set_backend
from acq_kernels.attention import spatial_attention_reference

from conftest import cpu_backends

BACKENDS = cpu_backends()
REDUCTIONS = ("mean", "sum", "none")
# Losses are fp32 from fp32 math (tight); gradients are rounded to the input dtype (1 ulp).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 1e-3),
       torch.float64: (1e-12, 1e-10)}
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
            torch.bfloat16: (1.6e-2, 1.6e-2), torch.float64: (1e-12, 1e-10)}


def reduce(x, reduction):
    return {"mean": x.mean(), "sum": x.sum(), "none": x}[reduction]


def ref_sq(a, b, reduction):
    return reduce((a.float() - b.float()).flatten(1).pow(2).sum(1), reduction)


def ref_hinge(a, b, margin, reduction):
    d = (a.float() - b.float()).flatten(1).norm(dim=1)
    return reduce(torch.relu(margin - d), reduction)


def check(backend, fn, ref_fn, inputs, dtype):
    """Forward and input gradients of fn vs ref_fn (a random upstream gradient)."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    rs = [t.detach().clone().requires_grad_() for t in inputs]
    with set_backend(backend):
        out = fn(*xs)
    want = ref_fn(*rs)
    expect_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == expect_dtype and out.shape == want.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, want.to(expect_dtype), atol=atol, rtol=rtol)
    g = torch.randn_like(want)
    with set_backend(backend):
        got = torch.autograd.grad(out, xs, g.to(out.dtype))
    exp = torch.autograd.grad(want, rs, g)
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype and a.shape == b.shape
        gatol, grtol = GRAD_TOL[dtype]
        torch.testing.assert_close(a.double(), b.double(), atol=gatol, rtol=grtol)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("K", [1, 49, 3136, 1500])
def test_sq_distance(backend, dtype, reduction, K):
    a, b = torch.randn(5, K).to(dtype), torch.randn(5, K).to(dtype)
    check(backend, lambda a, b: acq_kernels.attention_sq_distance(a, b, reduction),
          lambda a, b: ref_sq(a, b, reduction), (a, b), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sq_distance_stacked(backend, dtype, reduction):
    a = torch.randn(8, 7, 7).to(dtype)  # maps may come unflattened: [2N, H, W]
    check(backend, lambda a: acq_kernels.attention_sq_distance(a, reduction=reduction),
          lambda a: ref_sq(a[:4], a[4:], reduction), (a,), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_equals_separate(backend):
    a = torch.randn(6, 50)
    with set_backend(backend):
        for fn in (acq_kernels.attention_sq_distance, acq_kernels.attention_pair_hinge,
                   acq_kernels.attention_pair_distance):
            torch.testing.assert_close(fn(a, reduction="none"),
                                       fn(a[:3], a[3:], reduction="none"), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_pair_hinge(backend, reduction, margin):
    a, b = torch.randn(6, 40) * 0.2, torch.randn(6, 40) * 0.2
    check(backend, lambda a, b: acq_kernels.attention_pair_hinge(a, b, margin, reduction),
          lambda a, b: ref_hinge(a, b, margin, reduction), (a, b), torch.float32)
    stacked = torch.cat([a, b])
    check(backend, lambda s: acq_kernels.attention_pair_hinge(s, margin=margin,
                                                              reduction=reduction),
          lambda s: ref_hinge(s[:6], s[6:], margin, reduction), (stacked,), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_hinge_identical_pair_has_finite_zero_grad(backend):
    a = torch.randn(3, 10)
    b = a.clone()
    b[1] += 1.0
    a.requires_grad_()
    with set_backend(backend):
        loss = acq_kernels.attention_pair_hinge(a, b, margin=5.0, reduction="sum")
        (g,) = torch.autograd.grad(loss, a)
        d = acq_kernels.attention_pair_distance(a, b)
    assert torch.isfinite(g).all() and (g[0] == 0).all() and (g[2] == 0).all()
    assert (g[1] != 0).all()
    torch.testing.assert_close(loss, torch.tensor(15.0 - 10 ** 0.5))
    torch.testing.assert_close(d, torch.tensor([0.0, 10 ** 0.5, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_center_loss(backend, reduction, dtype):
    c = (torch.rand(9, 2) * 2 - 1).to(dtype)
    t = (torch.rand(9, 2) * 2 - 1).to(dtype)
    check(backend, lambda c, t: acq_kernels.attention_center_loss(c, t, reduction),
          lambda c, t: ref_sq(c, t, reduction), (c, t), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_center_loss_target_without_grad(backend):
    c = torch.randn(4, 2, requires_grad=True)
    t = torch.randn(4, 2)
    with set_backend(backend):
        (g,) = torch.autograd.grad(acq_kernels.attention_center_loss(c, t, "sum"), c)
    torch.testing.assert_close(g, 2 * (c.detach() - t))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
def test_gradcheck_float64(backend):
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    s = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    with set_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b: acq_kernels.attention_sq_distance(a, b, "none"), (a, b))
        assert torch.autograd.gradcheck(
            lambda s: acq_kernels.attention_sq_distance(s, reduction="none"), (s,))
        assert torch.autograd.gradcheck(
            lambda a, b: acq_kernels.attention_pair_hinge(a, b, 10.0, "none"), (a, b))
        assert torch.autograd.gradcheck(
            lambda a, b: acq_kernels.attention_center_loss(a[:, :2], b[:, :2], "none"), (a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_to_end_with_spatial_attention(backend):
    """The ACQ pattern: eval/train maps stacked in one batch, losses straight from the outputs."""
    x = torch.randn(4, 8, 7, 7, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    target = torch.rand(2, 2) * 2 - 1
    with set_backend(backend):
        _, anorm, center = acq_kernels.spatial_attention(x)
        loss = (acq_kernels.attention_sq_distance(anorm)
                + acq_kernels.attention_center_loss(center[:2], target)
                + acq_kernels.attention_pair_hinge(anorm, margin=1.5))
        (g,) = torch.autograd.grad(loss, x)
    _, an_r, c_r = spatial_attention_reference(xr)
    loss_r = ref_sq(an_r[:2], an_r[2:], "mean") + ref_sq(c_r[:2], target, "mean") + ref_hinge(
        an_r[:2], an_r[2:], 1.5, "mean")
    (g_r,) = torch.autograd.grad(loss_r, xr)
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(g, g_r, atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_losses_match_reference(dtype):
    a = torch.randn(16, 3136, device="cuda").to(dtype)
    b = torch.randn(16, 3136, device="cuda").to(dtype)
    c, t = torch.rand(16, 2, device="cuda").to(dtype), torch.rand(16, 2, device="cuda").to(dtype)
    for backend in ("triton", "cuda"):
        if not acq_kernels._backend.backend_usable(backend, "cuda"):
            continue
        check(backend, lambda a, b: acq_kernels.attention_sq_distance(a, b),
              lambda a, b: ref_sq(a, b, "mean"), (a, b), dtype)
        check(backend, lambda s: acq_kernels.attention_pair_hinge(s, margin=100.0),
              lambda s: ref_hinge(s[:8], s[8:], 100.0, "mean"), (a,), dtype)
        check(backend, lambda c, t: acq_kernels.attention_center_loss(c, t, "sum"),
              lambda c, t: ref_sq(c, t, "sum"), (c, t), dtype)


def test_bad_input_raises_naming_the_argument():
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    with pytest.raises(ValueError, match="b"):
        acq_kernels.attention_sq_distance(a, torch.randn(4, 8))
    with pytest.raises(ValueError, match="b"):
        acq_kernels.attention_pair_hinge(a, torch.randn(3, 9))
    with pytest.raises(ValueError, match="a"):
        acq_kernels.attention_sq_distance(torch.randn(5, 9))  # odd stacked batch
    with pytest.raises(ValueError, match="a"):
        acq_kernels.attention_pair_hinge(torch.randn(3, 9))
    with pytest.raises(ValueError, match="a"):
        acq_kernels.attention_sq_distance(torch.randn(4))
    with pytest.raises(TypeError, match="a"):
        acq_kernels.attention_sq_distance(torch.ones(4, 9, dtype=torch.long), b)
    with pytest.raises(TypeError, match="b"):
        acq_kernels.attention_sq_distance(a, [1, 2])
    for fn in (acq_kernels.attention_sq_distance, acq_kernels.attention_pair_hinge):
        with pytest.raises(ValueError, match="reduction"):
            fn(a, b, reduction="avg")
    c = torch.randn(4, 2)
    with pytest.raises(ValueError, match="target"):
        acq_kernels.attention_center_loss(c, torch.randn(4, 3))
    with pytest.raises(ValueError, match="target"):
        acq_kernels.attention_center_loss(c, torch.randn(2))
    with pytest.raises(ValueError, match="center"):
        acq_kernels.attention_center_loss(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="reduction"):
        acq_kernels.attention_center_loss(c, c, reduction=None)
    with pytest.raises(TypeError, match="margin"):
        acq_kernels.attention_pair_hinge(a, b, margin="1")
    with pytest.raises(ValueError, match="margin"):
        acq_kernels.attention_pair_hinge(a, b, margin=float("nan"))
