"""Public functional API of the fake-quant family.

Semantics are torch's native fake-quant ops (bitwise on finite fp32 input), with these
deliberate differences:
  * NaN propagates to NaN (torch maps NaN to quant_min); +-Inf clamp to the range ends (torch's
    per-channel op maps +Inf to quant_min by an int64 overflow); values whose scaled magnitude
    exceeds 2**63 clamp too (torch overflows them to quant_min).
  * fp16/bf16 inputs are computed in fp32 and rounded once on output; float64 as torch's CPU
    kernels do (float64 times the fp32 1/scale; per-tensor output rounded through fp32),
    bitwise (reference and cpu backends only).
  * The clipped STE saves a bit-packed mask (1 bit per element), not x or a bool mask.
  * Value checks of *tensor* scales/zero points (positive, finite, in range) need a host sync,
    so they run for CPU tensors only; on CUDA they are skipped.
  * zero points are integers; a floating zero_point tensor given to `fake_quantize` is rounded
    half-to-even first. `fake_quantize_learnable` follows torch's learnable ops instead.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from .. import _validation as V
from . import ops
from .reference import is_dense

_EPS = torch.finfo(torch.float32).eps


def _dense(x: Tensor) -> Tensor:
    """x itself when non-overlapping and dense (any dim order: contiguous, channels_last, ...),
    else a contiguous copy; kernels walk x in memory order."""
    return x if is_dense(x) else x.contiguous()


def _check_x(op: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    V.check_float_tensor(op, "x", x)


def _wants_mask(x: Tensor, ste: str) -> bool:
    return ste == "clipped" and x.requires_grad and torch.is_grad_enabled()


@functools.lru_cache(maxsize=256)
def _cached_scalar(value, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A fresh torch.tensor on CUDA is a blocking host-to-device copy; Python-number qparams
    # repeat across steps, so each is copied once. Internal, never mutated.
    return torch.tensor([value], dtype=dtype, device=device)


def _scalar_tensor(value, dtype: torch.dtype, device: torch.device) -> Tensor:
    if torch.compiler.is_compiling() or device.type == "cpu":
        return torch.tensor([value], dtype=dtype, device=device)
    return _cached_scalar(value, dtype, device)


def _scale_tensor(op: str, scale, x: Tensor, axis) -> Tensor:
    """float32 [1] or [C] on x's device."""
    if isinstance(scale, Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"{op}: scale must be a floating tensor, got {scale.dtype}")
        V.check_same_device(op, x, scale=scale)
        V.check_qparam_shape(op, "scale", scale, x, axis)
        V.check_scale_values(op, scale)
        return scale.detach().to(torch.float32).reshape(-1).contiguous()
    if axis is not None:
        raise TypeError(f"{op}: scale must be a tensor of x.size({axis}) elements for "
                        f"per-channel fake quantization, got {type(scale).__name__}")
    v = V.check_positive_finite(op, "scale", scale)
    return _scalar_tensor(v, torch.float32, x.device)


def _zero_point_tensor(op: str, zero_point, x: Tensor, axis, qmin: int, qmax: int) -> Tensor:
    """int32 [1] or [C] on x's device."""
    if isinstance(zero_point, Tensor):
        if zero_point.dtype == torch.bool or zero_point.is_complex():
            raise TypeError(f"{op}: zero_point must be an integer or floating tensor, "
                            f"got {zero_point.dtype}")
        V.check_same_device(op, x, zero_point=zero_point)
        V.check_qparam_shape(op, "zero_point", zero_point, x, axis)
        zp = zero_point.detach()
        if zp.is_floating_point():
            zp = torch.round(zp)
        V.check_zero_point_values(op, zp, qmin, qmax)
        return zp.to(torch.int32).reshape(-1).contiguous()
    if axis is not None:
        raise TypeError(f"{op}: zero_point must be a tensor of x.size({axis}) elements for "
                        f"per-channel fake quantization, got {type(zero_point).__name__}")
    z = V.check_int(op, "zero_point", zero_point)
    if not qmin <= z <= qmax:
        raise ValueError(f"{op}: zero_point ({z}) must be within [quant_min, quant_max] "
                         f"= [{qmin}, {qmax}]")
    return _scalar_tensor(z, torch.int32, x.device)


def fake_quantize(x: Tensor, scale, zero_point, quant_min: int, quant_max: int, axis=None,
                  ste: str = "clipped") -> Tensor:
    """Fake-quantize x: (clamp(rne(x / scale) + zero_point) - zero_point) * scale.

    scale/zero_point: Python numbers or 0-d/1-d tensors (per-tensor when axis is None, else one
    per x.size(axis)). ste: "clipped" (gradient masked outside the range, like torch) or
    "pure" (identity, as GDFQ). Gradients flow to x only.
    """
    op = "fake_quantize"
    _check_x(op, x)
    qmin, qmax = V.check_qrange(op, quant_min, quant_max)
    axis = V.normalize_axis(op, axis, x.dim())
    V.check_ste(op, ste)
    s = _scale_tensor(op, scale, x, axis)
    zp = _zero_point_tensor(op, zero_point, x, axis, qmin, qmax)
    x = _dense(x)
    save_mask = _wants_mask(x, ste)
    axis = -1 if axis is None else axis
    out, _ = ops.fake_quant(x, s, zp, qmin, qmax, axis, save_mask, ops.byte_mask(x, save_mask),
                            ops.conv_weight_channels_last(x, axis))
    return out


