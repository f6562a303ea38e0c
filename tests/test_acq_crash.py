"""A run killed with SIGKILL, during training or in the middle of writing a checkpoint, loses
nothing: `--resume` continues from the last complete checkpoint, never from a partial file, and
the metrics log keeps one record per step."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from acqtrain.cli import main
from acqtrain.models import digits_net

ARGS = ["--iters", "2", "--batch-size", "8", "--warmup-epochs", "1", "--range-epochs", "2",
        "--log-every", "1", "--no-progress"]


def _train_args(tmp_path, epochs):
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        torch.save(digits_net().state_dict(), teacher)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"gen_width": 16, "latent_dim": 16}))
    return ["train", "--config", str(cfg), "--teacher-weights", str(teacher),
            "--work-dir", str(tmp_path / "run"), "--epochs", str(epochs), *ARGS]


def _steps(work):
    with open(work / "metrics.jsonl") as f:
        return [r["iteration"] for r in map(json.loads, f) if r["kind"] == "step"]


def _checkpoints(work):
    d = work / "checkpoints"
    return sorted(p.name for p in d.glob("ckpt-epoch*.pt")) if d.exists() else []


@pytest.mark.slow
def test_sigkill_during_training_resumes_from_last_complete_checkpoint(tmp_path):
    args = _train_args(tmp_path, epochs=400)  # far more than will run before the kill
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "acqtrain", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = tmp_path / "run"
    try:
        deadline = time.monotonic() + 120
        while len(_checkpoints(work)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(_checkpoints(work)) >= 2, proc.stderr.read().decode()[-2000:] if proc.poll() else "too slow"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done = _checkpoints(work)
    last_epoch = int(done[-1][len("ckpt-epoch"):-3])
    # resume and run a few more epochs: continues right after the last complete checkpoint
    resumed = args[:]
    resumed[resumed.index("--epochs") + 1] = str(last_epoch + 2)
    assert main(resumed + ["--resume"]) == 0
    steps = _steps(work)
    assert steps == list(range(1, 2 * (last_epoch + 2) + 1))  # one record per step, none lost or doubled
    assert _checkpoints(work)[-1] == f"ckpt-epoch{last_epoch + 2:04d}.pt"


def test_sigkill_while_writing_a_checkpoint_never_loads_the_partial_file(tmp_path):
    args = _train_args(tmp_path, epochs=2)
    work = tmp_path / "run"
    assert main(args) == 0  # two complete checkpoints
    # A process that dies by SIGKILL after the new checkpoint's temp file is written and
    # fsynced but before the rename: the worst moment of a save.
    code = (
        "import os, signal, sys\n"
        "import acqtrain.checkpoint as ck\n"
        "real = os.replace\n"
        "def die(src, dst):\n"
        "    if os.path.basename(src).startswith('.tmp-'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "ck.os.replace = die\n"
        "from acqtrain.cli import main\n"
        f"sys.exit(main({args[:-len(ARGS)] + ['--epochs', '3'] + ARGS + ['--resume']!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in (work / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kill should have left the partial temp file behind"
    assert _checkpoints(work) == ["ckpt-epoch0001.pt", "ckpt-epoch0002.pt"]
    # resuming ignores the partial file and redoes epoch 3 from the epoch-2 checkpoint
    assert main(args[:-len(ARGS)] + ["--epochs", "3"] + ARGS + ["--resume"]) == 0
    assert _checkpoints(work)[-1] == "ckpt-epoch0003.pt"
    assert _steps(work) == list(range(1, 7))
