"""Launchers of the Triton kernels, with the extension contract's signatures (see reference.py).

Inputs are validated and x is dense (memory order = the order kernels walk). Offsets are
32-bit, including those of the masked-off lanes of the last block (a wrapped, negative offset
would pass the `offs < N` test), so tensors may have at most MAX_NUMEL elements (checked; in
"auto" mode larger tensors go to the CUDA extension, see ops.py). Every grid is 1-D, or has
small second axes (partial programs), within CUDA's limits for any such tensor.
Each launcher runs under a device guard: Triton launches on the current CUDA device.
"""
from __future__ import annotations

import math

import torch
import triton

from .._launch_guard import triton_launcher
from . import triton_kernels as K

_LAUNCH = {"num_warps": K.NUM_WARPS, "enable_fp_fusion": False}


MAX_NUMEL = 2 ** 31 - 1 - max(K.BLOCK, K.RED_BLOCK, K.ROW_BLOCK_MAX)


def _check_size(n: int):
    if n > MAX_NUMEL:
        raise ValueError(f"fake_quantize: the triton backend supports tensors of at most "
                         f"{MAX_NUMEL} elements (32-bit offsets), got {n}")


def _recip(device: torch.device) -> bool:
    """Whether torch computes tensor / Python float as a multiply by the fp32 reciprocal on
    this device (CUDA does; CPU, where the interpreter runs, divides): the qparams follow."""
    return device.type == "cuda"


