"""Plain-PyTorch spatial attention: the oracle of every test and the benchmark baseline.

Definitions (shared by every backend, see ../../../shared/ACQ_SPEC.md):
  A[n, h, w]  = mean_c |F[n, c, h, w]|^p            (computed in fp32; float64 stays float64)
  anorm[n]    = vec(A[n]) / max(||vec(A[n])||_2, EPS)   (EPS = 1e-12, F.normalize's default)
  center[n]   = sum_hw A * (u_w, v_h) / sum_hw A, u_w = (2w + 1) / W - 1, v_h = (2h + 1) / H - 1
Degenerate maps: an all-zero A gives anorm = 0 and center = (0, 0) with zero gradient; NaN in F
propagates to all three outputs.

Gradient of |F|^p: p * |F|^(p-1) * sign(F), taken as 0 at F == 0 for every p (exact for p > 1, the
zero subgradient for p == 1, and for p < 1, where the true derivative is unbounded, a finite
choice so that one exactly-zero activation cannot poison training with Inf/NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # clamp of the L2 norm in the normalisation; the same constant in every backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pixel_coords(H: int, W: int, device, dtype=torch.float32):
    """Pixel-center coordinates (u over w, v over h), each flattened to [H*W] in h-major order."""
    u = (2 * torch.arange(W, device=device, dtype=dtype) + 1) / W - 1
    v = (2 * torch.arange(H, device=device, dtype=dtype) + 1) / H - 1
    return u.repeat(H), v.repeat_interleave(W)


def power_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """mean over channels of |F|^p, in the compute dtype, shape [N, H, W]."""
    x = feat.to(compute_dtype(feat.dtype))
    if p == 2:
        return x.pow(2).mean(1)
    return x.abs().pow(p).mean(1)


def finalize(amap: torch.Tensor):
    """(anorm [N, HW], center [N, 2]) from the compute-dtype map [N, H, W]; differentiable."""
    N, H, W = amap.shape
    flat = amap.reshape(N, H * W)
    anorm = F.normalize(flat, dim=1, eps=EPS)
    u, v = pixel_coords(H, W, amap.device, amap.dtype)
    s = flat.sum(1, keepdim=True)
    zero = s == 0
    # A safe denominator keeps the backward of the masked branch free of 0/0.
    s_safe = torch.where(zero, torch.ones_like(s), s)
    cen = torch.cat([(flat * u).sum(1, keepdim=True), (flat * v).sum(1, keepdim=True)], 1) / s_safe
    center = torch.where(zero, torch.zeros_like(cen), cen)
    return anorm, center


def spatial_attention_reference(feat: torch.Tensor, p: float = 2.0):
    """(amap [N,H,W], anorm [N,H*W], center [N,2]) in feat's dtype; differentiable by autograd.

    This is the eager baseline (several passes over F). Its autograd gradient matches the library's
    except at F == 0 with p < 1, where autograd yields NaN and the library 0 (see module doc).
    """
    amap = power_map(feat, p)
    anorm, center = finalize(amap)
    dt = feat.dtype
    return amap.to(dt), anorm.to(dt), center.to(dt)


# ---- pieces of the explicit backward (shared by every backend; [N, HW]-sized work only) ----

def map_grad(amap32, stats, H, W, grad_amap, grad_anorm, grad_center):
    """dL/dA [N, H*W] in the compute dtype from the grads of the three outputs (any may be None).

    amap32: the compute-dtype map [N, H*W]; stats: [N, 4] = (||A||_2, sum A, cx, cy).
    """
    N, HW = amap32.shape
    dA = torch.zeros_like(amap32)
    if grad_amap is not None:
        dA = dA + grad_amap.reshape(N, HW).to(amap32.dtype)
    if grad_anorm is not None:
        g = grad_anorm.reshape(N, HW).to(amap32.dtype)
        norm = stats[:, 0:1]
        active = norm >= EPS  # F.normalize's clamp_min passes the gradient where norm >= eps
        denom = torch.where(active, norm, torch.full_like(norm, EPS))
        an = amap32 / denom
        proj = torch.where(active, (an * g).sum(1, keepdim=True), torch.zeros_like(norm))
        dA = dA + (g - an * proj) / denom
    if grad_center is not None:
        g = grad_center.to(amap32.dtype)
        s = stats[:, 1:2]
        u, v = pixel_coords(H, W, amap32.device, amap32.dtype)
        zero = s == 0
        s_safe = torch.where(zero, torch.ones_like(s), s)
        term = (g[:, 0:1] * (u - stats[:, 2:3]) + g[:, 1:2] * (v - stats[:, 3:4])) / s_safe
        dA = dA + torch.where(zero, torch.zeros_like(term), term)
    return dA


def feat_grad(feat: torch.Tensor, dA: torch.Tensor, p: float) -> torch.Tensor:
    """dF = dA[n, h, w] * p |F|^(p-1) sign(F) / C (0 at F == 0), in feat's dtype and layout."""
    N, C, H, W = feat.shape
    x = feat.to(dA.dtype)
    d = dA.reshape(N, 1, H, W)
    if p == 2:
        g = x * (2.0 / C)
    else:
        g = torch.where(x == 0, torch.zeros_like(x), x.sign() * x.abs().pow(p - 1) * (p / C))
    return (d * g).to(feat.dtype)


def forward_with_stats(feat: torch.Tensor, p: float):
    """The reference backend's forward: (amap, anorm, center) in feat's dtype, plus what the
    backward needs: the compute-dtype map [N, H*W] and stats [N, 4] = (||A||_2, sum A, cx, cy)."""
    N, C, H, W = feat.shape
    amap = power_map(feat, p)
    anorm, center = finalize(amap)
    flat = amap.reshape(N, H * W)
    stats = torch.cat([torch.linalg.vector_norm(flat, dim=1, keepdim=True),
                       flat.sum(1, keepdim=True), center], 1)
    dt = feat.dtype
    # copy=True: custom-op outputs may not alias each other (flat is a view of amap).
    return amap.to(dt, copy=True), anorm.to(dt), center.to(dt), flat, stats


def pair_sq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ||a - b||_2^2 in the compute dtype, [N]; a, b [N, K]."""
    dt = compute_dtype(a.dtype)
    return (a.to(dt) - b.to(dt)).pow(2).sum(1)
