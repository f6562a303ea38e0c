"""Test setup shared by every test module.

TRITON_INTERPRET=1 is set before anything imports triton, so the Triton backend runs on CPU
tensors here (the ahead-of-time compile tests run in a subprocess without it).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing a test caches (the demo's digits teacher, ...) lands in the user's ~/.cache.
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="acq-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

import acq_kernels  # noqa: E402,F401
from acq_kernels import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

# torch 2.9 changed its per-tensor fake quant (torch.fake_quantize_per_tensor_affine): float64
# input is now computed through fp32 (before: in float64 throughout), and +inf now clamps to
# quant_max (before: quant_min, from an out-of-range float->int cast). acq_kernels computes the
# 2.9 way on every torch, so bitwise comparisons with torch's per-tensor op on such inputs only
# hold from 2.9 on.
torch_per_tensor_2_9 = pytest.mark.skipif(
    TORCH_VERSION < (2, 9), reason="torch < 2.9's per-tensor fake quant differs on float64 / +inf "
    "input (computed in float64, +inf -> quant_min); acq_kernels follows torch >= 2.9")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed_and_backend():
    """Each test gets its own random draw (seeded by name, so a failure reproduces) and
    leaves no backend choice behind."""
    import zlib
    name = os.environ.get("PYTEST_CURRENT_TEST", "")
    torch.manual_seed(zlib.crc32(name.encode()) ^ int(os.environ.get("ACQ_TEST_SEED", "0")))
    yield
    # Back to "no choice made" (env var / auto), also undoing module-scoped fixtures that ran
    # a CLI command in-process (commands set the backend process-wide, as a CLI should).
    _backend._global_choice = None
    _backend._state.stack = []


def cpu_backends():
    """Backends that can run on CPU tensors in this process (Triton via the interpreter)."""
    return _backend.usable_backends(torch.device("cpu"))
