import os
import subprocess
import sys

import pytest
import torch

import acq_kernels
from acq_kernels import _backend


def test_auto_prefers_extension_on_cpu_when_built():
    want = "cpu" if _backend.backend_usable("cpu", torch.device("cpu")) else "reference"
    assert _backend.select(torch.device("cpu")) == want


def test_set_backend_global_and_context_manager():
    assert acq_kernels.get_backend() == "auto"
    acq_kernels.set_backend("reference")
    assert acq_kernels.get_backend() == "reference"
    with acq_kernels.set_backend("triton"):
        assert acq_kernels.get_backend() == "triton"
        assert _backend.select(torch.device("cpu")) == "triton"  # interpreter is on in tests
    # leaving the block restores the choice in force before it
    assert acq_kernels.get_backend() == "reference"
    acq_kernels.set_backend("auto")
    assert acq_kernels.get_backend() == "auto"


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        acq_kernels.set_backend("tpu")
    with pytest.raises(TypeError, match="backend"):
        acq_kernels.set_backend(3)


def test_env_var_override(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert acq_kernels.get_backend() == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="backend"):
        acq_kernels.get_backend()


def test_unusable_backend_is_an_error_not_a_silent_fallback():
    with acq_kernels.set_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            _backend.select(torch.device("cpu"), op="demo")


def test_missing_extension_degrades_with_one_warning():
    code = ("import warnings, torch\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import acq_kernels\n"
            "    from acq_kernels import _backend\n"
            "    print(_backend.select(torch.device('cpu')))\n"
            "    print(_backend.select(torch.device('cpu')))\n"
            "print(len([x for x in w if 'extension' in str(x.message)]))\n")
    env = dict(os.environ, ACQ_KERNELS_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["reference", "reference", "0"]  # skipped on purpose: no warning
    # A broken extension (import error) warns once and falls back.
    code2 = ("import sys, warnings, torch\n"
             "sys.modules['acq_kernels._C'] = None\n"  # makes `from . import _C` raise
             "with warnings.catch_warnings(record=True) as w:\n"
             "    warnings.simplefilter('always')\n"
             "    from acq_kernels import _backend\n"
             "    a = _backend.select(torch.device('cpu')); b = _backend.select(torch.device('cpu'))\n"
             "print(a, b, len([x for x in w if 'extension' in str(x.message)]))\n")
    env.pop("ACQ_KERNELS_NO_EXTENSION")
    out = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["reference", "reference", "1"]


def test_cli_reports_backends():
    out = subprocess.run([sys.executable, "-m", "acq_kernels"], capture_output=True, text=True,
                         check=True).stdout
    assert "torch" in out and "backend" in out and "cpu" in out
    bad = subprocess.run([sys.executable, "-m", "acq_kernels", "--bogus"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
    assert "Traceback" not in bad.stderr and not bad.stdout


def test_tune_cpu_allocator_keeps_freed_buffers_for_reuse():
    code = ("import sys, acq_kernels\n"
            "print(acq_kernels.tune_cpu_allocator(), acq_kernels.tune_cpu_allocator())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == (["True", "True"] if sys.platform.startswith("linux") else ["False", "False"])
    with pytest.raises(ValueError, match="max_reused_bytes"):
        acq_kernels.tune_cpu_allocator(0)
    with pytest.raises(TypeError, match="max_reused_bytes"):
        acq_kernels.tune_cpu_allocator(1.5)


def test_auto_prefers_the_extension_for_the_fused_observer_on_cuda(monkeypatch):
    """On CUDA "auto" takes Triton first, except fq_observe_forward, which the extension runs
    in one kernel launch (the Triton path is several); explicit choices still win."""
    monkeypatch.setattr(_backend, "backend_usable", lambda name, device: True)
    cuda = torch.device("cuda")
    every = ("reference", "triton", "cuda")
    assert _backend.select(cuda, supported=every, op="fake_quant.fq_observe_forward") == "cuda"
    assert _backend.select(cuda, supported=("reference", "triton"),
                           op="fake_quant.fq_observe_forward") == "triton"  # older extension
    assert _backend.select(cuda, supported=every, op="fake_quant.fq_forward") == "triton"
    with acq_kernels.set_backend("triton"):
        assert _backend.select(cuda, supported=every, op="fake_quant.fq_observe_forward") == "triton"
    assert _backend.select(torch.device("cpu"), supported=every + ("cpu",),
                           op="fake_quant.fq_observe_forward") == "cpu"