def fake_quantize_learnable(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                            quant_max: int, axis=None, grad_factor: float = 1.0) -> Tensor:
    """LSQ fake quant, differentiable w.r.t. x, scale and zero_point (float tensors): forward
    and backward of torch._fake_quantize_learnable_per_{tensor,channel}_affine, including
    their rounding and clamping of the float zero point."""
    op = "fake_quantize_learnable"
    _check_x(op, x)
    qmin, qmax = V.check_qrange(op, quant_min, quant_max)
    axis = V.normalize_axis(op, axis, x.dim())
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{op}: {name} must be a floating tensor, got {got}")
        V.check_same_device(op, x, **{name: t})
        V.check_qparam_shape(op, name, t, x, axis)
    V.check_scale_values(op, scale)
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, numbers.Real):
        raise TypeError(f"{op}: grad_factor must be a real number, "
                        f"got {type(grad_factor).__name__}")
    if not math.isfinite(grad_factor):
        raise ValueError(f"{op}: grad_factor ({grad_factor}) must be finite")
    x = _dense(x)
    return ops.fake_quant_learnable(x, scale, zero_point, qmin, qmax,
                                    -1 if axis is None else axis, float(grad_factor))


def fake_quantize_minmax(x: Tensor, quant_min: int, quant_max: int, axis=None,
                         symmetric: bool = False, eps: float = _EPS, ste: str = "clipped"):
    """Per-step min/max observer fused with fake quant: (out, scale, zero_point).

    qparams follow torch.ao's MinMaxObserver / PerChannelMinMaxObserver (reduce_range=False,
    affine or symmetric; a symmetric unsigned range takes the midpoint (quant_min + quant_max)
    // 2 as zero point, a signed one 0). scale/zero_point are returned detached (float32 and
    int32, shape [C] or [1]).
    """
    op = "fake_quantize_minmax"
    _check_x(op, x)
    qmin, qmax = V.check_qrange(op, quant_min, quant_max)
    axis = V.normalize_axis(op, axis, x.dim())
    V.check_bool(op, "symmetric", symmetric)
    eps = V.check_positive_finite(op, "eps", eps)
    V.check_ste(op, ste)
    x = _dense(x)
    save_mask = _wants_mask(x, ste)
    out, _, scale, zp = ops.fake_quant_minmax(x, -1 if axis is None else axis, qmin, qmax,
                                              symmetric, eps, save_mask,
                                              ops.byte_mask(x, save_mask))
    return out, scale.detach(), zp.detach()


def _check_buffer(op: str, name: str, t, dtype, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be a {dtype} tensor, got {t.dtype}")
    V.check_same_device(op, x, **{name: t})
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{op}: {name} must hold one value (shape [] or [1]), "
                         f"got shape {tuple(t.shape)}")


def fake_quantize_moving_average(x: Tensor, min_val: Tensor, max_val: Tensor, scale: Tensor,
                                 zero_point: Tensor, quant_min: int, quant_max: int,
                                 averaging_constant: float = 0.01, symmetric: bool = False,
                                 eps: float = _EPS, observe: bool = True,
                                 ste: str = "clipped") -> Tensor:
    """Per-tensor MovingAverageMinMaxObserver update + qparams + fake quant in one op.

    When observe, min_val/max_val (float32) are updated as torch.ao does (the first call,
    min_val = +inf and max_val = -inf, takes the batch range) and scale (float32) /
    zero_point (int32) recomputed, all in place on the device, without a host sync; then x is
    fake-quantized with the new qparams. When not observe, the buffers are only read. An empty
    x leaves the buffers untouched.
    """
    op = "fake_quantize_moving_average"
    _check_x(op, x)
    qmin, qmax = V.check_qrange(op, quant_min, quant_max)
    _check_buffer(op, "min_val", min_val, torch.float32, x)
    _check_buffer(op, "max_val", max_val, torch.float32, x)
    _check_buffer(op, "scale", scale, torch.float32, x)
    _check_buffer(op, "zero_point", zero_point, torch.int32, x)
    if isinstance(averaging_constant, bool) or not isinstance(averaging_constant, numbers.Real):
        raise TypeError(f"{op}: averaging_constant must be a real number, "
                        f"got {type(averaging_constant).__name__}")
    if not 0.0 <= float(averaging_constant) <= 1.0:
        raise ValueError(f"{op}: averaging_constant ({averaging_constant}) must be in [0, 1]")
    V.check_bool(op, "symmetric", symmetric)
    eps = V.check_positive_finite(op, "eps", eps)
    V.check_bool(op, "observe", observe)
    V.check_ste(op, ste)
    if not observe:
        V.check_scale_values(op, scale)
        V.check_zero_point_values(op, zero_point, qmin, qmax)
    x = _dense(x)
    # the contract's buffers are [1] (0-d observer buffers are viewed, not copied)
    out, _ = ops.MovingAverageFakeQuant.apply(
        x, min_val, max_val, scale.view(1), zero_point.view(1), float(averaging_constant),
        qmin, qmax, symmetric, eps, observe, _wants_mask(x, ste))
    return out
