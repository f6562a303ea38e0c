"""Host->device uploads of the small index tables the kernels read (layer offsets, tile plans,
per-channel vectors), safe inside a CUDA graph capture and free of host syncs.

torch refuses any copy between pageable host memory and a CUDA tensor while the stream is being
captured ("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU
tensor is pinned"), and a copy from pageable memory is a host sync outside capture. So every such
table goes through `to_device`: staged in pinned memory and copied asynchronously. The caching
host allocator keeps a pinned block from reuse until its copy has run.

Inside a capture the copy is a graph node that every replay runs again from the same host
address, so the staging bytes must stay (unchanged) for the life of the process, and allocating
pinned memory there is best avoided (the host allocator may query CUDA events, which a capture
forbids). So uncaptured calls keep a pinned reserve per device ready, and captured calls carve
their tables out of it, never to be reused: a few hundred bytes per captured call.
"""
from __future__ import annotations

import threading

import torch

RESERVE_BYTES = 1 << 16
_ALIGN = 16
_captured: list = []   # every staging buffer a capture used: kept for good
_reserve: dict = {}    # device -> [pinned uint8 buffer, bytes used]
_lock = threading.Lock()


def _capturing(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _pinned_reserve() -> torch.Tensor:
    return torch.empty(RESERVE_BYTES, dtype=torch.uint8, pin_memory=True)


def _keep_reserve(device) -> None:
    """Outside capture: a fresh reserve when less than half of the current one is left."""
    r = _reserve.get(device)
    if r is None or r[1] > RESERVE_BYTES // 2:
        buf = _pinned_reserve()
        with _lock:
            _reserve[device] = [buf, 0]  # carved tables keep the old buffer alive


def _carve(host: torch.Tensor, device):
    """During capture: `host`'s bytes copied into the reserve, or None when it has no room."""
    n = host.numel() * host.element_size()
    with _lock:
        r = _reserve.get(device)
        if r is None or r[1] + n > RESERVE_BYTES:
            return None
        view = r[0][r[1]:r[1] + n]
        r[1] += (n + _ALIGN - 1) // _ALIGN * _ALIGN
        staged = view.view(host.dtype).view(host.shape)
        _captured.append(staged)  # keeps the bytes (and their buffer) after a new reserve
    staged.copy_(host)
    return staged


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`; for CUDA via pinned memory, asynchronously."""
    if device.type != "cuda":
        return host.to(device)
    host = host.contiguous()
    if _capturing(device):
        staged = _carve(host, device)
        if staged is None:  # no uncaptured call came first, or a huge table: pin one for good
            staged = host.pin_memory()
            with _lock:
                _captured.append(staged)
    else:
        _keep_reserve(device)
        staged = host if host.is_pinned() else host.pin_memory()
    return staged.to(device, non_blocking=True)
