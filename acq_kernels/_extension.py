"""Loads the compiled extension `acq_kernels._C`, once, degrading to Triton/reference.

A missing or broken extension is never an ImportError: it produces one warning and the
dispatch seam simply does not offer the "cpu"/"cuda" backends. Set
ACQ_KERNELS_NO_EXTENSION=1 to skip loading it (e.g. to test the fallback path).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

OPS_NAMESPACE = "acq_kernels_C"


@functools.lru_cache(maxsize=None)
def load():
    """The extension module, or None (with one warning saying why)."""
    if os.environ.get("ACQ_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
        return None
    try:
        from . import _C  # noqa: F401  (registers torch.ops.acq_kernels_C.* on import)
    except Exception as exc:  # ImportError, undefined symbol from an ABI mismatch, ...
        warnings.warn(
            f"acq_kernels: the compiled extension could not be loaded ({exc}); "
            "falling back to the Triton and reference backends. Rebuild with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


def build_info() -> dict:
    mod = load()
    if mod is None:
        return {"built": False}
    info = dict(mod.build_info())
    info["built"] = True
    return info


def has_cpu_kernels() -> bool:
    return load() is not None


def has_cuda_kernels() -> bool:
    return bool(build_info().get("with_cuda", False)) and torch.cuda.is_available()


def ops():
    """torch.ops namespace of the extension's operators (only valid when load() is not None)."""
    return getattr(torch.ops, OPS_NAMESPACE)
