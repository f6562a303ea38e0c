"""Shared argument checks for the public ops.

Every check raises ValueError/TypeError with a message that starts with the op's name and names
the offending argument ("fake_quantize: quant_min (5) must be < quant_max (3)"), and runs before
any kernel launch. Checks of tensor *values* need a host sync; they run only on CPU tensors
(see `check_scale_values`), never on CUDA, so validation cannot stall a GPU stream, and
not while torch.compile traces (they are data-dependent).
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Any integer grid that fits 16 bits, signed or unsigned.
QRANGE_LO, QRANGE_HI = -(1 << 15), (1 << 16) - 1


def check_float_tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have a floating dtype in "
                        f"{[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}")


def check_int(op: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    return int(v)


def check_bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def check_qrange(op: str, quant_min, quant_max) -> tuple[int, int]:
    """An integer range [quant_min, quant_max] that fits int16 or uint16."""
    qmin = check_int(op, "quant_min", quant_min)
    qmax = check_int(op, "quant_max", quant_max)
    if qmin >= qmax:
        raise ValueError(f"{op}: quant_min ({qmin}) must be < quant_max ({qmax})")
    if qmin < QRANGE_LO or qmax > QRANGE_HI or (qmin < 0 and qmax > (1 << 15) - 1):
        raise ValueError(f"{op}: quant_min/quant_max ({qmin}, {qmax}) must fit a 16-bit "
                         f"integer range: [-32768, 32767] or [0, 65535]")
    return qmin, qmax


def normalize_axis(op: str, axis, ndim: int, name: str = "axis") -> int | None:
    """None (per-tensor) or a non-negative dimension index; negative axes count from the end."""
    if axis is None:
        return None
    a = check_int(op, name, axis)
    if not -ndim <= a < ndim:
        raise ValueError(f"{op}: {name} ({a}) is out of range for a tensor with {ndim} dimensions")
    return a % ndim


def check_ste(op: str, ste) -> str:
    if ste not in ("clipped", "pure"):
        raise ValueError(f"{op}: ste must be 'clipped' or 'pure', got {ste!r}")
    return ste


def check_positive_finite(op: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not (v > 0.0 and v != float("inf")):
        raise ValueError(f"{op}: {name} ({v}) must be positive and finite")
    return v


def check_same_device(op: str, x: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; "
                             f"they must be on the same device")


def check_qparam_shape(op: str, name: str, t: torch.Tensor, x: torch.Tensor, axis: int | None):
    """0-d/1-d; numel 1 per-tensor, numel x.size(axis) per-channel."""
    if t.dim() > 1:
        raise ValueError(f"{op}: {name} must be 0-d or 1-d, got shape {tuple(t.shape)}")
    want = 1 if axis is None else x.size(axis)
    if t.numel() != want:
        where = "per-tensor" if axis is None else f"x.size({axis})"
        raise ValueError(f"{op}: {name} has {t.numel()} elements but {where} needs {want}")


def _can_read_values(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() > 0 and not torch.compiler.is_compiling()


def check_scale_values(op: str, scale: torch.Tensor) -> None:
    """scale > 0 and finite. Reading a tensor's values syncs with its device, so this runs
    only for CPU tensors: on CUDA, tensor scales are not value-checked (documented)."""
    if not _can_read_values(scale):
        return
    s = scale.detach()
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        v = s[bad].flatten()[0].item()
        raise ValueError(f"{op}: scale must be positive and finite, got {v}")


def check_zero_point_values(op: str, zero_point: torch.Tensor, qmin: int, qmax: int) -> None:
    """zero_point within [quant_min, quant_max]; CPU tensors only (see check_scale_values)."""
    if not _can_read_values(zero_point):
        return
    z = zero_point.detach()
    bad = (z < qmin) | (z > qmax)
    if z.is_floating_point():
        bad |= ~torch.isfinite(z)
    if bool(bad.any()):
        v = z[bad].flatten()[0].item()
        raise ValueError(f"{op}: zero_point ({v}) must be within [quant_min, quant_max] "
                         f"= [{qmin}, {qmax}]")
