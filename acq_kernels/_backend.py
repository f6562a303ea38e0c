"""The one dispatch seam: which backend runs an op for a given device.

Backends:
  reference  pure PyTorch (always available; the oracle and the benchmark baseline)
  triton     Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (tests)
  cuda       the C++/CUDA extension's CUDA kernels (acq_kernels._C built with nvcc)
  cpu        the C++ extension's CPU kernels

Selection, most specific first: `with set_backend(...)` / `set_backend(...)`, then the
ACQ_KERNELS_BACKEND environment variable, then "auto" (the fastest available for the device).
A requested backend that cannot run on the tensor's device raises a RuntimeError naming it,
rather than silently measuring or testing something else.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterable, Sequence

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "ACQ_KERNELS_BACKEND"

# Preference order of "auto" per device type; ops may support only a subset.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# Per-op exceptions to _AUTO_ORDER, keyed by (device type, op name as passed to select).
# fake_quant.fq_observe_forward on CUDA: the extension runs the observer step, the qparams and
# the fake quant in one kernel launch, where the Triton path is several launches (device-side
# torch ops for the observer, then its fake-quant kernel); for the small tensors of a QAT step
# (weights, per-layer activations) launch count is what costs, so "auto" prefers the
# extension there. Not measured on a GPU; the Triton path stays selectable with
# set_backend("triton").
_AUTO_ORDER_BY_OP = {
    ("cuda", "fake_quant.fq_observe_forward"): ("cuda", "triton", "reference"),
}

# Tensors of more elements than this are beyond the Triton kernels' 32-bit in-kernel offsets
# (the fake-quant launchers check a slightly larger bound); "auto" gives them to the next
# backend in its order (the CUDA extension uses 64-bit sizes). An explicit "triton" choice
# gets the launcher's ValueError instead.
TRITON_MAX_NUMEL = 2 ** 31 - 2 ** 16

_state = threading.local()
_global_choice: str | None = None


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str):
    """Choose the backend for subsequent calls ("auto", "reference", "triton", "cuda", "cpu").

    As a plain call it sets the process-wide default; as a context manager
    (``with acq_kernels.set_backend("reference"): ...``) it applies to this thread inside the
    block only and restores the previous choice afterwards.
    """
    global _global_choice
    name = _check_name(name)
    # The global default changes now; entering the returned object as a context manager
    # undoes that and scopes the choice to the block (and this thread) instead.
    prev_global = _global_choice
    _global_choice = name
    return _ScopedBackend(name, prev_global)


class _ScopedBackend(contextlib.AbstractContextManager):
    def __init__(self, name: str, prev_global: str | None):
        self.name = name
        self._prev_global = prev_global

    def __enter__(self):
        global _global_choice
        _global_choice = self._prev_global  # scoped, not global
        if not hasattr(_state, "stack"):
            _state.stack = []
        _state.stack.append(self.name)
        return self

    def __exit__(self, *exc):
        _state.stack.pop()
        return False

    def __repr__(self):
        return f"set_backend({self.name!r})"


def get_backend() -> str:
    """The backend choice in force here ("auto" unless overridden)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_choice is not None:
        return _global_choice
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env)
    return "auto"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_usable(name: str, device: torch.device) -> bool:
    """Whether backend `name` can run on tensors of `device` in this process."""
    from . import _extension

    dev = torch.device(device).type
    if name == "reference":
        return True
    if name == "triton":
        if not triton_available():
            return False
        return dev == "cuda" or (dev == "cpu" and triton_interpret())
    if name == "cuda":
        return dev == "cuda" and _extension.has_cuda_kernels()
    if name == "cpu":
        return dev == "cpu" and _extension.has_cpu_kernels()
    return False


def select(device: torch.device, supported: Sequence[str] = BACKENDS, op: str = "op",
           numel: int = 0) -> str:
    """Backend to run `op` on `device`: the user's choice, or the best available one (for
    "auto", one that can address a tensor of `numel` elements)."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    # Called once per op call: the decision is cached on everything it depends on (the
    # usability check itself included, which tests replace).
    return _select(get_backend(), dev, tuple(supported), op, numel > TRITON_MAX_NUMEL,
                   triton_interpret(), backend_usable)


@functools.lru_cache(maxsize=4096)
def _select(choice: str, dev: torch.device, supported: tuple, op: str, huge: bool,
            interpret: bool, backend_usable) -> str:
    if choice != "auto":
        if choice not in supported:
            raise RuntimeError(f"{op}: backend {choice!r} does not implement this op "
                               f"(it has {tuple(supported)})")
        if not backend_usable(choice, dev):
            raise RuntimeError(f"{op}: backend {choice!r} cannot run on device {dev}; "
                               f"usable here: {usable_backends(dev, supported)}")
        return choice
    order = _AUTO_ORDER_BY_OP.get((dev.type, op)) or _AUTO_ORDER.get(dev.type, ("reference",))
    for name in order:
        if name == "triton" and huge:
            continue
        if name in supported and backend_usable(name, dev):
            return name
    return "reference"


def usable_backends(device: torch.device, supported: Iterable[str] = BACKENDS) -> list[str]:
    return [b for b in supported if backend_usable(b, torch.device(device))]
