"""acq_kernels without torch.ao.quantization (upstream deprecates it): the import succeeds and
FakeQuant / LearnableFakeQuant build on torchao.quantization.pt2e's classes.

Simulated in a subprocess: torch (and torchao, whose own remaining uses of torch.ao are theirs
to migrate) are imported first, then every torch.ao.quantization module is dropped from
sys.modules and a meta_path hook makes any further import of it fail, before acq_kernels loads.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torchao")

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torchao.quantization.pt2e as P

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch.ao.quantization" or name.startswith("torch.ao.quantization."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    for name in [m for m in sys.modules if m.split(".")[:3] == ["torch", "ao", "quantization"]]:
        del sys.modules[name]
    delattr(torch.ao, "quantization")
    sys.meta_path.insert(0, Block())

    import acq_kernels as ak
    from acq_kernels.fake_quant import _ao_compat, onnx_export, portable, pt2e  # noqa: F401
    assert _ao_compat.SOURCE == "torchao", _ao_compat.SOURCE
    assert issubclass(ak.FakeQuant, P.FakeQuantize)
    assert issubclass(ak.LearnableFakeQuant, P.FakeQuantizeBase)

    torch.manual_seed(0)
    # FakeQuant: bitwise torchao's FakeQuantize (per-tensor 4-bit and per-channel weights)
    for kwargs in (dict(quant_min=0, quant_max=15),
                   dict(observer=P.MovingAveragePerChannelMinMaxObserver, quant_min=-8,
                        quant_max=7, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)):
        ours, ref = ak.FakeQuant(**kwargs), P.FakeQuantize(**kwargs)
        for _ in range(3):
            x = torch.randn(6, 5, 4, requires_grad=True)
            y, y_ref = ours(x), ref(x.detach().requires_grad_())
            assert torch.equal(y, y_ref)
        assert torch.equal(ours.scale, ref.scale) and torch.equal(ours.zero_point, ref.zero_point)
        assert ours.state_dict().keys() == ref.state_dict().keys()

    # LearnableFakeQuant: torch.ao's interface, torch's learnable op's values
    fq = ak.LearnableFakeQuant(P.MovingAverageMinMaxObserver, quant_min=0, quant_max=15)
    x = torch.randn(64)
    fq(x)  # static estimate
    fq.enable_param_learning()
    xg = x.clone().requires_grad_()
    y = fq(xg)
    y.sum().backward()
    s, z = fq.scale.detach().clone().requires_grad_(), fq.zero_point.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    ref = torch._fake_quantize_learnable_per_tensor_affine(xr, s, z, 0, 15, 1.0)
    ref.sum().backward()
    assert torch.equal(y, ref) and torch.equal(xg.grad, xr.grad)
    assert torch.allclose(fq.scale.grad, s.grad, rtol=1e-5)
    scale, zp = fq.calculate_qparams()
    assert zp.dtype == torch.int64 and scale.shape == (1,)
    assert not any(m.startswith("torch.ao.quantization") for m in sys.modules)
    print("ok")
""")


def test_import_and_modules_without_torch_ao_quantization():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
