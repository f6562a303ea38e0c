"""Host->device uploads of the small index tables the kernels read (layer offsets, tile plans,
per-channel vectors), safe inside a CUDA graph capture and free of host syncs.

torch refuses any copy between pageable host memory and a CUDA tensor while the stream is being
captured ("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU
tensor is pinned"), and a copy from pageable memory is a host sync outside capture. So every such
table goes through `to_device`: staged in pinned memory and copied asynchronously. The caching
host allocator keeps a pinned block from reuse until its copy has run; inside a capture the copy
is a graph node that every replay runs again from the same host address, so there the staging
buffer is kept (unchanged) for the life of the process (a few hundred bytes per captured call).
"""
from __future__ import annotations

import threading

import torch

_captured: list = []
_lock = threading.Lock()


def _capturing(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`; for CUDA via pinned memory, asynchronously."""
    if device.type != "cuda":
        return host.to(device)
    staged = host if host.is_pinned() else host.pin_memory()
    if _capturing(device):
        with _lock:
            _captured.append(staged)
    return staged.to(device, non_blocking=True)
