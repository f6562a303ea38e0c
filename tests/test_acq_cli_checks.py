"""The CLI refuses bad input before any work, tells the truth in its warnings and output, and its runs
resume / evaluate from any folder (issue 13, items 2-5)."""
import argparse
import contextlib
import io
import json
import os
import shutil

import pytest
import torch

from acqtrain.cli import _parser, main
from acqtrain.models import digits_net

SMALL = {"gen_width": 16, "latent_dim": 16, "batch_size": 8, "iters_per_epoch": 2, "log_every": 1,
         "warmup_epochs": 1, "range_epochs": 1}


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _bad(argv, *, created=()):
    rc, out, err = _run(argv)
    err = err.strip()
    assert rc == 2, (out, err)
    assert err.startswith("acq: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for path in created:
        assert not os.path.exists(path), path
    return err


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(digits_net().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, teacher_file):
    """2 epochs trained from a folder holding the teacher, given by a *relative* path."""
    root = tmp_path_factory.mktemp("run")
    shutil.copy(teacher_file, root / "teacher.pt")
    (root / "small.json").write_text(json.dumps(SMALL))
    work = root / "work"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc, out, err = _run(["train", "--config", "small.json", "--teacher-weights", "teacher.pt",
                             "--work-dir", str(work), "--epochs", "2", "--no-progress"])
    finally:
        os.chdir(cwd)
    assert rc == 0, err
    return {"root": root, "work": work, "out": out, "err": err}


def test_version_names_package_torch_triton_and_backend(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("acq 0.1.0") and f"torch {torch.__version__}" in out and "triton" in out
    assert "backend auto" in out


def test_every_option_of_every_subcommand_has_help_with_its_default():
    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {"train", "teacher", "eval", "export", "demo"}
    for name, sub in subs.items():
        for a in sub._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and "default" in a.help, (name, a.option_strings, a.help)
        sub.format_help()  # every %(default)s expands
    train = subs["train"].format_help()
    assert "(default: 400)" in train and "(default: 200)" in train  # epochs x iterations are visible


def test_bad_input_is_refused_before_any_work(tmp_path, teacher_file):
    work = tmp_path / "never"
    base = ["train", "--teacher-weights", str(teacher_file), "--work-dir", str(work)]
    err = _bad(["train", "--model", "resnet20", "--teacher-weights", str(teacher_file), "--work-dir", str(work)],
               created=[work])
    assert "3-channel images" in err and "'digits' has 1 channels" in err
    assert "dataset 'digits' has 10 classes" in _bad(base + ["--num-classes", "5"], created=[work])
    assert "backend 'cuda' cannot run on device 'cpu'" in _bad(base + ["--backend", "cuda"], created=[work])
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "not a directory" in _bad(["train", "--teacher-weights", str(teacher_file), "--work-dir", str(afile)])
    assert "cannot be created" in _bad(["train", "--teacher-weights", str(teacher_file),
                                        "--work-dir", str(afile / "sub")])
    # not a checkpoint: a state dict, and a pickle of Python objects (never unpickled)
    assert "not an acq checkpoint" in _bad(["eval", "--checkpoint", str(teacher_file)])
    evil = tmp_path / "evil.pt"
    torch.save({"format": "acq-checkpoint-v1", "x": argparse.Namespace(a=1)}, evil)
    assert "not an acq checkpoint" in _bad(["eval", "--checkpoint", str(evil)])
    assert "not a directory" in _bad(["teacher", "--out", str(afile / "t.pt"), "--epochs", "1"])
    assert "never be trained" in _bad(["demo", "--epochs", "1", "--work-dir", str(work)], created=[work])


def test_epoch_lines_without_progress_and_no_carriage_returns(run):
    assert [line.split(":")[0] for line in run["out"].splitlines() if line.startswith("epoch")] == \
        ["epoch 1/2", "epoch 2/2"]
    assert "warm-up: student not trained" in run["out"].splitlines()[0]
    assert "\r" not in run["out"] + run["err"]


def test_bars_degrade_to_lines_when_not_a_terminal(tmp_path, teacher_file):
    rc, out, err = _run(["train", "--config", _small(tmp_path), "--teacher-weights", str(teacher_file),
                         "--work-dir", str(tmp_path / "w"), "--epochs", "1"])
    assert rc == 0
    assert "\r" not in out + err and "epoch 1/1" in out
    assert "acq: warning: epochs (1) <= warmup_epochs (1)" in err and "never trained" in err


def _small(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(SMALL))
    return str(path)


def test_checkpoints_load_with_weights_only(run):
    files = sorted((run["work"] / "checkpoints").iterdir())
    state = torch.load(files[-1], weights_only=True)
    assert state["epoch"] == 2 and len(state["teacher_sha256"]) == 64
    assert os.path.isabs(state["config"]["teacher_weights"])
    saved = json.loads((run["work"] / "config.json").read_text())
    assert saved["teacher_weights"] == str(run["root"] / "teacher.pt")


def test_eval_and_resume_from_another_folder_reuse_the_saved_config(run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(run["work"], work)
    rc, out, err = _run(["eval", "--checkpoint", str(work), "--batch-size", "100"])
    assert rc == 0 and "W4A4 student" in out, err
    # --resume with --work-dir alone: config.json is reused, --epochs overrides it
    rc, out, err = _run(["train", "--work-dir", str(work), "--resume", "--epochs", "3", "--no-progress"])
    assert rc == 0, err
    epochs = [json.loads(line) for line in open(work / "metrics.jsonl") if '"epoch"' in line]
    assert [e["epoch"] for e in epochs if e["kind"] == "epoch"] == [0, 1, 2]
    assert json.loads((work / "config.json").read_text())["batch_size"] == SMALL["batch_size"]
    # a shape-critical change is still refused
    err = _bad(["train", "--work-dir", str(work), "--resume", "--epochs", "4", "--w-bits", "3"])
    assert "another configuration" in err and "w_bits" in err


def test_teacher_override_and_changed_teacher(run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(run["work"], work)
    moved = tmp_path / "moved.pt"
    shutil.copy(run["root"] / "teacher.pt", moved)
    cfg = json.loads((work / "config.json").read_text())
    cfg["teacher_weights"] = str(tmp_path / "gone.pt")  # the stored path no longer exists
    (work / "config.json").write_text(json.dumps(cfg))
    for f in (work / "checkpoints").iterdir():
        state = torch.load(f, weights_only=True)
        state["config"]["teacher_weights"] = str(tmp_path / "gone.pt")
        torch.save(state, f)
    assert "--teacher-weights" in _bad(["eval", "--checkpoint", str(work)])
    rc, out, err = _run(["eval", "--checkpoint", str(work), "--teacher-weights", str(moved)])
    assert rc == 0, err
    rc, out, err = _run(["train", "--work-dir", str(work), "--resume", "--epochs", "3", "--no-progress",
                         "--teacher-weights", str(moved)])
    assert rc == 0, err
    # another teacher file under the same name: refused on resume, naming it
    other = digits_net()
    torch.manual_seed(1)
    other = digits_net()
    torch.save(other.state_dict(), moved)
    err = _bad(["train", "--work-dir", str(work), "--resume", "--epochs", "4", "--teacher-weights", str(moved)])
    assert "has changed" in err and str(moved) in err


def test_trainer_creates_its_out_dir(tmp_path, teacher_file):
    from acqtrain import Trainer, make_config
    cfg = make_config(**{**SMALL, "epochs": 1, "progress": False})
    out = tmp_path / "a" / "b"
    t = Trainer(cfg, digits_net(), out_dir=str(out))
    assert not out.exists()  # nothing is written before the first record
    t.fit(epoch_lines=False)
    assert (out / "metrics.jsonl").exists() and (out / "checkpoints" / "ckpt-epoch0001.pt").exists()


def test_public_api_is_listed_and_documented():
    import inspect
    import acqtrain as acq
    import acq_kernels
    assert "fake_quantize" in acq_kernels.__all__ and "spatial_attention" in acq_kernels.__all__
    public = {n for n, o in vars(acq_kernels).items() if not n.startswith("_") and not inspect.ismodule(o)}
    assert public <= set(acq_kernels.__all__), public - set(acq_kernels.__all__)
    for name in acq_kernels.__all__:
        obj = getattr(acq_kernels, name)
        if callable(obj):
            assert inspect.getdoc(obj), name
    for fn in (acq.Trainer, acq.build_model, acq.build_generator, acq.quantize_model):
        doc = inspect.getdoc(fn)
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        missing = [p for p in params if p not in doc]
        assert not missing, (fn.__name__, missing)
