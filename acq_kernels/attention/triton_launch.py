"""Host-side launchers of the Triton attention kernels (shapes already validated).

Each runs under a device guard (Triton launches on the current CUDA device). Offsets within
one sample are 32-bit (checked); the sample index is 64-bit in the kernels. FP fusion is set
explicitly (Triton 3.10 changes its default): FMA contraction is allowed, the results are
tolerance-tested against the reference.
"""
from __future__ import annotations

import torch
import triton

from .._launch_guard import triton_launcher
from . import triton_kernels as tk
from .layout import grad_layout, input_layout

_INT32_MAX = 2**31 - 1
_LAUNCH = {"num_warps": 4, "enable_fp_fusion": tk.ENABLE_FP_FUSION}


def _check_int32(t: torch.Tensor, name: str):
    # In-kernel offsets are int32 except the per-sample base; refuse rather than overflow.
    span = sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:]))
    if t.numel() and span > _INT32_MAX:
        raise ValueError(f"{name}: one sample spans more than 2^31 elements")


@triton_launcher
def map_forward(feat: torch.Tensor, p: float):
    """(amap, anorm, center, amap32 [N, HW] fp32, stats [N, 4] fp32)."""
    x, lay = input_layout(feat)
    _check_int32(x, "feat")
    N, C, H, W = x.shape
    HW = H * W
    dev, dt = x.device, x.dtype
    a32 = torch.empty((N, HW), device=dev, dtype=torch.float32)
    amap = torch.empty((N, H, W), device=dev, dtype=dt)
    anorm = torch.empty((N, HW), device=dev, dtype=dt)
    center = torch.empty((N, 2), device=dev, dtype=dt)
    stats = torch.empty((N, 4), device=dev, dtype=torch.float32)
    if N == 0:
        return amap, anorm, center, a32, stats
    plane = None if lay.channels_last else tk.plane_geometry(
        x.element_size(), N, C, HW, lay.stride_c, lay.stride_n)
    if plane is not None:
        _plane_forward(x, lay, plane, p, a32, amap, anorm, center, stats)
        return amap, anorm, center, a32, stats
    bc, bhw = tk.map_blocks(C, HW, lay.channels_last)
    n_hw = triton.cdiv(HW, bhw)
    fused = n_hw == 1
    cl = lay.channels_last
    v = tk.vec_units(x.element_size(), *((C, lay.stride_n, lay.stride_s) if cl
                                         else (HW, lay.stride_n, lay.stride_c)))
    # the contiguous axis' size and the strides across it in units of v (see tk.vec_units)
    vc, vs = (v, 1) if cl else (1, v)
    tk._attn_map_kernel[(N * n_hw,)](
        x, a32, amap, anorm, center, stats, C // vc, HW // vs, H, W,
        lay.stride_n // v, lay.stride_c // vs, lay.stride_s // vc, n_hw, float(p),
        CHANNELS_LAST=lay.channels_last, P_IS_TWO=(p == 2), FINALIZE=fused,
        BLOCK_C=bc, BLOCK_HW=bhw, VEC=v, **_LAUNCH)
    if not fused:
        tk._attn_finalize_kernel[(N,)](a32, a32, amap, anorm, center, stats, C, H, W, G=0,
                                       BLOCK=min(1024, triton.next_power_of_2(HW)), **_LAUNCH)
    return amap, anorm, center, a32, stats


def _plane_rows(C: int, HW: int, G: int):
    """(R, T): full rows of G channels, and the elements of the partial row (C % G channels)."""
    return C // G, (C % G) * HW


def _plane_forward(x, lay, plane, p, a32, amap, anorm, center, stats):
    """NCHW with H*W not a multiple of the vector: the [rows, G*HW] plane kernels (see
    tk._attn_map_plane_kernel), in place finalized when one program covers the columns."""
    N, C, H, W = x.shape
    HW = H * W
    vec, G = plane
    ghw = G * HW
    R, T = _plane_rows(C, HW, G)
    br, bj = tk.plane_blocks(ghw)
    n_jb = triton.cdiv(ghw, bj)
    fused = n_jb == 1
    col = torch.empty((N, ghw), device=x.device, dtype=torch.float32)
    tk._attn_map_plane_kernel[(N * n_jb,)](
        x, col, a32, amap, anorm, center, stats, C, HW, H, W, R, T, ghw // vec,
        lay.stride_n // vec, n_jb, float(p), P_IS_TWO=(p == 2),
        FINALIZE=fused, G=G, BLOCK_R=br, BLOCK_J=bj,
        BLOCK_HW=triton.next_power_of_2(HW) if fused else 1,  # only the in-place finalize's
        VEC=vec, **_LAUNCH)
    if not fused:
        tk._attn_finalize_kernel[(N,)](a32, col, amap, anorm, center, stats, C, H, W, G=G,
                                       BLOCK=min(1024, triton.next_power_of_2(HW)), **_LAUNCH)


