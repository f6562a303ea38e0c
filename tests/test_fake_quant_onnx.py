"""ONNX export of FakeQuant / LearnableFakeQuant models (TorchScript and dynamo exporters):
the QuantizeLinear/DequantizeLinear graph torch's FakeQuantize exports to, narrower ranges kept
exact by a Clip, onnxruntime within one quantization step of PyTorch; and the conversion to
torch's own fake-quant ops for torch.export artifacts that load without acq_kernels."""
import io
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.quantization.observer import (MovingAverageMinMaxObserver,
                                            MovingAveragePerChannelMinMaxObserver)

import acq_kernels as ak
from acq_kernels.fake_quant import onnx_export
from acq_kernels.fake_quant.portable import TorchFakeQuantize, to_torch_fake_quant

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")


def _qconfig(cls, act_range=(0, 255), w_range=(-128, 127)):
    act_dtype = torch.quint8 if act_range[0] >= 0 else torch.qint8
    return tq.QConfig(
        activation=cls.with_args(observer=MovingAverageMinMaxObserver, quant_min=act_range[0],
                                 quant_max=act_range[1], dtype=act_dtype),
        weight=cls.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                             quant_min=w_range[0], quant_max=w_range[1], dtype=torch.qint8,
                             qscheme=torch.per_channel_symmetric))


class QATNet(nn.Module):
    """Activation fake quant (per-tensor) -> QAT conv (per-channel weight fake quant)."""

    def __init__(self, qconfig):
        super().__init__()
        self.act = qconfig.activation()
        self.conv = torch.ao.nn.qat.Conv2d(3, 5, 3, padding=1, qconfig=qconfig)

    def forward(self, x):
        return self.conv(self.act(x))


def _calibrated(cls, seed=0, **ranges):
    torch.manual_seed(seed)
    m = QATNet(_qconfig(cls, **ranges))
    for _ in range(3):
        m(torch.randn(4, 3, 8, 8) * 2)
    m.eval()
    m.apply(tq.disable_observer)
    return m


