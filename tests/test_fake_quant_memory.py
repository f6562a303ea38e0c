"""What the fake-quant ops keep for backward: the clipped STE saves only the bit-packed mask
(uint8, 1 bit per element), the pure STE nothing, LSQ x plus its tiny qparams."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import acq_kernels as ak
from acq_kernels import _backend
from acq_kernels.fake_quant import ops

BACKENDS = _backend.usable_backends(torch.device("cpu"))


def saved_while(fn):
    """Run fn, recording (dtype, numel, bytes) of every tensor autograd saves; fn's output."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.numel() * t.element_size()))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def use(backend, name):
    if backend in ("cpu", "cuda") and not ops._ext_has(name):
        pytest.skip(f"the C++ extension does not provide acq_kernels_C::{name} yet")
    return ak.set_backend(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipped_ste_saves_only_packed_mask(backend, dtype):
    with use(backend, "fq_forward"):
        for shape, axis in (((4099,), None), ((3, 5, 7, 2), 1)):
            x = torch.randn(shape).to(dtype).requires_grad_()
            n = x.numel()
            c = 1 if axis is None else shape[axis]
            cases = {
                "fake_quantize": lambda: ak.fake_quantize(
                    x, torch.full((c,), 0.1), torch.zeros(c, dtype=torch.int32), -8, 7,
                    axis=axis),
                "minmax": lambda: ak.fake_quantize_minmax(x, -8, 7, axis=axis)[0],
            }
            if axis is None:
                bufs = [torch.tensor(float("inf")), torch.tensor(float("-inf")), torch.ones(1),
                        torch.zeros(1, dtype=torch.int32)]
                cases["moving_average"] = lambda: ak.fake_quantize_moving_average(x, *bufs,
                                                                                   0, 255)
            for name, fn in cases.items():
                saved, y = saved_while(fn)
                assert saved == [(torch.uint8, (n + 7) // 8, (n + 7) // 8)], (name, saved)
                y.sum().backward()   # the mask alone is enough for the backward
                assert x.grad.shape == x.shape
                x.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_pure_ste_and_no_grad_save_nothing(backend):
    with use(backend, "fq_forward"):
        x = torch.randn(1000, requires_grad=True)
        saved, _ = saved_while(lambda: ak.fake_quantize(x, 0.1, 0, -8, 7, ste="pure"))
        assert saved == []
        saved, _ = saved_while(lambda: ak.fake_quantize_minmax(x, -8, 7, ste="pure"))
        assert saved == []
        saved, y = saved_while(lambda: ak.fake_quantize(x.detach(), 0.1, 0, -8, 7))
        assert saved == [] and not y.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_saves_x_and_qparams_only(backend):
    with use(backend, "fq_learnable_backward"):
        x = torch.randn(6, 501, requires_grad=True)
        s = torch.full((6,), 0.1, requires_grad=True)
        z = torch.zeros(6, requires_grad=True)
        saved, y = saved_while(lambda: ak.fake_quantize_learnable(x, s, z, -8, 7, axis=0))
        assert sorted(saved) == sorted([(torch.float32, x.numel(), 4 * x.numel()),
                                        (torch.float32, 6, 24), (torch.float32, 6, 24)])
        y.sum().backward()
        assert s.grad.shape == s.shape and z.grad.shape == z.shape
