"""`acq export`: integer weights + qparams, the torch-only rebuilt model, the ONNX QDQ graph, and
`acq eval --onnx` against `acq eval --checkpoint` on a short digits W4A4 ACQ run."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import fx, nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

import onnx  # noqa: E402

from acqtrain import ops  # noqa: E402
from acqtrain.cli import main  # noqa: E402
from acqtrain.data import DIGITS_TEST, load_digits_split  # noqa: E402
from acqtrain.errors import AcqError  # noqa: E402
from acqtrain.export import export_student, onnx_run, onnx_session  # noqa: E402
from acqtrain.models import digits_net  # noqa: E402
from acqtrain.quant import ActQuant, WeightQuant, calibrate_on_noise, quantize_model, set_observing  # noqa: E402

SMALL = {"gen_width": 16, "latent_dim": 16}
RUN = ["--epochs", "2", "--iters", "3", "--batch-size", "16", "--warmup-epochs", "1", "--range-epochs", "1",
       "--w-bits", "4", "--a-bits", "4", "--log-every", "3", "--no-progress"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _accuracy(text):
    return float(re.search(r"([\d.]+)% top-1", text).group(1))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits teacher (a few epochs), a short W4A4 ACQ run on it, and its export — all through the CLI."""
    root = tmp_path_factory.mktemp("export")
    teacher = root / "teacher.pt"
    rc, out, err = _run(["teacher", "--epochs", "3", "--batch-size", "64", "--out", str(teacher), "--no-progress"])
    assert rc == 0, err
    cfg = root / "small.json"
    cfg.write_text(json.dumps(SMALL))
    work, exp = root / "run", root / "exported"
    rc, out, err = _run(["train", "--config", str(cfg), "--teacher-weights", str(teacher), "--work-dir", str(work),
                         *RUN])
    assert rc == 0, err
    rc, out, err = _run(["export", "--checkpoint", str(work), "--out", str(exp)])
    assert rc == 0, err
    assert "exported W4A4 digits_net" in out
    return {"root": root, "teacher": teacher, "work": work, "exp": exp, "config": cfg}


def _student_of(run):
    from acqtrain.checkpoint import load_checkpoint
    from acqtrain.models import load_teacher_weights
    state, _ = load_checkpoint(str(run["work"]))
    t = digits_net()
    load_teacher_weights(t, str(run["teacher"]), 10)
    s = quantize_model(t, 4, 4)
    s.load_state_dict(state["student"])
    set_observing(s, False)
    return s.eval()


def test_onnxruntime_accuracy_equals_checkpoint_accuracy(digits_run):
    rc, out, err = _run(["eval", "--checkpoint", str(digits_run["work"])])
    assert rc == 0, err
    acc_ckpt = _accuracy(out)
    rc, out, err = _run(["eval", "--onnx", str(digits_run["exp"] / "model.onnx"), "--dataset", "digits",
                         "--batch-size", "100"])
    assert rc == 0, err
    acc_onnx = _accuracy(out)
    assert abs(acc_onnx - acc_ckpt) <= 100.0 / DIGITS_TEST + 1e-9, (acc_ckpt, acc_onnx)
    # per digit: predictions of onnxruntime and of the student differ on at most one of 397
    _, _, x, y = load_digits_split(0)
    student = _student_of(digits_run)
    with torch.no_grad():
        want = student(x).argmax(1)
    got = onnx_run(onnx_session(str(digits_run["exp"] / "model.onnx")), x).argmax(1)
    assert int((want != got).sum()) <= 1
    assert acc_ckpt > 10.0  # a trained teacher: the comparison is between meaningful predictions


