"""The device guard of every host function that launches Triton kernels (no Triton import
here: ops modules that are imported without Triton use it too)."""
from __future__ import annotations

import functools
import itertools

import torch


def _first_tensor(args) -> torch.Tensor | None:
    """The first tensor among args, looking one level into lists and tuples (bn_stats' xs)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = next((b for b in a if isinstance(b, torch.Tensor)), None)
            if t is not None:
                return t
    return None


def triton_launcher(fn):
    """Runs fn with the CUDA device of its first tensor argument current. Triton launches on
    the current device (torch.cuda.current_device()), so a tensor on cuda:1 while cuda:0 is
    current would be read from the wrong device. CPU tensors (the interpreter) need none."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        t = _first_tensor(itertools.chain(args, kwargs.values()))
        if t is not None and t.device.type == "cuda":
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    guarded.device_guarded = True
    return guarded
