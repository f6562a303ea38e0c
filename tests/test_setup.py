"""setup.py's choice of extension: in auto mode, an nvcc whose CUDA major differs from torch's
(CUDA-12 torch wheels with nvcc 13) gives the C++ extension alone and one warning, instead of a
failed build. Runs `setup.py --print-build-plan` (a dry run) against a stand-in nvcc."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "building the C++ extension without CUDA kernels"


def _plan(tmp_path, nvcc_release, want_cuda="auto"):
    home = tmp_path / f"cuda-{nvcc_release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.1'\n")
    nvcc.chmod(0o755)
    env = dict(os.environ, CUDA_HOME=str(home), PATH=f"{home / 'bin'}{os.pathsep}{os.environ['PATH']}",
               ACQ_KERNELS_CUDA=want_cuda, ACQ_KERNELS_BUILD_EXT="auto")
    return subprocess.run([sys.executable, "setup.py", "--print-build-plan"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")


@needs_cuda_torch
def test_other_cuda_major_builds_the_cpp_extension_alone_with_one_warning(tmp_path):
    other = int(torch.version.cuda.split(".")[0]) + 1
    r = _plan(tmp_path, f"{other}.0")
    assert r.returncode == 0, r.stderr
    assert "build plan: extension=True cuda=False" in r.stdout
    assert (r.stdout + r.stderr).count(WARNING) == 1, r.stdout + r.stderr


@needs_cuda_torch
def test_same_cuda_major_builds_the_cuda_extension(tmp_path):
    r = _plan(tmp_path, torch.version.cuda)
    assert r.returncode == 0, r.stderr
    assert "build plan: extension=True cuda=True" in r.stdout
    assert WARNING not in r.stdout + r.stderr


@needs_cuda_torch
def test_forcing_cuda_with_another_major_fails_naming_both(tmp_path):
    other = int(torch.version.cuda.split(".")[0]) + 1
    r = _plan(tmp_path, f"{other}.0", want_cuda="1")
    assert r.returncode != 0
    assert f"is CUDA {other}.0 but torch was built with CUDA {torch.version.cuda}" in r.stderr