def test_onnx_graph_checks_and_has_qdq_at_every_site_and_weight(digits_run):
    proto = onnx.load(str(digits_run["exp"] / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    student = _student_of(digits_run)
    sites = sum(isinstance(m, ActQuant) for m in student.modules())
    layers = sum(isinstance(m, WeightQuant) for m in student.modules())
    assert sites == 7 and layers == 10  # digits_net: 7 ReLU sites; 9 convs (incl. 2 shortcuts) + fc
    ops_ = [n.op_type for n in proto.graph.node]
    assert ops_.count("QuantizeLinear") == sites
    assert ops_.count("DequantizeLinear") == sites + layers
    assert ops_.count("BatchNormalization") == 9  # exported as trained, not folded
    assert "Conv" in ops_ and "Gemm" in ops_ or "MatMul" in ops_
    # every activation Q is clipped to the 4-bit range [0, 15] inside its uint8 container: never widened
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in proto.graph.node for o in n.output}
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert len(clips) == sites
    for c in clips:
        assert producer[c.input[0]].op_type == "QuantizeLinear"
        assert (int(consts[c.input[1]]), int(consts[c.input[2]])) == (0, 15)
    # integer weights: 8-bit initializers feeding DequantizeLinear
    dq_weights = [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts]
    assert len(dq_weights) == layers
    for name in dq_weights:
        w = consts[name]
        assert str(w.dtype) == "uint8" and w.min() >= 0 and w.max() <= 15


def test_manifest_and_integer_weights_reproduce_the_fake_quantized_weights(digits_run):
    from safetensors.torch import load_file
    manifest = json.loads((digits_run["exp"] / "manifest.json").read_text())
    tensors = load_file(str(digits_run["exp"] / "quantized.safetensors"))
    assert manifest["model"] == "digits_net" and manifest["input_shape"] == [1, 16, 16]
    assert manifest["w_bits"] == manifest["a_bits"] == 4 and manifest["acq_version"]
    assert len(manifest["teacher"]["sha256"]) == 64 and manifest["checkpoint"]["trained_epochs"] == 1
    assert "not folded" in manifest["batchnorm"]
    student = _student_of(digits_run)
    mods = dict(student.named_modules())
    for layer in manifest["weight_layers"]:
        name = layer["name"]
        q = tensors[f"{name}.weight_int"]
        s, zp = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"]
        assert q.dtype == torch.uint8 and (layer["quant_min"], layer["quant_max"]) == (0, 15)
        assert s.dtype == torch.float32 and zp.dtype == torch.int32 and s.shape == zp.shape == (q.shape[0],)
        shape = [-1] + [1] * (q.dim() - 1)
        deq = (q.to(torch.int32) - zp.view(shape)) * s.view(shape)
        fq = ops.fake_quantize_minmax(mods[name].weight.detach(), 0, 15, axis=0)[0]
        assert torch.equal(deq, fq), name
    for site in manifest["activation_sites"]:
        m = mods[site["name"]]
        assert (site["bits"], site["quant_min"], site["quant_max"]) == (4, 0, 15)
        assert site["scale"] == float(m.scale) and site["zero_point"] == int(m.zero_point)
        assert torch.equal(tensors[f"{site['name']}.scale"].reshape(1), m.scale)
    assert manifest["check"]["torch_max_abs_diff"] == 0.0


_TORCH_ONLY = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("acq", "acqtrain", "acq_kernels", "safetensors", "onnx", "onnxruntime", "onnxscript"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import torch, acq_deploy
model = acq_deploy.load(sys.argv[1])
x, want = torch.load(sys.argv[2])
got = model(x)
assert not [m for m in sys.modules if m.split(".")[0] in ("acq", "acqtrain", "acq_kernels", "safetensors")], "imported"
assert torch.equal(got, want), (got - want).abs().max()
print("ok", type(model).__name__, tuple(got.shape))
"""


def test_rebuilt_model_runs_with_torch_alone(digits_run, tmp_path):
    student = _student_of(digits_run)
    _, _, x, _ = load_digits_split(0)
    with torch.no_grad():
        want = student(x[:50])
    torch.save((x[:50], want), tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _TORCH_ONLY, str(digits_run["exp"]), str(tmp_path / "io.pt")],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok GraphModule (50, 10)")


def test_safetensors_fallback_reader_matches_the_library(digits_run, monkeypatch):
    from safetensors.torch import load_file
    from acqtrain import deploy
    path = str(digits_run["exp"] / "quantized.safetensors")
    want = load_file(path)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails -> the built-in reader
    got = deploy.read_safetensors(path)
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k


def _calibrated(w=4, a=4, seed=0):
    torch.manual_seed(seed)
    s = quantize_model(digits_net().eval(), w, a)
    calibrate_on_noise(s, (1, 16, 16), batches=2, batch_size=8)
    return s


class _RawZeroPointConv(WeightQuant, nn.Conv2d):
    """A weight quantizer in "raw" mode: zero points shifted outside [quant_min, quant_max]."""
    shift = -9

    def weight_qparams(self):
        scale, zp, qmin, qmax, axis = super().weight_qparams()
        return scale, zp + self.shift, qmin, qmax, axis

    def fake_weight(self):
        scale, zp, qmin, qmax, _ = self.weight_qparams()
        q = torch.clamp(torch.round(self.weight * (1 / scale).view(-1, 1, 1, 1)) + zp.view(-1, 1, 1, 1), qmin, qmax)
        return (q - zp.view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1)

    def forward(self, x):
        return self._conv_forward(x, self.fake_weight(), self.bias)


def test_graph_module_student_and_raw_zero_points(tmp_path):
    class Leaves(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, (ActQuant, WeightQuant)) or super().is_leaf_module(m, name)

    s = _calibrated(3, 5)
    s.conv1.__class__ = _RawZeroPointConv
    gm = fx.GraphModule(s, Leaves().trace(s))
    assert isinstance(gm, fx.GraphModule)
    m = export_student(gm, str(tmp_path / "e"), (1, 16, 16), onnx=False)
    assert m["weight_layers"][0]["container"] == "int8" and m["weight_layers"][1]["container"] == "uint8"
    assert all(site["quant_max"] == 31 for site in m["activation_sites"])
    assert m["check"]["torch_max_abs_diff"] == 0.0
    from acqtrain import deploy
    rebuilt = deploy.load(str(tmp_path / "e"))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), gm(x))
    # a zero point no 8-bit container holds is refused, never silently changed
    s.conv1.shift = 500
    with pytest.raises(AcqError, match="8-bit container"):
        export_student(s, str(tmp_path / "f"), (1, 16, 16), onnx=False)
    assert not (tmp_path / "f").exists()


def test_uncalibrated_site_and_wide_activations_are_refused(tmp_path):
    s = quantize_model(digits_net().eval(), 4, 4)
    with pytest.raises(AcqError, match="never calibrated"):
        export_student(s, str(tmp_path / "a"), (1, 16, 16), onnx=False)
    with pytest.raises(AcqError, match="8-bit container"):
        export_student(_calibrated(4, 10), str(tmp_path / "b"), (1, 16, 16), onnx=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_cli_refuses_bad_input_before_writing(digits_run, tmp_path):
    out = tmp_path / "out"
    rc, _, err = _run(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(out)])
    assert rc == 2 and err.startswith("acq: error: checkpoint not found")
    rc, _, err = _run(["export", "--checkpoint", str(digits_run["teacher"]), "--out", str(out)])
    assert rc == 2 and "not an acq checkpoint" in err
    afile = tmp_path / "file"
    afile.write_text("x")
    rc, _, err = _run(["export", "--checkpoint", str(digits_run["work"]), "--out", str(afile)])
    assert rc == 2 and "not a directory" in err
    assert not out.exists()


def test_export_of_a_student_still_in_warmup_needs_force(digits_run, tmp_path):
    import shutil
    work = tmp_path / "run"
    shutil.copytree(digits_run["work"], work)
    first = work / "checkpoints" / "ckpt-epoch0001.pt"  # after the warm-up epoch only
    rc, _, err = _run(["export", "--checkpoint", str(first), "--out", str(tmp_path / "e")])
    assert rc == 2 and "never trained" in err and "--force" in err
    assert not (tmp_path / "e").exists()
    rc, out, err = _run(["export", "--checkpoint", str(first), "--out", str(tmp_path / "e"), "--force",
                         "--no-onnx"])
    assert rc == 0 and "acq: warning:" in err and "never trained" in err
    assert (tmp_path / "e" / "quantized.safetensors").exists() and not (tmp_path / "e" / "model.onnx").exists()


def test_eval_onnx_bad_input(digits_run, tmp_path):
    rc, _, err = _run(["eval", "--onnx", str(tmp_path / "no.onnx")])
    assert rc == 2 and "ONNX file not found" in err
    rc, _, err = _run(["eval", "--onnx", str(digits_run["exp"] / "model.onnx"), "--dataset", "cifar10",
                       "--data-dir", str(tmp_path)])
    assert rc == 2 and "3-channel" in err
    rc, _, err = _run(["eval", "--onnx", str(digits_run["exp"] / "model.onnx"), "--checkpoint", "x"])
    assert rc == 2 and "--checkpoint does not apply" in err


def test_demo_exports_its_acq_students_and_reports_onnxruntime_accuracy(tmp_path):
    from acqtrain.demo import run_demo
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.manual_seed(0)
    torch.save(digits_net().state_dict(), cache / "digits_teacher_seed0.pt")  # no 30-epoch teacher here
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = run_demo(str(tmp_path / "demo"), [(4, 4)], cache_dir=str(cache), progress=False, epochs=2,
                       iters_per_epoch=2, batch_size=16, gen_width=16, latent_dim=16)
    (row,) = res["rows"]
    assert abs(row["acq_onnx"] - row["acq"]) <= 100.0 / DIGITS_TEST + 1e-9
    assert (tmp_path / "demo" / "w4a4_acq" / "export" / "model.onnx").exists()
    assert "ACQ (ONNX, onnxruntime)" in res["table"] and f"{row['acq_onnx']:.2f} |" in res["table"]
    assert "onnxruntime" in out.getvalue()
