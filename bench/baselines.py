"""The pure-PyTorch baselines every benchmark is measured against: eager compositions written the
way GDFQ-style code writes them (one kernel per elementwise/reduction step, a custom
autograd.Function for the straight-through estimator, per-layer statistics).

These are deliberately *not* acq_kernels' reference backend: they are what a user has before
adopting the library. They take and return plain tensors so that torch.compile can trace them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Fake quantization
# --------------------------------------------------------------------------------------------
class _RoundClampSTE(torch.autograd.Function):
    """round/clamp/dequantize with a straight-through gradient: "pure" passes the gradient
    unchanged (GDFQ), "clipped" zeroes it where x/scale+zp falls outside [qmin, qmax] (PyTorch)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, ste):
        q = torch.round(x / scale) + zero_point
        out = (torch.clamp(q, quant_min, quant_max) - zero_point) * scale
        ctx.ste = ste
        if ste == "clipped":
            ctx.save_for_backward((q >= quant_min) & (q <= quant_max))
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.ste == "clipped":
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None, None


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis) -> torch.Tensor:
    if axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.view(shape)


def fake_quantize(x, scale, zero_point, quant_min: int, quant_max: int, axis=None, ste="clipped"):
    return _RoundClampSTE.apply(x, _broadcast(scale, x, axis), _broadcast(zero_point.float(), x, axis),
                                quant_min, quant_max, ste)


def minmax_qparams(min_val, max_val, quant_min: int, quant_max: int, eps: float = torch.finfo(torch.float32).eps):
    """Asymmetric scale/zero point from a range (torch.ao's _calculate_qparams rule)."""
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=eps)
    zero_point = torch.clamp(quant_min - torch.round(min_neg / scale), quant_min, quant_max)
    return scale, zero_point


def fake_quantize_minmax(x, quant_min: int, quant_max: int, axis=None, ste="clipped"):
    """Range from this tensor (per tensor, or per channel along `axis`), then fake quantize:
    GDFQ's weight quantizer (x.min()/x.max() reductions, then the composite)."""
    with torch.no_grad():
        if axis is None:
            mn, mx = x.min(), x.max()
        else:
            flat = x.detach().transpose(0, axis).reshape(x.shape[axis], -1)
            mn, mx = flat.min(1).values, flat.max(1).values
        scale, zp = minmax_qparams(mn, mx, quant_min, quant_max)
    return fake_quantize(x, scale, zp, quant_min, quant_max, axis, ste)


def fake_quantize_moving_average(x, min_val, max_val, scale, zero_point, quant_min: int, quant_max: int,
                                 averaging_constant: float = 0.01, ste="clipped"):
    """Activation quantizer with an EMA range observer (torch.ao MovingAverageMinMaxObserver +
    FakeQuantize semantics, eager): updates min_val/max_val/scale/zero_point in place."""
    with torch.no_grad():
        mn, mx = x.min(), x.max()
        min_val.add_(averaging_constant * (mn - min_val))
        max_val.add_(averaging_constant * (mx - max_val))
        s, zp = minmax_qparams(min_val, max_val, quant_min, quant_max)
        scale.copy_(s)
        zero_point.copy_(zp)
    return fake_quantize(x, scale, zero_point, quant_min, quant_max, None, ste)


def fake_quantize_learnable(x, scale, zero_point, quant_min: int, quant_max: int, grad_factor: float = 1.0):
    """LSQ (Esser et al.) written as in its reference code: gradient scaling and rounding through
    detach() tricks, learnable scale and (rounded) zero point."""
    s = scale * grad_factor + (scale - scale * grad_factor).detach()
    zp = zero_point * grad_factor + (zero_point - zero_point * grad_factor).detach()
    zp = zp + (torch.clamp(torch.round(zp), quant_min, quant_max) - zp).detach()
    v = torch.clamp(x / s + zp, quant_min, quant_max)
    v = v + (torch.round(v) - v).detach()
    return (v - zp) * s


# --------------------------------------------------------------------------------------------
# Attention maps (ACQ spec: A = mean_c F^p, a = A / ||A||, center of A as a distribution)
# --------------------------------------------------------------------------------------------
def spatial_attention(feat, p: int = 2):
    n, _, h, w = feat.shape
    amap = feat.pow(p).mean(1) if p % 2 == 0 else feat.abs().pow(p).mean(1)
    anorm = F.normalize(amap.flatten(1), dim=1)
    prob = amap / amap.sum((1, 2), keepdim=True)
    u = (2 * torch.arange(w, device=feat.device, dtype=amap.dtype) + 1) / w - 1
    v = (2 * torch.arange(h, device=feat.device, dtype=amap.dtype) + 1) / h - 1
    center = torch.stack([(prob.sum(1) * u).sum(-1), (prob.sum(2) * v).sum(-1)], dim=-1)
    return amap, anorm, center


# --------------------------------------------------------------------------------------------
# BN statistics (GDFQ's forward-hook loss, one layer at a time)
# --------------------------------------------------------------------------------------------
def bn_stats(tensors):
    out = []
    for x in tensors:
        c = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([c, -1]).var(1, unbiased=False)
        out.append((mean, var))
    return out


def bns_loss(tensors, running_means, running_vars):
    per_layer = [F.mse_loss(m, rm) + F.mse_loss(v, rv)
                 for (m, v), rm, rv in zip(bn_stats(tensors), running_means, running_vars)]
    return sum(per_layer) / len(per_layer), torch.stack(per_layer).detach()  # logging only
