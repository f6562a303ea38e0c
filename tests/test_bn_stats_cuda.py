"""GPU checks of the batched BN statistics (skipped on machines without CUDA): the compiled
Triton kernels and the CUDA extension vs float64 statistics and the reference gradients."""
import pytest
import torch

import acq_kernels
from acq_kernels import _backend
from acq_kernels.bn_stats.reference import bns_loss_reference

pytestmark = pytest.mark.cuda


def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    return [b for b in ("triton", "cuda") if _backend.backend_usable(b, torch.device("cuda"))]


def _inventory():
    try:
        from bench.shapes import resnet50_bn_inputs
        return resnet50_bn_inputs()
    except ImportError:  # bench/ not on the path: a subset of ResNet-50's BN inputs
        return [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
                (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_inventory_forward_backward(backend, dtype, channels_last):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not usable here")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [(torch.randn(16, *s, device="cuda") * 2 + 3).to(dtype).contiguous(memory_format=fmt)
          for s in _inventory()]
    xs.append(torch.randn(37, 100, device="cuda").to(dtype))  # a BatchNorm1d input, odd sizes
    rms = [torch.randn(x.shape[1], device="cuda") for x in xs]
    rvs = [torch.rand(x.shape[1], device="cuda") + 0.5 for x in xs]
    xk = [x.detach().clone().requires_grad_() for x in xs]
    with acq_kernels.set_backend(backend):
        stats = acq_kernels.bn_stats(xk)
        loss, _ = acq_kernels.bns_loss(xk, rms, rvs)
        loss.backward()
    for (m, v), x in zip(stats, xs):
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        assert torch.allclose(m.double(), xd.mean(dims), rtol=1e-5, atol=1e-5)
        assert torch.allclose(v.double(), xd.var(dims, unbiased=False), rtol=1e-4, atol=1e-6)
    xr = [x.detach().double().requires_grad_() for x in xs]
    lr, _ = bns_loss_reference(xr, [r.double() for r in rms], [r.double() for r in rvs])
    lr.backward()
    assert torch.allclose(loss.double(), lr, rtol=1e-4)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(xk, xr):
        assert a.grad.stride() == a.stride()
        assert (a.grad.double() - b.grad).abs().max() <= tol * b.grad.abs().max()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_large_mean_is_stable(backend):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not usable here")
    xs = [1e4 + torch.randn(64, 32, 28, 28, device="cuda"),
          (1e4 + torch.randn(64, 32, 28, 28, device="cuda")).contiguous(memory_format=torch.channels_last),
          1e4 + torch.randn(4096, 48, device="cuda")]
    with acq_kernels.set_backend(backend):
        stats = acq_kernels.bn_stats(xs)
    for (m, v), x in zip(stats, xs):
        dims = [0] + list(range(2, x.dim()))
        rv = x.double().var(dims, unbiased=False)
        assert torch.allclose(v.double(), rv, rtol=1e-4, atol=0)
