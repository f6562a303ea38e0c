"""Model quantization: module replacement, bit-widths, range tracking/freezing, STE modes, generators."""
import pytest
import torch
from torch import nn

import acq_kernels
from acqtrain.errors import AcqError
from acqtrain.generator import build_generator, Generator, GeneratorImageNet
from acqtrain.models import digits_net, resnet20
from acqtrain.quant import (ActQuant, QuantConv2d, QuantLinear, act_quantizers, calibrate_on_noise, quantize_model,
                       set_observing)


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    with acq_kernels.set_backend(request.param):
        yield request.param


def test_every_layer_replaced_and_teacher_untouched(backend):
    teacher = resnet20().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    q = quantize_model(teacher, 4, 4, first_last_bits=8)
    convs = [m for m in q.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs and all(isinstance(m, (QuantConv2d, QuantLinear)) for m in convs)
    assert [m.w_bits for m in convs][0] == 8 and convs[-1].w_bits == 8
    assert all(m.w_bits == 4 for m in convs[1:-1])
    relus = [m for m in teacher.modules() if isinstance(m, nn.ReLU)]
    assert len(act_quantizers(q)) == len(relus) == 19
    assert not q.training
    q(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not isinstance(m, (QuantConv2d, ActQuant)) for m in teacher.modules())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weights_and_activations_take_at_most_2_pow_bits_levels(bits, backend):
    torch.manual_seed(bits)
    q = quantize_model(digits_net(), bits, bits)
    seen = {}
    for m in q.modules():
        if isinstance(m, ActQuant):
            m.register_forward_hook(lambda mod, a, out: seen.setdefault(id(mod), out.detach()))
    q(torch.randn(8, 1, 16, 16))
    for m in q.modules():
        if isinstance(m, QuantConv2d):
            from acqtrain import ops
            w, scale, zp = ops.fake_quantize_minmax(m.weight, 0, 2 ** bits - 1, axis=0)
            for ch in w.detach():
                assert ch.unique().numel() <= 2 ** bits
    assert len(seen) == len(act_quantizers(q))
    for out in seen.values():
        assert out.unique().numel() <= 2 ** bits


def test_ranges_track_with_unbiased_ema_then_freeze(backend):
    q = quantize_model(digits_net(), 4, 4, momentum=0.9)
    aq = act_quantizers(q)[0]  # after the stem ReLU
    x1 = torch.randn(4, 1, 16, 16)
    q(x1)
    first_max = aq.max_val.clone()
    assert torch.isfinite(first_max) and first_max > 0 and aq.min_val.item() == 0.0  # ReLU output
    x2 = 3 * torch.randn(4, 1, 16, 16)
    feats = {}
    h = aq.register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0].detach()))
    q(x2)
    h.remove()
    expect = first_max + 0.1 * (feats["x"].max() - first_max)  # averaging constant = 1 - momentum
    assert aq.max_val.item() == pytest.approx(expect.item(), rel=1e-5)
    set_observing(q, False)
    frozen = {k: v.clone() for k, v in q.state_dict().items() if k.endswith(("min_val", "max_val", "scale"))}
    q(10 * torch.randn(4, 1, 16, 16))
    assert all(torch.equal(frozen[k], q.state_dict()[k]) for k in frozen)


def test_ste_pure_vs_clipped(backend):
    torch.manual_seed(0)
    for ste in ("pure", "clipped"):
        aq = ActQuant(2, ste=ste)
        aq(torch.linspace(0, 1, 16))  # range [0, 1]
        aq.observing = False
        x = torch.tensor([-0.5, 0.5, 2.0], requires_grad=True)
        aq(x).sum().backward()
        expect = [1.0, 1.0, 1.0] if ste == "pure" else [0.0, 1.0, 0.0]
        assert x.grad.tolist() == expect


def test_noise_calibration_freezes_all_ranges(backend):
    q = quantize_model(digits_net(), 4, 4)
    calibrate_on_noise(q, (1, 16, 16), batches=2, batch_size=4)
    assert all(not m.observing and torch.isfinite(m.max_val) for m in act_quantizers(q))


@pytest.mark.parametrize("kw", [dict(w_bits=1, a_bits=4), dict(w_bits=4, a_bits=17), dict(w_bits=4, a_bits=4,
                                                                                          ste="nope")])
def test_bad_quantization_arguments(kw):
    with pytest.raises(AcqError):
        quantize_model(digits_net(), **kw)


def test_generators_shapes_and_condition():
    g = build_generator(10, 16, 1, latent_dim=32, width=32)
    assert isinstance(g, Generator)
    x = g(torch.randn(5, 32), torch.arange(5), torch.rand(5, 2) * 2 - 1)
    assert x.shape == (5, 1, 16, 16)
    # the center condition changes the image (it is really an input)
    z, y = torch.randn(4, 32), torch.zeros(4, dtype=torch.long)
    g.eval()
    a = g(z, y, torch.full((4, 2), -0.5))
    b = g(z, y, torch.full((4, 2), 0.5))
    assert not torch.allclose(a, b)
    g2 = build_generator(10, 32, 3, width=32, use_center=False)
    assert g2(torch.randn(2, 100), torch.arange(2)).shape == (2, 3, 32, 32)
    g3 = build_generator(1000, 224, 3, width=16)  # GDFQ's ImageNet generator: 56 -> 112 -> 224
    assert isinstance(g3, GeneratorImageNet) and g3.init_size == 56 and g3.label_emb is None
    assert g3(torch.randn(2, 100), torch.tensor([0, 999]), torch.zeros(2, 2)).shape == (2, 3, 224, 224)


def test_quantized_copy_does_not_inherit_the_teachers_hooks():
    teacher = digits_net()
    seen = []
    teacher.layer1.register_forward_hook(lambda m, a, out: seen.append(out))
    teacher(torch.randn(2, 1, 16, 16, requires_grad=True))  # the hook now holds a non-leaf tensor
    q = quantize_model(teacher, 4, 4)
    q(torch.randn(2, 1, 16, 16))
    assert len(seen) == 1 and len(teacher.layer1._forward_hooks) == 1
    assert all(len(m._forward_hooks) == 0 for m in q.modules())
