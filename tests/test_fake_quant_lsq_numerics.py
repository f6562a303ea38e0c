"""LSQ (learnable fake quant) against torch's own kernels, bitwise, on the CPU capability
torch dispatches to here (its AVX2/AVX512 kernels use fused multiply-adds, the default build
does not), near-ties included: forward, dx, dscale and dzero_point."""
import os
import subprocess
import sys

import pytest
import torch

import acq_kernels
from acq_kernels import LearnableFakeQuant
from acq_kernels.fake_quant import reference

from conftest import cpu_backends

BACKENDS = [b for b in cpu_backends() if b != "triton"]  # Triton: see the module docstring


def _near_ties(scale: float, zp: float, qmin: int, qmax: int, ulps: int = 24) -> torch.Tensor:
    """x within a few ulps of every rounding boundary (k + 0.5 - zp) * scale of the range and
    just outside it: where one rounding or two decide which integer x * inv + zp goes to."""
    k = torch.arange(qmin - 2, qmax + 2, dtype=torch.float32)
    t = (k + 0.5 - zp) * scale
    steps = torch.arange(-ulps, ulps + 1, dtype=torch.float32)
    x = t[:, None].expand(-1, steps.numel()).clone()
    up = torch.nextafter(x, torch.full_like(x, float("inf")))
    x = x + steps * (up - x)  # about `steps` ulps from t
    return x.reshape(-1)


def _torch_lsq(x, scale, zp, qmin, qmax, axis, gf, g):
    xt, st, zt = (t.clone().requires_grad_() for t in (x, scale, zp))
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, qmin, qmax, gf)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xt, st, zt, axis, qmin, qmax, gf)
    y.backward(g)
    return y.detach(), xt.grad, st.grad, zt.grad


def _ours(x, scale, zp, qmin, qmax, axis, gf, g):
    xt, st, zt = (t.clone().requires_grad_() for t in (x, scale, zp))
    y = acq_kernels.fake_quantize_learnable(xt, st, zt, qmin, qmax, axis=axis, grad_factor=gf)
    y.backward(g)
    return y.detach(), xt.grad, st.grad, zt.grad


def _assert_bitwise(ours, theirs, exact_sums=True):
    """exact_sums=False: dscale/dzero_point (sums) to within a few ulps -- under the default
    capability torch's own sum kernel depends on more than the values (checked per element
    in test_default_capability_has_no_fma instead)."""
    for name, a, b in zip(("out", "dx", "dscale", "dzero_point"), ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name.startswith("d") and name != "dx" and not exact_sums:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            continue
        assert torch.equal(a, b), (name, (a != b).sum().item(), a.flatten()[:4], b.flatten()[:4])


def _per_element_bitwise(backend, x, scale, zp, qmin, qmax):
    """Every gradient of every single-element input (no summation order involved)."""
    for i in range(x.numel()):
        xi, g = x[i:i + 1], torch.randn(1)
        with acq_kernels.set_backend(backend):
            ours = _ours(xi, scale, zp, qmin, qmax, None, 0.37, g)
        _assert_bitwise(ours, _torch_lsq(xi, scale, zp, qmin, qmax, None, 0.37, g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qrange,zp", [((0, 15), 3.0), ((0, 255), 128.0), ((-8, 7), 0.0),
                                       ((-128, 127), -3.4)])
def test_per_tensor_near_ties_bitwise(backend, qrange, zp, exact_sums=True):
    qmin, qmax = qrange
    scale = torch.tensor([0.0137])
    x = torch.cat([_near_ties(0.0137, round(zp), qmin, qmax), torch.randn(3000) * 0.3])
    g = torch.randn_like(x)
    z = torch.tensor([zp])
    with acq_kernels.set_backend(backend):
        ours = _ours(x, scale, z, qmin, qmax, None, 0.37, g)
    _assert_bitwise(ours, _torch_lsq(x, scale, z, qmin, qmax, None, 0.37, g), exact_sums)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_channel_near_ties_bitwise(backend, exact_sums=True):
    qmin, qmax = 0, 15
    scales, zps = [0.0137, 0.21, 0.0031], [3.0, 8.0, 0.0]
    rows = [_near_ties(s, z, qmin, qmax, ulps=12) for s, z in zip(scales, zps)]
    n = min(r.numel() for r in rows)
    x = torch.stack([r[:n] for r in rows], dim=1).reshape(-1, 3, 1)  # channels on axis 1
    x = torch.cat([x, torch.randn(50, 3, 1) * 0.5])
    g = torch.randn_like(x)
    scale, z = torch.tensor(scales), torch.tensor(zps)
    with acq_kernels.set_backend(backend):
        ours = _ours(x, scale, z, qmin, qmax, 1, 1.0, g)
    _assert_bitwise(ours, _torch_lsq(x, scale, z, qmin, qmax, 1, 1.0, g), exact_sums)


def test_near_ties_tell_one_rounding_from_two():
    """The inputs above separate the FMA and two-rounding forms (else the tests prove nothing),
    and the reference's fma() is the correctly rounded one."""
    x = _near_ties(0.0137, 3.0, 0, 15)
    inv = 1.0 / torch.tensor(0.0137)
    fused = torch.round(reference.fma(x, inv, 3.0))
    twice = torch.round(3.0 + x * inv)
    assert (fused != twice).any()
    exact = x.double() * inv.double() + 3.0  # exact: the product fits in float64, and so does + 3
    assert torch.equal(reference.fma(x, inv, 3.0), exact.float())


def test_learnable_module_bitwise_with_torch_on_this_cpu():
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver
    kw = dict(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=15, scale=0.0137,
              zero_point=3.0, use_grad_scaling=True)
    ours, ref = LearnableFakeQuant(**kw), _LearnableFakeQuantize(**kw)
    for m in (ours, ref):
        m.enable_param_learning()
    x = torch.cat([_near_ties(0.0137, 3.0, 0, 15), torch.randn(500) * 0.2])
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).backward(g)
    ref(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ours.scale.grad, ref.scale.grad)
    assert torch.equal(ours.zero_point.grad, ref.zero_point.grad)


def test_default_capability_has_no_fma():
    """Under ATEN_CPU_CAPABILITY=default torch's kernels round twice; so do ours."""
    code = ("import torch, acq_kernels, sys; sys.path.insert(0, 'tests');"
            "import test_fake_quant_lsq_numerics as t;"
            "from acq_kernels.fake_quant import reference;"
            "assert torch.backends.cpu.get_cpu_capability() in ('DEFAULT', 'NO AVX');"
            "assert not reference.lsq_uses_fma(torch.device('cpu'));"
            "[t.test_per_tensor_near_ties_bitwise(b, (0, 15), 3.0, False) for b in t.BACKENDS];"
            "[t.test_per_channel_near_ties_bitwise(b, False) for b in t.BACKENDS];"
            "x = t._near_ties(0.0137, 3.0, 0, 15, ulps=6);"
            "[t._per_element_bitwise(b, x, torch.tensor([0.0137]), torch.tensor([3.0]), 0, 15)"
            " for b in t.BACKENDS]; print('ok')")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