@triton_launcher
def feat_backward(feat: torch.Tensor, dA: torch.Tensor, p: float, out: torch.Tensor):
    """Writes dF into `out` (allocated with layout.empty_grad(feat))."""
    x, lay = input_layout(feat)
    _check_int32(x, "feat")
    N, C, H, W = x.shape
    HW = H * W
    if out.numel() == 0:
        return out
    glay = grad_layout(feat)
    assert glay.channels_last == lay.channels_last
    dA = dA.to(torch.float32).contiguous()
    scale = 2.0 / C if p == 2 else float(p) / C
    plane = None if lay.channels_last else tk.plane_geometry(
        x.element_size(), N, C, HW, lay.stride_c, lay.stride_n, glay.stride_n)
    if plane is not None and C // plane[1] > 65535:  # grid axis 1 (row blocks of >= 2 rows)
        plane = None
    if plane is not None:
        vec, G = plane
        ghw = G * HW
        R, T = _plane_rows(C, HW, G)
        assert T == 0  # dF is contiguous and its samples aligned: whole rows
        br, bj = tk.plane_blocks(ghw)
        n_jb = triton.cdiv(ghw, bj)
        tk._attn_feat_grad_plane_kernel[(N * n_jb, triton.cdiv(R, br))](
            x, dA, out, HW, R, ghw // vec, lay.stride_n // vec, glay.stride_n // vec, n_jb,
            scale, float(p) - 1.0, P_IS_TWO=(p == 2), BLOCK_R=br, BLOCK_J=bj, VEC=vec, **_LAUNCH)
        return out
    bc, bhw = tk.grad_blocks(C, HW, lay.channels_last)
    n_hw = triton.cdiv(HW, bhw)
    cl = lay.channels_last
    v = tk.vec_units(x.element_size(),
                     *((C, lay.stride_n, lay.stride_s, glay.stride_n, glay.stride_s) if cl
                       else (HW, lay.stride_n, lay.stride_c, glay.stride_n, glay.stride_c)))
    vc, vs = (v, 1) if cl else (1, v)
    tk._attn_feat_grad_kernel[(N * n_hw, triton.cdiv(C, bc))](
        x, dA, out, C // vc, HW // vs, lay.stride_n // v, lay.stride_c // vs,
        lay.stride_s // vc, glay.stride_n // v, glay.stride_c // vs, glay.stride_s // vc, n_hw,
        scale, float(p) - 1.0,
        CHANNELS_LAST=lay.channels_last, P_IS_TWO=(p == 2), BLOCK_C=bc, BLOCK_HW=bhw, VEC=v,
        **_LAUNCH)
    return out


@triton_launcher
def map_grad(a32, stats, H, W, grad_amap, grad_anorm, grad_center):
    """dL/dA [N, HW] fp32 from the output grads (None: no grad), one small launch."""
    N, HW = a32.shape
    dA = torch.empty((N, HW), device=a32.device, dtype=torch.float32)
    if N == 0:
        return dA
    a32 = a32.contiguous()

    def arg(g, cols):  # expanded grads (from .sum()) become real [N, cols] rows
        return None if g is None else g.reshape(N, cols).contiguous()

    ga, gn, gc = arg(grad_amap, HW), arg(grad_anorm, HW), arg(grad_center, 2)
    tk._attn_map_grad_kernel[(N,)](
        a32, stats.contiguous(), ga if ga is not None else dA, gn if gn is not None else dA,
        gc if gc is not None else dA, dA, H, W, HAS_GA=ga is not None, HAS_GN=gn is not None,
        HAS_GC=gc is not None, BLOCK=min(1024, triton.next_power_of_2(HW)), **_LAUNCH)
    return dA


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_launcher
def pair_sq_dist(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Per-row squared distance [N] fp32; b None: a is [2N, K] and its halves are compared."""
    a = _rows(a)
    N = a.shape[0] // 2 if b is None else a.shape[0]
    K = a.shape[1]
    out = torch.empty(N, device=a.device, dtype=torch.float32)
    if N == 0:
        return out
    if b is None:
        b_view, sb = a[N:], a.stride(0)
    else:
        b_view = _rows(b)
        sb = b_view.stride(0)
    tk._pair_sq_dist_fwd_kernel[(N,)](a, b_view, out, K, a.stride(0), sb,
                                      BLOCK=min(1024, triton.next_power_of_2(max(K, 1))), **_LAUNCH)
    return out


@triton_launcher
def pair_sq_dist_backward(a, b, g, want_b: bool):
    """(ga, gb) with ga = 2 (a - b) g, gb = -ga; b None: ga is for the stacked [2N, K] a."""
    a = _rows(a)
    K = a.shape[1]
    g = g.to(torch.float32).contiguous()
    block = min(1024, triton.next_power_of_2(max(K, 1)))
    if b is None:
        N = a.shape[0] // 2
        ga = torch.empty_like(a, memory_format=torch.contiguous_format)
        if N:
            tk._pair_sq_dist_bwd_kernel[(N,)](a, a[N:], g, ga, ga[N:], K, a.stride(0),
                                              a.stride(0), ga.stride(0), ga.stride(0),
                                              WRITE_A=True, WRITE_B=True, BLOCK=block, **_LAUNCH)
        return ga, a.new_empty(0)
    b = _rows(b)
    N = a.shape[0]
    ga = torch.empty_like(a, memory_format=torch.contiguous_format)
    gb = (torch.empty_like(b, memory_format=torch.contiguous_format) if want_b
          else b.new_empty(0))
    if N:
        tk._pair_sq_dist_bwd_kernel[(N,)](a, b, g, ga, gb if want_b else ga, K, a.stride(0),
                                          b.stride(0), ga.stride(0),
                                          gb.stride(0) if want_b else 0,
                                          WRITE_A=True, WRITE_B=want_b, BLOCK=block, **_LAUNCH)
    return ga, gb
