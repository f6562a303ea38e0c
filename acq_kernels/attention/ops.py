"""Public spatial-attention ops: validation, torch.library registration, per-call dispatch.

Each op is a torch.library custom op (so torch.compile/export trace it without graph breaks)
whose implementation asks the dispatch seam for a backend on every call:
  acq_kernels::attention_map_fwd   F -> (amap, anorm, center, fp32 map, stats); one read of F
  acq_kernels::attention_map_bwd   (F, saved map/stats, output grads) -> dF; dL/dA in one
                                   pass over [N, HW], then one read of F and one write of dF
  acq_kernels::attention_pair_sq   (a, b | stacked a) -> per-sample ||a - b||^2 (fp32)
  acq_kernels::attention_pair_sq_bwd
dL/dA ([N, HW], C times smaller than F) is assembled from the grads of the three outputs by
each backend (reference.map_grad is the torch formula).

Backends: spatial_attention has reference / triton / cpu / cuda kernels. The pair losses have
reference / triton kernels; on the cpu and cuda backends they run the reference (torch) code,
which is a handful of launches over [N, HW] maps. float64 runs on reference and cpu only.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _extension
from . import reference as ref
from .layout import empty_grad

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _backends(dtype):
    """Backends implementing this family for `dtype` (the GPU kernels compute in fp32 only)."""
    return ("reference", "cpu") if dtype == torch.float64 else ("reference", "triton", "cpu",
                                                                "cuda")


# ------------------------------------------------------------------ validation

def _check_float_tensor(t, name: str):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_feat(feat, p):
    _check_float_tensor(feat, "feat")
    if feat.dim() != 4:
        raise ValueError(f"feat must be [N, C, H, W] (rank 4), got shape {tuple(feat.shape)}")
    N, C, H, W = feat.shape
    if C == 0 or H == 0 or W == 0:
        raise ValueError(f"feat needs C, H, W >= 1, got shape {tuple(feat.shape)}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real):  # numpy scalars are Real too
        raise TypeError(f"p must be a real number, got {type(p).__name__}")
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"p must be a finite number > 0, got {p}")
    return float(p)


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _flat_pair(a, b, a_name="a", b_name="b"):
    """Validated [rows, K] views of a (and b); b None means a holds two stacked halves."""
    _check_float_tensor(a, a_name)
    if a.dim() < 2:
        raise ValueError(f"{a_name} must be [N, ...] with at least 2 dims, got {tuple(a.shape)}")
    a2 = a.flatten(1)  # not reshape(N, -1): that is ambiguous for an empty batch
    if b is None:
        if a.shape[0] % 2:
            raise ValueError(f"{a_name} must have an even first dim (stacked halves) when "
                             f"{b_name} is None, got {a.shape[0]}")
        return a2, None
    _check_float_tensor(b, b_name)
    if b.shape != a.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"{b_name} is on {b.device}, {a_name} on {a.device}")
    return a2, b.flatten(1)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


# ------------------------------------------------------------------ spatial attention op

def _ext_ops():
    return _extension.ops()


@torch.library.custom_op("acq_kernels::attention_map_fwd", mutates_args=())
def _map_fwd(feat: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    backend = _backend.select(feat.device, _backends(feat.dtype), op="spatial_attention")
    if backend == "triton":
        from . import triton_launch
        return triton_launch.map_forward(feat, p)
    if backend in ("cpu", "cuda"):
        return tuple(_ext_ops().attention_map_fwd(feat, p))
    with torch.no_grad():
        return ref.forward_with_stats(feat, p)


@_map_fwd.register_fake
def _(feat, p):
    N, C, H, W = feat.shape
    cd = ref.compute_dtype(feat.dtype)
    return (feat.new_empty((N, H, W)), feat.new_empty((N, H * W)), feat.new_empty((N, 2)),
            feat.new_empty((N, H * W), dtype=cd), feat.new_empty((N, 4), dtype=cd))


@torch.library.custom_op("acq_kernels::attention_map_bwd", mutates_args=())
def _map_bwd(feat: Tensor, a32: Tensor, stats: Tensor, grad_amap: Optional[Tensor],
             grad_anorm: Optional[Tensor], grad_center: Optional[Tensor], p: float,
             backend: str = "") -> Tensor:
    """dF from the output grads: dL/dA in one small pass over [N, HW], then one pass over F.
    `backend`: the one the forward used ("" = select now)."""
    backend = backend or _backend.select(feat.device, _backends(feat.dtype),
                                         op="spatial_attention")
    H, W = feat.shape[2:]
    if backend == "triton":
        from . import triton_launch
        dA = triton_launch.map_grad(a32, stats, H, W, grad_amap, grad_anorm, grad_center)
        return triton_launch.feat_backward(feat, dA, p, empty_grad(feat))
    if backend in ("cpu", "cuda"):
        res = _ext_ops().attention_map_bwd(feat, a32, stats, grad_amap, grad_anorm, grad_center,
                                           p)
    else:
        dA = ref.map_grad(a32, stats, H, W, grad_amap, grad_anorm, grad_center)
        res = ref.feat_grad(feat, dA, p)
    out = empty_grad(feat)
    if res.stride() != out.stride():  # only the reference path can differ; keep strides fixed
        out.copy_(res)
        return out
    return res


@_map_bwd.register_fake
def _(feat, a32, stats, grad_amap, grad_anorm, grad_center, p, backend=""):
    return empty_grad(feat)


def _map_setup(ctx, inputs, output):
    feat, p = inputs
    ctx.p = p
    # The backward may run on another thread (autograd's device threads), where a thread-scoped
    # `with set_backend(...)` is not in force: pin the forward's choice.
    ctx.backend = _backend.select(feat.device, _backends(feat.dtype), op="spatial_attention")
    ctx.save_for_backward(feat, output[3], output[4])


def _map_backward(ctx, g_amap, g_anorm, g_center, _g_a32, _g_stats):
    feat, a32, stats = ctx.saved_tensors
    return _map_bwd(feat, a32, stats, g_amap, g_anorm, g_center, ctx.p, ctx.backend), None


_map_fwd.register_autograd(_map_backward, setup_context=_map_setup)


def spatial_attention(feat: Tensor, p: float = 2):
    """Spatial attention of a feature map F [N, C, H, W] (contiguous, strided or channels_last;
    fp32/fp16/bf16, float64 on the reference/cpu backends), from one read of F.

    feat: the feature map F [N, C, H, W].
    p: the exponent of |F|^p (a positive finite real; 2 is the usual choice).

    Returns, in F's dtype (computed in fp32):
      amap   [N, H, W]  A = mean over channels of |F|^p
      anorm  [N, H*W]   vec(A) / max(||vec(A)||_2, 1e-12)
      center [N, 2]     (x, y) = sum A * (u_w, v_h) / sum A with pixel-center coordinates in
                        [-1, 1]; (0, 0) with zero gradient for an all-zero map.
    The gradient of |F|^p is taken as 0 at F == 0 for every p (for p < 1 the true derivative
    is unbounded there). NaN in F propagates to all outputs.
    """
    p = _check_feat(feat, p)
    amap, anorm, center, _, _ = _map_fwd(feat, p)
    return amap, anorm, center


# ------------------------------------------------------------------ pair squared distance op

@torch.library.custom_op("acq_kernels::attention_pair_sq", mutates_args=())
def _pair_sq(a: Tensor, b: Optional[Tensor]) -> Tensor:
    backend = _backend.select(a.device, _backends(a.dtype), op="attention_pair_sq")
    if backend == "triton":
        from . import triton_launch
        return triton_launch.pair_sq_dist(a, b)
    n = a.shape[0] // 2 if b is None else a.shape[0]
    x, y = (a[:n], a[n:]) if b is None else (a, b)
    return ref.pair_sq_distance(x, y)


@_pair_sq.register_fake
def _(a, b):
    n = a.shape[0] // 2 if b is None else a.shape[0]
    return a.new_empty((n,), dtype=ref.compute_dtype(a.dtype))


@torch.library.custom_op("acq_kernels::attention_pair_sq_bwd", mutates_args=())
def _pair_sq_bwd(a: Tensor, b: Optional[Tensor], g: Tensor, want_b: bool,
                 backend: str = "") -> tuple[Tensor, Tensor]:
    backend = backend or _backend.select(a.device, _backends(a.dtype),
                                         op="attention_pair_sq")
    if backend == "triton":
        from . import triton_launch
        return triton_launch.pair_sq_dist_backward(a, b, g, want_b)
    cd = ref.compute_dtype(a.dtype)
    if b is None:
        n = a.shape[0] // 2
        d = (a[:n].to(cd) - a[n:].to(cd)) * (2 * g.to(cd))[:, None]
        return torch.cat([d, -d]).to(a.dtype), a.new_empty(0)
    d = (a.to(cd) - b.to(cd)) * (2 * g.to(cd))[:, None]
    return d.to(a.dtype), ((-d).to(b.dtype) if want_b else b.new_empty(0))


@_pair_sq_bwd.register_fake
def _(a, b, g, want_b, backend=""):
    ga = torch.empty_like(a, memory_format=torch.contiguous_format)
    if b is None or not want_b:
        return ga, a.new_empty(0) if b is None else b.new_empty(0)
    return ga, torch.empty_like(b, memory_format=torch.contiguous_format)


def _pair_setup(ctx, inputs, output):
    a, b = inputs
    ctx.has_b = b is not None
    ctx.backend = _backend.select(a.device, _backends(a.dtype), op="attention_pair_sq")
    ctx.save_for_backward(a, b)


def _pair_backward(ctx, g):
    a, b = ctx.saved_tensors
    want_b = ctx.has_b and ctx.needs_input_grad[1]
    ga, gb = _pair_sq_bwd(a, b if ctx.has_b else None, g, want_b, ctx.backend)
    return ga, (gb if want_b else None)


_pair_sq.register_autograd(_pair_backward, setup_context=_pair_setup)


def _pair_sq_per_sample(a, b, a_name="a", b_name="b") -> Tensor:
    a2, b2 = _flat_pair(a, b, a_name, b_name)
    return _pair_sq(a2, b2)


def attention_sq_distance(a: Tensor, b: Optional[Tensor] = None, reduction: str = "mean"):
    """Per-sample ||a - b||_2^2 over the flattened maps (attention transfer, eval/train
    consistency), reduced over samples ("mean" | "sum" | "none" -> [N]). b=None: a is a stacked
    [2N, ...] batch and a[:N] is compared with a[N:] in one launch. Returns fp32 (float64 for
    float64 inputs); one read of a and b forward, one read + one write each backward.

    a: attention maps [N, ...] (e.g. spatial_attention's anorm [N, H*W]), or [2N, ...] when b is None.
    b: maps of a's shape, or None.
    reduction: "mean" (a scalar), "sum" (a scalar) or "none" (per sample, [N]).
    """
    _check_reduction(reduction)
    return _reduce(_pair_sq_per_sample(a, b), reduction)


def attention_center_loss(center: Tensor, target: Tensor, reduction: str = "mean"):
    """Per-sample ||center - target||^2 with center, target [N, 2] (attention-center matching).

    center: attention centers [N, 2] (spatial_attention's center, (x, y) in [-1, 1]).
    target: the requested centers [N, 2].
    reduction: "mean" (a scalar), "sum" (a scalar) or "none" (per sample, [N]).
    """
    _check_reduction(reduction)
    _check_float_tensor(center, "center")
    if center.dim() != 2 or center.shape[1] != 2:
        raise ValueError(f"center must be [N, 2], got {tuple(center.shape)}")
    _check_float_tensor(target, "target")
    if target.shape != center.shape:
        raise ValueError(f"target must be [N, 2] like center {tuple(center.shape)}, "
                         f"got {tuple(target.shape)}")
    return _reduce(_pair_sq_per_sample(center, target, "center", "target"), reduction)


def _safe_sqrt(d2: Tensor) -> Tensor:
    # sqrt with a zero (not infinite) gradient at 0, so identical pairs give finite gradients.
    pos = d2 > 0
    return torch.where(pos, torch.where(pos, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))


def attention_pair_distance(a: Tensor, b: Optional[Tensor] = None, reduction: str = "none"):
    """Per-sample ||a - b||_2 (gradient 0 where a == b); b=None: stacked halves. For averaging
    d over several layers before a hinge, as ACQ_SPEC's L_PAIR does.

    a: attention maps [N, ...], or a stacked [2N, ...] batch of pairs (a[i], a[N + i]) when b is None.
    b: maps of a's shape, or None.
    reduction: "none" (per sample, [N]; the default), "mean" or "sum" (a scalar).
    """
    _check_reduction(reduction)
    return _reduce(_safe_sqrt(_pair_sq_per_sample(a, b)), reduction)


def attention_pair_hinge(a: Tensor, b: Optional[Tensor] = None, margin: float = 1.0,
                         reduction: str = "mean"):
    """Per-sample relu(margin - ||a - b||_2) (paired-sample separation); b=None: a is a stacked
    [2N, ...] batch of pairs (a[i], a[N + i]). Gradient 0 where a == b.

    a: attention maps [N, ...] or [2N, ...] (b None).
    b: maps of a's shape, or None.
    margin: the hinge margin (a finite real).
    reduction: "mean" (a scalar), "sum" (a scalar) or "none" (per sample, [N]).
    """
    _check_reduction(reduction)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number, got {type(margin).__name__}")
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    d = _safe_sqrt(_pair_sq_per_sample(a, b))
    return _reduce(torch.relu(margin - d), reduction)


__all__ = ["spatial_attention", "attention_sq_distance", "attention_center_loss",
           "attention_pair_hinge", "attention_pair_distance"]
