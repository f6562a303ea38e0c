"""The quantizer and the loop on CNNs beyond the built-ins: torchvision / pytorchcv models with random
weights, functional and shared activations, every weight layer type, teacher weight files."""
import copy
import json
import os

import pytest
import torch
from torch import fx, nn
import torch.nn.functional as F

import acq_kernels
from acqtrain import graph
from acqtrain.cli import main
from acqtrain.config import make_config
from acqtrain.errors import AcqError
from acqtrain.generator import GeneratorImageNet, build_generator
from acqtrain.models import build_model, digits_net, load_teacher_weights, resnet20
from acqtrain.quant import (ActQuant, QuantConv2d, WeightQuant, act_quantizers, quantize_model, set_observing,
                       summary)
from acqtrain.trainer import Trainer

torchvision = pytest.importorskip("torchvision")

# the test's own list of what an activation call site is (the oracle for the site counts)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                nn.Sigmoid, nn.Tanh)
_ACT_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.gelu, F.silu}


def float_sites(model: nn.Module) -> int:
    """Activation call sites in the traced float model."""
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    return sum((n.op == "call_module" and isinstance(mods[n.target], _ACT_MODULES))
               or (n.op == "call_function" and n.target in _ACT_FUNCS)
               or (n.op == "call_method" and n.target in ("relu", "relu_")) for n in gm.graph.nodes)


