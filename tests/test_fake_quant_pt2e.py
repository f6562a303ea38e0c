"""FakeQuant / LearnableFakeQuant on torchao's PT2E QAT path: prepare_qat_pt2e -> training ->
convert_pt2e gives the quantize/dequantize graph and numerics of torchao's own FakeQuantize,
with no fake-quant module left behind."""
import warnings

import pytest
import torch
from torch import nn

import acq_kernels as ak
from acq_kernels.fake_quant.pt2e import with_acq_fake_quant

P = pytest.importorskip("torchao.quantization.pt2e")
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec  # noqa: E402
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (  # noqa: E402
    X86InductorQuantizer, get_default_x86_inductor_quantization_config)
from torchao.testing.pt2e._xnnpack_quantizer import (  # noqa: E402
    XNNPACKQuantizer, get_symmetric_quantization_config)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")


class Net(nn.Module):
    # No BatchNorm: prepare_qat_pt2e's conv-bn fusion traces dozens of patterns (minutes on a
    # loaded 2-core CI box); it is torchao's, not something FakeQuant changes.
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _qat(quantizer, steps=3, seed=0):
    """(prepared after training, converted, converted output on a fixed input)."""
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_pt2e(torch.export.export(Net(), (x,)).module(), quantizer)
        opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
        for _ in range(steps):
            loss = prepared(torch.randn(4, 3, 6, 6) * 2).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.clone() for k, v in prepared.state_dict().items()}
        converted = convert_pt2e(prepared)
    return state, converted, converted(x)


def _graph(gm):
    """Every call_function with its tensor/number arguments' values (qparams included)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            out.append((str(n.target), len(n.args)))
    return out


def _no_fake_quant_left(gm):
    kinds = (ak.FakeQuant, ak.LearnableFakeQuant, P.FakeQuantizeBase, P.ObserverBase)
    return not any(isinstance(m, kinds) for m in gm.modules())


CONFIGS = {
    "xnnpack_per_channel": lambda: (XNNPACKQuantizer, get_symmetric_quantization_config(
        is_per_channel=True, is_qat=True)),
    "x86_inductor": lambda: (X86InductorQuantizer,
                             get_default_x86_inductor_quantization_config(is_qat=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_graph_and_numerics_as_torchao_fake_quantize(name):
    quantizer_cls, config = CONFIGS[name]()
    results = {}
    for cls in (P.FakeQuantize, ak.FakeQuant):
        results[cls] = _qat(quantizer_cls().set_global(with_acq_fake_quant(config, cls)))
    (s_ref, g_ref, y_ref), (s_ours, g_ours, y_ours) = results[P.FakeQuantize], results[ak.FakeQuant]
    assert s_ref.keys() == s_ours.keys()
    for k in s_ref:  # observer ranges, qparams, weights after training: bitwise
        assert torch.equal(s_ref[k], s_ours[k]), k
    assert _graph(g_ours) == _graph(g_ref)
    assert sum("quantize_per" in t for t, _ in _graph(g_ours)) >= 3
    assert _no_fake_quant_left(g_ours)
    assert torch.equal(y_ours, y_ref)


def test_with_args_and_bare_class_in_a_spec_four_bit():
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=15,
                           qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=ak.FakeQuant.with_args(
                               observer=P.MovingAverageMinMaxObserver))
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-7, quant_max=7,
                              qscheme=torch.per_tensor_symmetric,
                              observer_or_fake_quant_ctr=ak.FakeQuant)
    config = QuantizationConfig(act, act, weight, None, is_qat=True)
    _, converted, y = _qat(XNNPACKQuantizer().set_global(config))
    assert _no_fake_quant_left(converted)
    quant = [n for n in converted.graph.nodes if "quantize_per_tensor" in str(n.target)
             and "dequantize" not in str(n.target)]
    assert quant and all(n.args[3:5] in ((0, 15), (-7, 7)) for n in quant)
    assert torch.isfinite(y).all()


def test_learnable_fake_quant():
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255,
                           qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=ak.LearnableFakeQuant.with_args(
                               observer=P.MovingAverageMinMaxObserver))
    config = QuantizationConfig(act, act, act.__class__(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=ak.LearnableFakeQuant.with_args(
            observer=P.MovingAverageMinMaxObserver)), None, is_qat=True)
    state, converted, y = _qat(XNNPACKQuantizer().set_global(config))
    assert _no_fake_quant_left(converted)
    scales = sorted(float(v) for k, v in state.items() if k.endswith(".scale"))
    quant = [n for n in converted.graph.nodes if str(n.target).startswith(
        "quantized_decomposed.quantize_per_tensor")]
    assert quant
    for n in quant:  # convert took the learned scale of each fake quantizer
        assert any(abs(float(n.args[1]) - s) <= 1e-7 * s for s in scales)
    assert torch.isfinite(y).all()


def test_torch_ao_qconfig_still_takes_with_args():
    from torch.ao.quantization import QConfig
    qconfig = QConfig(activation=ak.FakeQuant.with_args(quant_min=0, quant_max=15),
                      weight=ak.FakeQuant.with_args(dtype=torch.qint8, quant_min=-8,
                                                    quant_max=7).with_args(
                                                        qscheme=torch.per_tensor_symmetric))
    act, w = qconfig.activation(), qconfig.weight()
    assert isinstance(act, ak.FakeQuant) and (act.quant_min, act.quant_max) == (0, 15)
    assert w.qscheme == torch.per_tensor_symmetric and w.quant_min == -8
    assert isinstance(act, P.FakeQuantizeBase)  # registered with torchao once it is loaded


def test_with_acq_fake_quant_bad_input():
    with pytest.raises(TypeError, match="config"):
        with_acq_fake_quant({"weight": None})
    with pytest.raises(TypeError, match="fake_quant"):
        with_acq_fake_quant(get_symmetric_quantization_config(is_qat=True), fake_quant=3)
