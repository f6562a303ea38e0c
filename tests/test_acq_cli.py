"""The training loop end to end through the CLI (in-process), resume, checkpoints and bad input."""
import importlib.util
import json
import os

import pytest
import torch

from acqtrain import checkpoint as ckpt
from acqtrain.cli import main
from acqtrain.config import make_config
from acqtrain.models import digits_net
from acqtrain.trainer import Trainer

TINY = ["--epochs", "3", "--iters", "2", "--batch-size", "8", "--warmup-epochs", "1", "--range-epochs", "2",
        "--log-every", "1", "--no-progress"]
TINY_CFG = dict(epochs=3, iters_per_epoch=2, batch_size=8, warmup_epochs=1, range_epochs=2, log_every=1,
                progress=False, gen_width=16, latent_dim=16)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "digits_teacher.pt"
    torch.manual_seed(0)
    torch.save(digits_net().state_dict(), path)
    return str(path)


def _tiny_config(tmp_path, **kw):
    cfg = {**TINY_CFG, "gen_width": 16, "latent_dim": 16, **kw}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({k: v for k, v in cfg.items() if k not in ("epochs", "progress")}))
    return str(path)


def _records(path, kind):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, teacher_file):
    """One full tiny run through the CLI (3 epochs: warm-up, range tracking, frozen ranges), shared."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = _tiny_config(root)
    work = root / "run"
    import contextlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["train", "--config", cfg, "--teacher-weights", teacher_file, "--work-dir", str(work), *TINY])
    return rc, cfg, work, out.getvalue()


def _copy_run(tiny_run, tmp_path):
    import shutil
    work = tmp_path / "run"
    shutil.copytree(tiny_run[2], work)
    return tiny_run[1], work


def test_tiny_end_to_end_run_all_phases(tiny_run):
    rc, _, work, stdout = tiny_run
    assert rc == 0
    epochs = _records(work / "metrics.jsonl", "epoch")
    steps = _records(work / "metrics.jsonl", "step")
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and len(steps) == 6
    # warm-up epoch: only the generator trains; afterwards the student too
    assert "q_total" not in epochs[0] and "q_total" in epochs[1] and "q_total" in epochs[2]
    for e in epochs:
        for k in ("g_ce", "g_bns", "g_acm", "g_pair", "g_cons", "g_total"):
            assert torch.isfinite(torch.tensor(e[k])) and e[k] >= 0
        assert e["g_acm"] > 0 and e["g_pair"] >= 0 and e["g_cons"] > 0
        assert 0 <= e["acc"] <= 100
    files = sorted(os.listdir(work / "checkpoints"))
    assert files == ["ckpt-epoch0001.pt", "ckpt-epoch0002.pt", "ckpt-epoch0003.pt"]
    state = torch.load(work / "checkpoints" / files[-1], weights_only=False)
    assert {"generator", "student", "opt_g", "opt_q", "sched_q", "rng", "epoch", "iteration", "config"} <= set(state)
    assert state["epoch"] == 3 and state["iteration"] == 6
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    # activation ranges are student buffers: observed during range epochs, then frozen (same at 2 and 3)
    s2 = torch.load(work / "checkpoints" / files[-2], weights_only=False)["student"]
    ranges = [k for k in state["student"] if k.endswith("max_val")]
    assert ranges and all(torch.isfinite(state["student"][k]) for k in ranges)
    assert all(torch.equal(s2[k], state["student"][k]) for k in ranges)
    result = json.loads((work / "result.json").read_text())
    assert result["iterations"] == 6 and result["final_acc"] == epochs[-1]["acc"]
    assert "final accuracy" in stdout


def test_gdfq_switch_turns_acq_terms_off(tmp_path, teacher_file):
    work = tmp_path / "gdfq"
    rc = main(["train", "--config", _tiny_config(tmp_path), "--teacher-weights", teacher_file, "--gdfq",
               "--work-dir", str(work), *TINY[:1], "1", *TINY[2:]])
    assert rc == 0
    (e,) = _records(work / "metrics.jsonl", "epoch")
    assert e["g_acm"] == e["g_pair"] == e["g_cons"] == 0.0 and e["g_bns"] > 0


def test_resume_gives_the_same_next_step_losses(tmp_path, teacher_file):
    from acqtrain.models import load_teacher_weights

    def teacher():
        m = digits_net()
        load_teacher_weights(m, teacher_file, 10)
        return m

    cfg = make_config(**{**TINY_CFG, "epochs": 2, "lambda_at": 0.5})
    a = Trainer(cfg, teacher(), out_dir=str(tmp_path / "a"))
    os.makedirs(tmp_path / "a")
    a.fit()
    cont = [a.step() for _ in range(2)]  # the uninterrupted run goes on into epoch 3
    b = Trainer(cfg, teacher(), out_dir=str(tmp_path / "b"))
    b.resume(str(tmp_path / "a" / "checkpoints"))
    assert (b.epoch, b.iteration) == (2, 4)
    resumed = [b.step() for _ in range(2)]
    for la, lb in zip(cont, resumed):
        assert la.keys() == lb.keys() and "q_total" in la
        for k in la:
            assert torch.equal(la[k], lb[k]), k


def test_resume_through_cli_continues_the_metrics(tmp_path, teacher_file, tiny_run):
    cfg, full = tiny_run[1], tiny_run[2]
    part = tmp_path / "part"
    args = ["train", "--config", cfg, "--teacher-weights", teacher_file, "--work-dir", str(part), *TINY]
    assert main(args[:-len(TINY)] + ["--epochs", "2"] + TINY[2:]) == 0
    assert main(args + ["--resume"]) == 0
    assert _records(full / "metrics.jsonl", "step") == _records(part / "metrics.jsonl", "step")


def test_truncated_checkpoint_is_never_loaded(tmp_path, teacher_file, capsys, tiny_run):
    cfg, work = _copy_run(tiny_run, tmp_path)
    last = work / "checkpoints" / "ckpt-epoch0003.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as err:
        ckpt.load_checkpoint(str(last))
    assert "ckpt-epoch0003.pt" in str(err.value) and "truncated" in str(err.value)
    state, used = ckpt.load_checkpoint(str(work / "checkpoints"))  # the previous complete one
    assert used.endswith("ckpt-epoch0002.pt") and state["epoch"] == 2
    assert "ckpt-epoch0003.pt" in capsys.readouterr().err
    rc = main(["train", "--config", cfg, "--teacher-weights", teacher_file, "--work-dir", str(work), *TINY,
               "--resume", str(last)])
    err = capsys.readouterr().err
    assert rc == 2 and "ckpt-epoch0003.pt" in err and "Traceback" not in err


def test_atomic_save_leaves_no_temp_files_and_keeps_last_k(tmp_path):
    for e in range(1, 6):
        ckpt.save_checkpoint(str(tmp_path), e, {"epoch": e}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-epoch0004.pt", "ckpt-epoch0005.pt"]


def _bad(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, captured
    assert err.startswith("acq: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input_one_message_nonzero_exit_nothing_written(tmp_path, teacher_file, capsys):
    work = tmp_path / "never"
    base = ["train", "--teacher-weights", teacher_file, "--work-dir", str(work), *TINY]
    assert "unknown model 'vgg'" in _bad(capsys, base + ["--model", "vgg"])
    assert "unknown dataset 'mnist'" in _bad(capsys, base + ["--dataset", "mnist"])
    assert "data dir not found" in _bad(capsys, base + ["--dataset", "cifar10", "--data-dir", str(tmp_path / "x")])
    assert "w_bits" in _bad(capsys, base + ["--w-bits", "1"])
    assert "a_bits" in _bad(capsys, base + ["--a-bits", "33"])
    assert "teacher weights file not found" in _bad(capsys, ["train", "--teacher-weights", str(tmp_path / "no.pt"),
                                                             "--work-dir", str(work)])
    five = tmp_path / "five.pt"
    torch.save(digits_net(num_classes=5).state_dict(), five)
    assert "5 classes" in _bad(capsys, ["train", "--teacher-weights", str(five), "--work-dir", str(work), *TINY])
    cfgfile = tmp_path / "bad.toml"
    cfgfile.write_text('w_bits = 4\nlearning_rate = 3\n')
    assert "learning_rate" in _bad(capsys, base + ["--config", str(cfgfile)])
    assert "--bits" in _bad(capsys, ["demo", "--bits", "W4", "--work-dir", str(work)])
    assert "w_bits" in _bad(capsys, ["demo", "--bits", "W1A4", "--work-dir", str(work)])
    assert not work.exists()


def test_checkpoint_from_another_configuration_is_refused(tmp_path, teacher_file, capsys, tiny_run):
    cfg, work = _copy_run(tiny_run, tmp_path)
    before = sorted(os.listdir(work / "checkpoints"))
    err = _bad(capsys, ["train", "--config", cfg, "--teacher-weights", teacher_file, "--work-dir", str(work),
                        *TINY, "--w-bits", "3", "--resume"])
    assert "another configuration" in err and "w_bits" in err
    assert sorted(os.listdir(work / "checkpoints")) == before


def test_example_configs_parse():
    from acqtrain.config import Config, read_config_file
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = sorted(f for f in os.listdir(root) if f.endswith((".toml", ".json")))
    assert len(files) >= 3
    for f in files:
        cfg = Config(**read_config_file(os.path.join(root, f)))
        if not cfg.device.startswith("cuda") and (importlib.util.find_spec("pytorchcv")
                                                  or not cfg.model.startswith("pytorchcv:")):
            cfg.validate()
        assert cfg.acq_terms_on and cfg.w_bits in (3, 4)


def test_toml_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nmodel = "resnet20"\ndataset = "cifar10"\nw_bits = 3\na_bits = 3\nlambda_pair = 0.0\n')
    cfg = make_config(str(path), a_bits=4)
    assert (cfg.model, cfg.w_bits, cfg.a_bits, cfg.lambda_pair) == ("resnet20", 3, 4, 0.0)


def test_eval_of_a_checkpoint_and_teacher_command(tmp_path, tiny_run, capsys):
    ckpt_file = tiny_run[2] / "checkpoints" / "ckpt-epoch0003.pt"
    assert main(["eval", "--checkpoint", str(ckpt_file)]) == 0
    out = capsys.readouterr().out
    assert "W4A4 student" in out and "% top-1 on digits" in out
    epochs = _records(tiny_run[2] / "metrics.jsonl", "epoch")
    assert f"{epochs[-1]['acc']:.2f}%" in out  # the same student, re-evaluated from the file
    weights = tmp_path / "t" / "teacher.pt"
    assert main(["teacher", "--model", "digits_net", "--dataset", "digits", "--epochs", "2", "--batch-size", "32",
                 "--out", str(weights), "--no-progress"]) == 0
    trained_acc = float(capsys.readouterr().out.split(": ")[1].split("%")[0])
    assert weights.is_file() and trained_acc > 50  # two epochs already learn digits
    assert main(["eval", "--model", "digits_net", "--teacher-weights", str(weights)]) == 0
    assert f"{trained_acc:.2f}%" in capsys.readouterr().out
    assert "needs --data-dir" in _bad(capsys, ["teacher", "--model", "resnet20", "--dataset", "cifar10",
                                               "--out", str(tmp_path / "no" / "x.pt")])
    assert not (tmp_path / "no").exists()