class FunctionalNet(nn.Module):
    """F.relu, torch.relu, an in-place method relu and one nn.ReLU called at three places."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)   # depthwise
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.conv4 = nn.Conv2d(16, 16, 1)
        self.bn4 = nn.BatchNorm2d(16)
        self.shared = nn.ReLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.shared(self.conv2(x)) + x
        y = self.conv3(x)
        y.relu_()                                # in place: the next line reads the activation
        y = torch.relu(self.shared(self.bn4(self.conv4(y))) + y)
        return self.fc(self.shared(y).mean((2, 3)))


def test_functional_and_shared_activations_each_get_a_quantizer():
    m = FunctionalNet().eval()
    q = quantize_model(m, 4, 4)
    s = summary(q)
    assert len(act_quantizers(q)) == len(s.act_sites) == float_sites(m) == 6
    assert len(s.weight_layers) == 5 and "6 activation sites" in str(s)
    assert len({id(a) for a in act_quantizers(q)}) == 6  # one module per site: own ranges
    x = torch.randn(2, 3, 8, 8)
    q(x)
    # the in-place site: its quantized output is what the residual add reads
    seen = {}
    for name, a in q.named_modules():
        if isinstance(a, ActQuant):
            a.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name, o))
    set_observing(q, False)
    q(x)
    assert len(seen) == 6 and all(o.unique().numel() <= 16 for o in seen.values())


@pytest.mark.parametrize("name,shape,sites", [("mobilenet_v2", (1, 3, 32, 32), 35), ("resnet18", (1, 3, 32, 32), 17)])
def test_torchvision_models_have_every_site_quantized(name, shape, sites):
    m = build_model(name, 10).eval()
    q = quantize_model(m, 4, 4)
    assert len(act_quantizers(q)) == float_sites(m) == sites
    convs = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert len(summary(q).weight_layers) == len(convs)
    assert all(isinstance(mod, WeightQuant) for mod in q.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))
    assert q(torch.randn(shape)).shape == (1, 10)


def test_activations_without_a_relu_rule_get_a_signed_range():
    m = torchvision.models.mobilenet_v3_small(num_classes=10).eval()  # Hardswish, Hardsigmoid, ReLU
    q = quantize_model(m, 4, 4)
    kinds = {a.op for a in act_quantizers(q)}
    assert {"hardswish", "hardsigmoid", "relu"} <= kinds
    assert len(act_quantizers(q)) == float_sites(m)
    q(torch.randn(2, 3, 32, 32))
    hs = [a for a in act_quantizers(q) if a.op == "hardswish"]
    assert any(a.min_val < 0 for a in hs)  # hardswish goes down to -0.375: the range keeps it


def test_first_last_bits_follow_execution_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)      # registered first, runs last
            self.mid = nn.Conv2d(4, 8, 1)
            self.stem = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.mid(F.relu(self.stem(x)))).mean((2, 3)))

    q = quantize_model(Reversed().eval(), 4, 4, first_last_bits=8)
    bits = {name: b for name, _, b, _ in summary(q).weight_layers}
    assert bits == {"stem": 8, "mid": 4, "fc": 8}
    assert [n for n, *_ in summary(q).weight_layers] == ["stem", "mid", "fc"]


def test_untraceable_and_hidden_float_parts_are_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Branchy()

        def forward(self, x):
            return self.body(x)

    with pytest.raises(AcqError, match=r"inside body \(Branchy\).*leaf_modules"):
        quantize_model(Outer(), 4, 4)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 1, 1, 1))

        def forward(self, x):
            return F.conv2d(x, self.w)

    with pytest.raises(AcqError, match="functional conv2d"):
        quantize_model(Functional(), 4, 4)

    class Leaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(AcqError, match="opaque module but holds conv"):
        quantize_model(nn.Sequential(Leaf(), nn.Conv2d(2, 2, 1)), 4, 4, leaf_modules=(Leaf,))


_LAYERS = [
    ("conv1d", lambda: nn.Conv1d(3, 6, 3), (2, 3, 9)),
    ("conv2d", lambda: nn.Conv2d(3, 6, 3), (2, 3, 7, 7)),
    ("grouped", lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7)),
    ("depthwise", lambda: nn.Conv2d(5, 5, 3, groups=5), (2, 5, 7, 7)),
    ("conv3d", lambda: nn.Conv3d(2, 4, 3), (2, 2, 5, 5, 5)),
    ("convT2d", lambda: nn.ConvTranspose2d(3, 5, 3, stride=2), (2, 3, 4, 4)),
    ("convT2d_grouped", lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), (2, 4, 4, 4)),
    ("linear", lambda: nn.Linear(7, 5), (2, 7)),
]


@pytest.mark.parametrize("weight_range", ["zero", "raw"])
@pytest.mark.parametrize("name,make,shape", _LAYERS, ids=[n for n, _, _ in _LAYERS])
def test_weight_qparams_reproduce_the_forward_weight(name, make, shape, weight_range):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():  # a one-signed channel: raw ranges put its zero point outside [0, 15]
        layer.weight.select(1 if "convT" in name else 0, 0).abs_().add_(0.5)
    q = quantize_model(nn.Sequential(layer), 4, 4, weight_range=weight_range)
    m = q.get_submodule("0")
    assert isinstance(m, WeightQuant) and m.weight_range == weight_range and m.w_bits == 4
    scale, zp, qmin, qmax, axis = m.weight_qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32 and (qmin, qmax) == (0, 15)
    assert axis == (1 if "convT" in name else 0) and scale.shape == zp.shape == (m.weight.shape[axis],)
    view = [-1 if d == axis else 1 for d in range(m.weight.dim())]
    s, z = scale.view(view), zp.view(view)
    codes = torch.clamp(torch.round(m.weight / s) + z, qmin, qmax)
    assert torch.equal((codes - z) * s, m.quantized_weight().detach())
    if weight_range == "raw":  # GDFQ: the raw [min, max] of each channel is the grid's end points
        assert (zp[0] < 0) and torch.equal(codes.amin(), torch.tensor(0.0)) and codes.amax() == qmax
    else:
        assert (zp >= qmin).all() and (zp <= qmax).all()
    x = torch.randn(shape)  # the forward is the float layer's with that weight
    with torch.no_grad():
        layer.weight.copy_(m.quantized_weight())
    assert torch.allclose(q(x), layer(x), atol=1e-6)


def test_raw_weight_range_matches_gdfq_formula():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    conv.weight.data.copy_(w)
    m = quantize_model(nn.Sequential(conv), 3, 3, weight_range="raw").get_submodule("0")
    # GDFQ's AsymmetricQuantFunction: scale n / (max - min), zero point round(scale * min), signed clamp
    mn, mx = w.flatten(1).min(1).values.view(-1, 1, 1, 1), w.flatten(1).max(1).values.view(-1, 1, 1, 1)
    sc = 7 / (mx - mn)
    zp = torch.round(sc * mn) + 4
    gdfq = (torch.clamp(torch.round(sc * w - zp), -4, 3) + zp) / sc
    assert torch.allclose(m.quantized_weight(), gdfq, atol=1e-6)


class LegacyReLUQuant(nn.Sequential):
    pass


def legacy_quantize(teacher, w_bits, a_bits):
    """The module-swapping quantizer the built-ins used before the fx one (the oracle)."""
    from acqtrain.quant import QuantLinear
    student = copy.deepcopy(teacher)

    def convert(parent):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                q = copy.copy(child)
                q.__class__ = QuantConv2d if isinstance(child, nn.Conv2d) else QuantLinear
                q.w_bits, q.ste, q.weight_range = w_bits, "pure", "zero"
                setattr(parent, name, q)
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, LegacyReLUQuant(child, ActQuant(a_bits, 0.1, "pure")))
            else:
                convert(child)

    convert(student)
    return student.eval()


@pytest.mark.parametrize("make,shape", [(digits_net, (4, 1, 16, 16)), (resnet20, (4, 3, 32, 32))])
def test_builtins_give_the_same_students_as_before(make, shape):
    torch.manual_seed(0)
    teacher = make().eval()
    old, new = legacy_quantize(teacher, 3, 3), quantize_model(teacher, 3, 3)
    assert len(act_quantizers(old)) == len(act_quantizers(new))
    for observe in (True, True, False):
        set_observing(old, observe)
        set_observing(new, observe)
        x = torch.randn(shape)
        assert torch.equal(old(x), new(x))


# ----------------------------------------------------------------------------- the loop on other CNNs
TINY = dict(epochs=2, iters_per_epoch=1, batch_size=2, warmup_epochs=1, range_epochs=1, log_every=1, progress=False,
            gen_width=16, latent_dim=16, lambda_at=0.5, q_milestones=[1])


def _pytorchcv_resnet20():
    pytest.importorskip("pytorchcv")
    return build_model("pytorchcv:resnet20_cifar10", 10)


@pytest.mark.parametrize("make,size", [
    (lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5), 32),  # narrow: fast on CPU
    (lambda: build_model("resnet18", 10), 32),
    (FunctionalNet, 16),
    (_pytorchcv_resnet20, 32),
], ids=["mobilenet_v2", "resnet18", "functional", "pytorchcv_resnet20"])
def test_acq_loop_on_any_cnn_finite_and_resume_exact(make, size, tmp_path):
    torch.manual_seed(0)
    teacher = make().eval()
    classes = teacher(torch.zeros(1, 3, size, size)).shape[1]
    cfg = make_config(**TINY, num_classes=classes, image_size=size, in_channels=3)
    a = Trainer(cfg, copy.deepcopy(teacher), out_dir=str(tmp_path / "a"))
    assert len(act_quantizers(a.student)) == float_sites(teacher)
    assert len(a.tap_t._handles) >= 2 and a.tap_q is not None
    os.makedirs(tmp_path / "a")
    a.fit()
    last = a.history[-1]
    for k in ("g_acm", "g_pair", "g_cons", "q_at", "q_kd", "g_bns"):
        assert k in last and torch.isfinite(torch.tensor(last[k])), k
    assert last["g_cons"] > 0 and last["q_at"] > 0
    copy.deepcopy(a.t_forward)  # the taps keep no activations after a capture
    cont = [a.step()]
    b = Trainer(cfg, copy.deepcopy(teacher), out_dir=str(tmp_path / "b"))
    b.resume(str(tmp_path / "a" / "checkpoints"))
    resumed = [b.step()]
    for la, lb in zip(cont, resumed):
        for k in la:
            assert torch.equal(la[k], lb[k]), k
    a.close()
    b.close()


def test_no_tap_when_no_term_needs_maps_and_named_layers(capsys):
    teacher = digits_net().eval()
    cfg = make_config(**{**TINY, "lambda_at": 0.0, "lambda_acm": 0.0, "lambda_pair": 0.0, "lambda_cons": 0.0})
    tr = Trainer(cfg, teacher)
    assert tr.tap_t is None and tr.tap_q is None and tr.t_forward is tr.teacher is teacher  # no hooks
    tr.step()
    assert all(not m._forward_hooks for m in teacher.modules())
    tr = Trainer(make_config(**{**TINY, "attention_layers": ["layer2", "layer3.0.conv2"]}), teacher)
    assert tr.attention_nodes == ["layer2_0_relu2", "layer3_0_conv2"]
    assert tr.teacher is teacher and all(not m._forward_hooks for m in teacher.modules())
    with tr.tap_t.capture() as cap:
        tr.t_forward(torch.randn(2, 1, 16, 16))
    assert [f.shape[1:] for f in cap.feats] == [(32, 8, 8), (64, 4, 4)]
    assert tr.tap_t._current is None  # released when the capture ended
    with pytest.raises(AcqError, match="attention layer 'nope'"):
        Trainer(make_config(**{**TINY, "attention_layers": ["nope"]}), teacher)
    tv = build_model("resnet18", 10)
    with pytest.raises(AcqError, match="called 2 times"):
        Trainer(make_config(**{**TINY, "attention_layers": ["layer1.0.relu"], "image_size": 32, "in_channels": 3}),
                tv)
    with pytest.raises(AcqError, match="does not run on an input of shape"):
        Trainer(make_config(**{**TINY, "image_size": 32, "in_channels": 1}), tv)
    assert "Traceback" not in capsys.readouterr().err


def test_lr_milestones_are_absolute_for_both_optimizers(tmp_path):
    cfg = make_config(**{**TINY, "epochs": 3, "warmup_epochs": 2, "q_milestones": [1, 2], "lambda_at": 0.0,
                         "lambda_acm": 0.0, "lambda_pair": 0.0, "lambda_cons": 0.0})
    tr = Trainer(cfg, digits_net().eval(), out_dir=str(tmp_path))
    tr.fit()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"epoch"' in line]
    recs = [r for r in recs if r["kind"] == "epoch"]
    # warm-up (2 epochs) does not shift them: epoch 2 is the first Q trains in, at the twice-decayed LR
    assert [r["lr_g"] for r in recs] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert [r["lr_q"] for r in recs] == pytest.approx([1e-4, 1e-5, 1e-6])
    assert tr.state_dict()["sched_g"]["last_epoch"] == 3


@pytest.mark.parametrize("kw,msg", [(dict(range_epochs=0), "range_epochs"), (dict(weight_range="nope"), "weight_range"),
                                    (dict(image_size=30), "multiple of 4"), (dict(in_channels=0), "in_channels"),
                                    (dict(attention_layers=[]), "attention_layers"), (dict(model="vgg"), "unknown model"),
                                    (dict(model="pytorchcv:nope"), "unknown pytorchcv model")])
def test_bad_new_settings(kw, msg):
    if kw.get("model", "").startswith("pytorchcv:"):
        pytest.importorskip("pytorchcv")
    with pytest.raises(AcqError, match=msg):
        make_config(**kw)


def test_geometry_defaults():
    pytest.importorskip("pytorchcv")
    assert make_config(model="resnet18", dataset="imagenet").input_shape == (3, 224)
    assert make_config(model="mobilenet_v2", dataset="cifar10").input_shape == (3, 32)
    assert make_config(model="pytorchcv:resnet20_cifar10").input_shape == (3, 32)
    assert make_config(model="resnet18", image_size=64, in_channels=1).input_shape == (1, 64)


def test_gdfq_imagenet_generator_conditions_on_label_and_center():
    g = build_generator(10, 32, 3, latent_dim=16, width=16)
    assert not isinstance(g, GeneratorImageNet)
    g = build_generator(10, 32, 3, latent_dim=16, width=16, kind="imagenet").eval()
    assert isinstance(g, GeneratorImageNet) and g.init_size == 8
    cbns = [m for m in g.modules() if type(m).__name__ == "ClassBatchNorm2d"]
    assert len(cbns) == 3 and all(m.affine is False for m in cbns)
    for m in cbns:  # make the per-class scales differ from their initial ones
        m.weights.weight.data.uniform_(0.5, 1.5)
    z = torch.randn(2, 16)
    c = torch.zeros(2, 2)
    assert not torch.allclose(g(z, torch.tensor([0, 0]), c), g(z, torch.tensor([1, 1]), c))
    assert not torch.allclose(g(z, torch.tensor([0, 0]), c), g(z, torch.tensor([0, 0]), c + 0.5))


# ----------------------------------------------------------------------------- teacher weight files
def test_teacher_weights_in_torchvision_and_pytorchcv_formats(tmp_path):
    src = build_model("resnet18", 10)
    sd = src.state_dict()
    for i, obj in enumerate([sd, {"state_dict": sd}, {"model": {f"module.{k}": v for k, v in sd.items()}},
                             {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}]):
        torch.save(obj, tmp_path / f"w{i}.pt")
        dst = build_model("resnet18", 10)
        load_teacher_weights(dst, str(tmp_path / f"w{i}.pt"), 10)
        assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.conv1.weight, src.conv1.weight)
    pytest.importorskip("pytorchcv")
    cv = build_model("pytorchcv:resnet20_cifar10", 10)
    torch.save(cv.state_dict(), tmp_path / "cv.pth")
    dst = build_model("pytorchcv:resnet20_cifar10", 10)
    load_teacher_weights(dst, str(tmp_path / "cv.pth"), 10)
    assert all(torch.equal(a, b) for a, b in zip(cv.state_dict().values(), dst.state_dict().values()))


def test_wrong_teacher_file_names_the_keys(tmp_path, capsys):
    sd = build_model("resnet18", 10).state_dict()
    bad = dict(sd)
    bad.pop("layer1.0.conv1.weight")
    bad["extra.weight"] = torch.zeros(1)
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(AcqError) as err:
        load_teacher_weights(build_model("resnet18", 10), str(tmp_path / "bad.pt"), 10)
    msg = str(err.value)
    assert "missing layer1.0.conv1.weight" in msg and "unexpected extra.weight" in msg
    assert "mis-shaped conv1.weight [64, 3, 3, 3] (model [64, 3, 7, 7])" in msg
    # resnet20 weights for resnet18: one acq: error line, exit 2, nothing written
    torch.save(resnet20().state_dict(), tmp_path / "r20.pt")
    work = tmp_path / "never"
    assert main(["train", "--model", "resnet18", "--teacher-weights", str(tmp_path / "r20.pt"),
                 "--work-dir", str(work)]) == 2
    out = capsys.readouterr().err
    assert out.startswith("acq: error: teacher weights") and "missing" in out and "Traceback" not in out
    assert not work.exists()


def test_torchvision_model_without_weights_never_downloads(tmp_path, capsys, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    assert main(["train", "--model", "resnet18", "--work-dir", str(tmp_path / "w")]) == 2
    assert "needs --teacher-weights" in capsys.readouterr().err


PUBLISHED = ["cifar10_resnet20", "cifar100_resnet20", "imagenet_resnet18", "imagenet_resnet50", "imagenet_mobilenetv2"]


@pytest.mark.parametrize("stem", PUBLISHED)
def test_a_config_per_published_setting(stem):
    pytest.importorskip("pytorchcv")
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for bits in (4, 3):
        cfg = make_config(os.path.join(root, f"{stem}_w{bits}a{bits}.toml"), device="cpu")
        assert cfg.model.startswith("pytorchcv:") and (cfg.w_bits, cfg.a_bits) == (bits, bits)
        assert cfg.weight_range == "raw" and cfg.q_milestones == [100, 200, 300] and cfg.epochs == 400
        imagenet = stem.startswith("imagenet")
        assert cfg.input_shape == (3, 224 if imagenet else 32)
        assert (cfg.warmup_epochs, cfg.lr_q) == ((50, 1e-6) if imagenet else (4, 1e-4))


def test_cli_trains_a_pytorchcv_teacher_from_its_file(tmp_path, capsys):
    pytest.importorskip("pytorchcv")
    torch.save({"state_dict": build_model("pytorchcv:resnet20_cifar10", 10).state_dict()}, tmp_path / "t.pth")
    work = tmp_path / "run"
    args = ["train", "--model", "pytorchcv:resnet20_cifar10", "--teacher-weights", str(tmp_path / "t.pth")]
    assert main(args + ["--work-dir", str(work)]) == 2  # evaluated on the default digits: 1x16 images
    assert "does not fit the model's input 3x32x32" in capsys.readouterr().err and not work.exists()
    assert main(["train", "--model", "pytorchcv:resnet20_cifar10", "--teacher-weights", str(tmp_path / "t.pth"),
                 "--dataset", "cifar10",
                 "--image-size", "32", "--epochs", "1", "--iters", "1", "--batch-size", "2", "--warmup-epochs", "0",
                 "--range-epochs", "1", "--weight-range", "raw", "--work-dir", str(work), "--no-progress",
                 "--backend", "reference"]) == 0
    err = capsys.readouterr().err
    assert "22 weight layers, 19 activation sites quantized" in err and "Traceback" not in err
    text = (work / "quantization.txt").read_text()
    assert "(raw weight ranges)" in text and text.count(" after ") == 19
    rec = [json.loads(line) for line in open(work / "metrics.jsonl")][-1]
    assert rec["kind"] == "epoch" and rec["lr_g"] == 1e-3 and torch.isfinite(torch.tensor(rec["g_acm"]))