def _export(model, x, dynamo, opset=None):
    """(ModelProto, onnxruntime output)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = onnx_export.export(model, (x,), dynamo=True, opset_version=opset or 18)
            proto = prog.model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(model, (x,), f, dynamo=False, opset_version=opset or 17)
            proto = onnx.load_from_string(f.getvalue())
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _op_types(proto):
    return [n.op_type for n in proto.graph.node if n.op_type != "Constant"]


def test_eight_bit_graph_is_torchs():
    ours, theirs = _calibrated(ak.FakeQuant), _calibrated(tq.FakeQuantize)
    x = torch.randn(2, 3, 8, 8) * 2
    p_ours, y_ours = _export(ours, x, dynamo=False)
    p_theirs, y_theirs = _export(theirs, x, dynamo=False)
    assert _op_types(p_ours) == _op_types(p_theirs)
    assert _op_types(p_ours).count("QuantizeLinear") == 2
    np.testing.assert_array_equal(y_ours, y_theirs)
    # Each fake quant on its own: onnxruntime within one quantization step of PyTorch.
    w = ours.conv.weight.detach()
    for fq, inp, axis in ((ours.act, x, None), (ours.conv.weight_fake_quant, w, 0)):
        _, y = _export(fq, inp, dynamo=False)
        with torch.no_grad():
            ref = fq(inp).numpy()
        step = fq.scale.numpy().reshape([-1] + [1] * (inp.dim() - 1) if axis == 0 else [1])
        assert np.all(np.abs(y - ref) <= np.broadcast_to(step, y.shape) * 1.001)


# (range, expected int type of the container)
NARROW = [((0, 15), np.uint8), ((-8, 7), np.int8), ((0, 127), np.uint8), ((-127, 127), np.int8),
          ((2, 9), np.uint8)]


def _fq_out(x, scale, zp, qmin, qmax, axis, dynamo, learnable=False):
    """Export a model that is only the fake quant of x; (onnxruntime output, op types)."""
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", scale)
            self.register_buffer("zp", zp)

        def forward(self, inp):
            if learnable:
                return ak.fake_quantize_learnable(inp, self.scale, self.zp, qmin, qmax, axis=axis)
            return ak.fake_quantize(inp, self.scale, self.zp, qmin, qmax, axis=axis)

    proto, y = _export(One().eval(), x, dynamo)
    return y, _op_types(proto)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("qrange,container", NARROW, ids=[str(r) for r, _ in NARROW])
@pytest.mark.parametrize("axis", [None, 1], ids=["per_tensor", "per_channel"])
def test_narrow_ranges_kept_exact(dynamo, qrange, container, axis):
    qmin, qmax = qrange
    n = 1 if axis is None else 3
    scale = torch.rand(n) * 0.2 + 0.05
    zp = torch.randint(qmin, qmax + 1, (n,), dtype=torch.int32)
    x = torch.randn(4, 3, 5, 7) * float(scale.max()) * (qmax - qmin)  # beyond both ends
    y, ops = _fq_out(x, scale, zp, qmin, qmax, axis, dynamo)
    assert ops == ["QuantizeLinear", "Clip", "DequantizeLinear"]
    ref = ak.fake_quantize(x, scale, zp, qmin, qmax, axis=axis).numpy()
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = n
    s, z = scale.reshape(shape).numpy(), zp.reshape(shape).numpy()
    step = np.broadcast_to(s, x.shape)
    assert np.all(np.abs(y - ref) <= step * 1.001)
    assert np.mean(y == ref) > 0.99  # only rounding ties may differ
    q = np.rint(y / s + z)
    assert q.min() == qmin and q.max() == qmax  # the range, reached and not exceeded
    assert container(qmin) == qmin  # sanity of the table


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("qrange", [(0, 255), (-8, 7)])
def test_learnable_ops_export(dynamo, qrange):
    qmin, qmax = qrange
    scale = torch.tensor([0.07, 0.11, 0.2])
    zp = torch.tensor([0.4, 2.5, -1.6]).clamp(qmin, qmax)  # rounded half-even then clamped
    x = torch.randn(2, 3, 6, 6) * 3
    y, ops = _fq_out(x, scale, zp, qmin, qmax, 1, dynamo, learnable=True)
    assert ops[-2:] == ["QuantizeLinear", "DequantizeLinear"] or "Clip" in ops
    ref = ak.fake_quantize_learnable(x, scale, zp, qmin, qmax, axis=1).numpy()
    assert np.all(np.abs(y - ref) <= scale.numpy().reshape(1, 3, 1, 1) * 1.001)
    assert np.mean(y == ref) > 0.99


@pytest.mark.parametrize("w_range", [(-128, 127), (-8, 7)])
def test_learnable_module_torchscript(w_range):
    fq = ak.LearnableFakeQuant(quant_min=w_range[0], quant_max=w_range[1], dtype=torch.qint8,
                               qscheme=torch.per_tensor_affine)
    fq.enable_static_estimate()
    x = torch.randn(2, 3, 6, 6)
    fq(x)
    fq.toggle_observer_update(False)
    fq.scale.data.mul_(1.1)  # as if learned
    fq.zero_point.data.add_(0.7)
    fq.eval()
    _, y = _export(fq, x, dynamo=False)
    with torch.no_grad():
        ref = fq(x).numpy()
    assert np.all(np.abs(y - ref) <= float(fq.scale) * 1.001)


def test_module_torchscript_narrow_activation_and_weight():
    m = _calibrated(ak.FakeQuant, act_range=(0, 15), w_range=(-7, 7))
    x = torch.randn(2, 3, 8, 8) * 2
    proto, y = _export(m, x, dynamo=False)
    assert _op_types(proto).count("Clip") == 2
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(y, ref, atol=float(m.act.scale) * 2, rtol=0)


def test_module_dynamo():
    m = _calibrated(ak.FakeQuant, act_range=(0, 15))
    x = torch.randn(2, 3, 8, 8) * 2
    proto, y = _export(m, x, dynamo=True)
    assert _op_types(proto).count("QuantizeLinear") == 2
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(y, ref, atol=float(m.act.scale) * 2, rtol=0)


def test_range_wider_than_eight_bits_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1023\]"):
        onnx_export.container_dtype(0, 1023)
    with pytest.raises(Exception, match=r"\[-300, 300\]"):
        _fq_out(torch.randn(3, 4), torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32),
                -300, 300, None, dynamo=False)


# --- torch-only conversion -----------------------------------------------------------------

def test_to_torch_fake_quant_matches_and_has_no_acq_ops():
    for cls in (ak.FakeQuant,):
        m = _calibrated(cls, act_range=(0, 15), w_range=(-8, 7))
        conv = to_torch_fake_quant(m)
        assert not any(isinstance(s, (ak.FakeQuant, ak.LearnableFakeQuant))
                       for s in conv.modules())
        assert isinstance(conv.act, TorchFakeQuantize)
        assert isinstance(conv.conv.weight_fake_quant, TorchFakeQuantize)
        assert any(isinstance(s, ak.FakeQuant) for s in m.modules())  # a copy by default
        x = torch.randn(2, 3, 8, 8) * 2
        with torch.no_grad():
            assert torch.equal(conv(x), m(x))
        ep = torch.export.export(conv, (x,))
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any("acq_kernels" in t for t in targets)


def test_to_torch_fake_quant_learnable_and_disabled():
    fq = ak.LearnableFakeQuant(MovingAveragePerChannelMinMaxObserver, quant_min=0,
                               quant_max=15, dtype=torch.quint8,
                               qscheme=torch.per_channel_affine, ch_axis=1, channel_len=3)
    fq.toggle_observer_update(False)
    fq.scale.data = torch.tensor([0.1, 0.2, 0.3])
    fq.zero_point.data = torch.tensor([1.4, 7.5, 20.0])  # rounds to 1, 8; clamps to 15
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(to_torch_fake_quant(fq)(x), fq(x))
    off = ak.FakeQuant()
    off.disable_fake_quant()
    assert isinstance(to_torch_fake_quant(off), nn.Identity)
    with pytest.raises(TypeError, match="model"):
        to_torch_fake_quant("not a module")


def test_exported_artifact_loads_without_acq_kernels(tmp_path):
    m = _calibrated(ak.FakeQuant, act_range=(0, 15))
    x = torch.randn(2, 3, 8, 8) * 2
    with torch.no_grad():
        expected = m(x)
    torch.export.save(torch.export.export(to_torch_fake_quant(m), (x,)), tmp_path / "m.pt2")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "acq_kernels" or name.startswith("acq_kernels."):
                    raise ImportError("acq_kernels is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        ep = torch.export.load({str(tmp_path / 'm.pt2')!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert "acq_kernels" not in sys.modules
        assert torch.equal(ep.module()(io["x"]), io["expected"])
        print("ok")
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