def _mask_buffer(n: int, save_mask: bool, device) -> torch.Tensor:
    return torch.empty((n + 7) // 8 if save_mask else 0, dtype=torch.uint8, device=device)


def _channel_geometry(x: torch.Tensor, axis: int) -> tuple[int, int]:
    """(CH_STRIDE, NUM_CH): channel of memory offset o is (o // CH_STRIDE) % NUM_CH."""
    if axis < 0 or x.size(axis) == 1:  # one channel: a size-1 dim's stride is arbitrary
        return max(x.numel(), 1), 1
    return x.stride(axis), x.size(axis)


@triton_launcher
def fq_forward(x, scale, zero_point, quant_min, quant_max, axis, save_mask):
    n = x.numel()
    _check_size(n)
    out = torch.empty_like(x)
    mask = _mask_buffer(n, save_mask, x.device)
    if n == 0:
        return out, mask
    cs, nc = _channel_geometry(x, axis)
    per_channel = axis >= 0 and nc > 1
    w = nc * cs  # the channel period in memory
    if per_channel and cs < K.BLOCK and (w % 8 == 0 or not save_mask):
        # short channel runs: [rows, period] tiles with per-column qparams
        bw = min(triton.next_power_of_2(w), K.PERIOD_BLOCK_W)
        br = max(1, min(K.BLOCK // bw, triton.next_power_of_2(n // w)))
        n_wb = triton.cdiv(w, bw)
        vec = _vec_units(x, w)
        K.fq_forward_period_kernel[(triton.cdiv(n // w, br) * n_wb,)](
            x, out, mask if save_mask else out, scale, zero_point, n // w, w // vec, cs, n_wb,
            float(quant_min), float(quant_max), SAVE_MASK=save_mask, BLOCK_R=br, BLOCK_W=bw,
            VEC=vec, **_LAUNCH)
        return out, mask
    K.fq_forward_kernel[(triton.cdiv(n, K.BLOCK),)](
        x, out, mask if save_mask else out, scale, zero_point, n, cs, nc, float(quant_min),
        float(quant_max), PER_CHANNEL=per_channel, SPAN2=per_channel and cs >= K.BLOCK,
        SAVE_MASK=save_mask, BLOCK=K.BLOCK, **_LAUNCH)
    return out, mask


@triton_launcher
def fq_mask_backward(grad, mask):
    n = grad.numel()
    _check_size(n)
    out = torch.empty_like(grad)
    if n == 0:
        return out
    K.fq_mask_backward_kernel[(triton.cdiv(n, K.BLOCK),)](grad, mask, out, n, BLOCK=K.BLOCK,
                                                          **_LAUNCH)
    return out


def _channel_innermost(cs: int, nc: int) -> bool:
    """Channels are the contiguous axis (channels_last axis 1, [N, C] axis 1): per-channel
    reductions read [rows, channels] tiles instead of one strided channel per program."""
    return cs == 1 and nc > 1


def _cinner_programs(rows: int, channels: int) -> int:
    """Row-partial programs of a channel-innermost reduction (grid axis 1): about
    MAX_PARTIALS programs in all, each at least CI_BLOCK_R rows."""
    per_c = max(1, K.MAX_PARTIALS // triton.cdiv(channels, K.CI_BLOCK_C))
    return max(1, min(triton.cdiv(rows, K.CI_BLOCK_R), per_c))


def _partial_programs(m: int, channels: int) -> int:
    """Programs per channel for reductions: enough to fill a GPU, few enough that the
    [P, C] partials stay tiny next to x."""
    return max(1, min(triton.cdiv(m, K.RED_BLOCK), max(1, K.MAX_PARTIALS // channels)))


def _vec_units(x: torch.Tensor, size: int) -> int:
    """VEC of the kernels that take a row length in units of it (the plane kernels' channel
    run, the channel-innermost kernels' C, the period kernel's W): the widest
    16-byte-or-less element group dividing it, so that Triton can prove each row starts
    vector-aligned (a run of 196 fp32 or 72 channels -> 4: 128-bit loads). Triton by itself
    only specialises sizes divisible by 16."""
    vec = max(1, 16 // x.element_size())
    while vec > 1 and size % vec:
        vec //= 2
    return vec


def _channel_groups(x: torch.Tensor, cs: int, nc: int):
    """(VEC, G, BLOCK_O, BLOCK_I, P) of the channel-group kernels, or None: for per-channel
    runs that are not a whole number of 16-byte vectors (NCHW 7x7 = 49) G consecutive
    channels make rows of G*cs elements that are (G = VEC / gcd(cs, VEC)), when G divides the
    channel count and such a row fits one tile."""
    vec = max(1, 16 // x.element_size())
    if cs % vec == 0:
        return None
    g = vec // math.gcd(cs, vec)
    if nc % g or g * cs > K.RED_BLOCK:
        return None
    outer = x.numel() // (cs * nc)
    bi = triton.next_power_of_2(g * cs)
    bo = max(1, min(K.RED_BLOCK // bi, triton.next_power_of_2(outer)))
    p = max(1, min(triton.cdiv(outer, bo), K.MAX_PARTIALS // (nc // g)))
    return vec, g, bo, bi, p


def _plane_tiling(n: int, cs: int, nc: int):
    """Tiling of the [OUTER, NUM_CH, INNER] view (INNER = CH_STRIDE) for the per-channel
    plane kernels: (OUTER, BLOCK_O, BLOCK_I, P_I, P). A tile is [BLOCK_O rows, BLOCK_I
    contiguous elements] of one channel, ~RED_BLOCK elements; P = P_O * P_I programs per
    channel split the rows (P_O) and the column blocks (P_I)."""
    outer = n // (cs * nc)
    bi = min(triton.next_power_of_2(cs), K.RED_BLOCK)
    bo = max(1, min(K.RED_BLOCK // bi, triton.next_power_of_2(outer)))
    p = _partial_programs(n // nc, nc)
    p_i = min(p, triton.cdiv(cs, bi))
    p_o = max(1, min(p // p_i, triton.cdiv(outer, bo)))
    return outer, bo, bi, p_i, p_i * p_o


@triton_launcher
def fq_learnable_backward(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    n = x.numel()
    _check_size(n)
    dx = torch.empty_like(grad)
    channels = 1 if axis < 0 else x.size(axis)
    zp = zero_point.to(torch.float32)
    # torch's backward rounds the float zero point differently per-tensor and per-channel
    if axis < 0:
        zp = torch.trunc(torch.clamp(zp + 0.5, quant_min, quant_max))
    else:
        zp = torch.clamp(torch.round(zp), quant_min, quant_max)
    zp = zp.reshape(-1).contiguous()
    s = scale.to(torch.float32).reshape(-1).contiguous()
    if n == 0:
        z = torch.zeros(channels, dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    cs, nc = _channel_geometry(x, axis)
    m = n // channels
    if _channel_innermost(cs, nc):
        p = _cinner_programs(m, channels)
        part = torch.empty((2 * p, channels), dtype=torch.float32, device=x.device)
        vec = _vec_units(x, channels)
        K.fq_lsq_backward_cinner_kernel[(triton.cdiv(channels, K.CI_BLOCK_C), p)](
            grad, x, dx, s, zp, part, m, channels // vec, float(quant_min), float(quant_max),
            float(grad_factor), BLOCK_R=K.CI_BLOCK_R, BLOCK_C=K.CI_BLOCK_C, VEC=vec, **_LAUNCH)
        return dx, part[:p].sum(0), part[p:].sum(0)
    grp = _channel_groups(x, cs, nc) if axis >= 0 else None
    if grp is not None:  # runs that are not a whole number of vectors: channel-group rows
        vec, g, bo, bi, p = grp
        part = torch.empty((2 * p, channels), dtype=torch.float32, device=x.device)
        K.fq_lsq_backward_grouped_kernel[(nc // g, p)](
            grad, x, dx, s, zp, part, n // (cs * nc), cs, g * cs // vec, nc // g,
            float(quant_min), float(quant_max), float(grad_factor), G=g, BLOCK_O=bo,
            BLOCK_I=bi, VEC=vec, **_LAUNCH)
        return dx, part[:p].sum(0), part[p:].sum(0)
    outer, bo, bi, p_i, p = _plane_tiling(n, cs, nc)
    part = torch.empty((2 * p, channels), dtype=torch.float32, device=x.device)
    vec = _vec_units(x, cs) if axis >= 0 else 1  # per tensor: full tiles vectorise anyway
    K.fq_lsq_backward_kernel[(channels, p)](grad, x, dx, s, zp, part, outer, cs // vec, nc, p_i,
                                            float(quant_min), float(quant_max),
                                            float(grad_factor), PER_CHANNEL=axis >= 0,
                                            BLOCK_O=bo, BLOCK_I=bi, VEC=vec, **_LAUNCH)
    return dx, part[:p].sum(0), part[p:].sum(0)


def _zp_sym(quant_min: int, quant_max: int) -> float:
    return float((quant_min + quant_max) // 2 if quant_min >= 0 else 0)


@triton_launcher
def fq_minmax_forward(x, axis, quant_min, quant_max, symmetric, eps, save_mask):
    n = x.numel()
    _check_size(n)
    channels = 1 if axis < 0 else x.size(axis)
    if n == 0:  # no range observed: torch's observer falls back to scale 1, zero point 0
        return (torch.empty_like(x), _mask_buffer(0, save_mask, x.device),
                torch.ones(channels, dtype=torch.float32, device=x.device),
                torch.zeros(channels, dtype=torch.int32, device=x.device))
    if axis < 0:
        return _minmax_per_tensor(x, quant_min, quant_max, symmetric, eps, save_mask)
    m = n // channels
    cs, _ = _channel_geometry(x, axis)  # a size-1 axis: one contiguous channel
    scale = torch.empty(channels, dtype=torch.float32, device=x.device)
    zp = torch.empty(channels, dtype=torch.int32, device=x.device)
    fused = cs == m and (m % 8 == 0 or not save_mask)
    if fused:  # each channel one contiguous range owning whole mask bytes: one launch
        out = torch.empty_like(x)
        mask = _mask_buffer(n, save_mask, x.device)
        single = m <= K.ROW_BLOCK_MAX
        block = max(8, triton.next_power_of_2(m)) if single else K.BLOCK
        K.fq_minmax_channel_kernel[(channels,)](
            x, out, mask if save_mask else out, scale, zp, m, float(quant_min),
            float(quant_max), float(eps), _zp_sym(quant_min, quant_max), SYMMETRIC=symmetric,
            SAVE_MASK=save_mask, SINGLE=single, BLOCK=block, RECIP=_recip(x.device), **_LAUNCH)
        return out, mask, scale, zp
    # [P, C] min/max partials (coalesced [rows, channels] tiles when the channel is innermost,
    # [rows, run] tiles of each channel otherwise), per-channel qparams, then the fake quant
    if _channel_innermost(cs, channels):
        p = _cinner_programs(m, channels)
        part = torch.empty((2 * p, channels), dtype=torch.float32, device=x.device)
        vec = _vec_units(x, channels)
        K.minmax_cinner_partials_kernel[(triton.cdiv(channels, K.CI_BLOCK_C), p)](
            x, part, m, channels // vec, BLOCK_R=K.CI_BLOCK_R, BLOCK_C=K.CI_BLOCK_C, VEC=vec,
            **_LAUNCH)
    elif _channel_groups(x, cs, channels) is not None:
        vec, g, bo, bi, p = _channel_groups(x, cs, channels)
        part = torch.empty((2 * p, channels), dtype=torch.float32, device=x.device)
        K.minmax_grouped_partials_kernel[(channels // g, p)](
            x, part, n // (cs * channels), cs, g * cs // vec, channels // g, G=g, BLOCK_O=bo,
            BLOCK_I=bi, VEC=vec, **_LAUNCH)
    else:
        outer, bo, bi, p_i, p = _plane_tiling(n, cs, channels)
        part = torch.empty((2 * p, channels), dtype=torch.float32, device=x.device)
        vec = _vec_units(x, cs)
        K.minmax_channel_partials_kernel[(channels, p)](
            x, part, outer, cs // vec, channels, p_i, BLOCK_O=bo, BLOCK_I=bi, VEC=vec,
            **_LAUNCH)
    K.minmax_part_qparams_kernel[(triton.cdiv(channels, K.CI_BLOCK_C),)](
        part, p, channels, scale, zp, float(quant_min), float(quant_max), float(eps),
        _zp_sym(quant_min, quant_max), SYMMETRIC=symmetric, RECIP=_recip(x.device),
        BLOCK_P=16, BLOCK_C=K.CI_BLOCK_C, **_LAUNCH)
    out, mask = fq_forward(x, scale, zp, quant_min, quant_max, axis, save_mask)
    return out, mask, scale, zp


def _minmax_per_tensor_launches(x, out, mask, minv, maxv, scale, zp, averaging_constant,
                                quant_min, quant_max, symmetric, eps, ema, save_mask):
    """Partial min/max (grid-stride, at most MAX_PARTIALS programs), one finishing program
    (EMA, qparams into scale / zp), then the elementwise fake quant reading them."""
    n = x.numel()
    p = min(triton.cdiv(n, K.RED_BLOCK), K.MAX_PARTIALS)
    part = torch.empty(2 * p, dtype=torch.float32, device=x.device)
    K.minmax_partials_kernel[(p,)](x, part, part, part, n, HAS_STATE=False, BLOCK=K.RED_BLOCK,
                                   **_LAUNCH)
    K.minmax_qparams_kernel[(1,)](
        part, p, minv, maxv, scale, zp, float(averaging_constant), float(quant_min),
        float(quant_max), float(eps), _zp_sym(quant_min, quant_max), EMA=ema,
        SYMMETRIC=symmetric, RECIP=_recip(x.device),
        PBLOCK=min(K.MAX_PARTIALS, max(2, triton.next_power_of_2(p))), **_LAUNCH)
    K.fq_forward_kernel[(triton.cdiv(n, K.BLOCK),)](
        x, out, mask if save_mask else out, scale, zp, n, n, 1, float(quant_min),
        float(quant_max), PER_CHANNEL=False, SPAN2=False, SAVE_MASK=save_mask, BLOCK=K.BLOCK,
        **_LAUNCH)


def _minmax_per_tensor(x, quant_min, quant_max, symmetric, eps, save_mask):
    out = torch.empty_like(x)
    mask = _mask_buffer(x.numel(), save_mask, x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    zp = torch.empty(1, dtype=torch.int32, device=x.device)
    _minmax_per_tensor_launches(x, out, mask, scale, scale, scale, zp, 0.0, quant_min,
                                quant_max, symmetric, eps, False, save_mask)
    return out, mask, scale, zp


@triton_launcher
def fq_moving_average_forward(x, min_val, max_val, scale, zero_point, averaging_constant,
                              quant_min, quant_max, symmetric, eps, observe, save_mask):
    n = x.numel()
    _check_size(n)
    if not observe or n == 0:
        return fq_forward(x, scale, zero_point, quant_min, quant_max, -1, save_mask)
    out = torch.empty_like(x)
    mask = _mask_buffer(n, save_mask, x.device)
    _minmax_per_tensor_launches(x, out, mask, min_val, max_val, scale, zero_point,
                                averaging_constant, quant_min, quant_max, symmetric, eps, True,
                                save_mask)
    return out, mask
