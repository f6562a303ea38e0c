"""Triton kernels of the fake-quant family and their launchers.

All kernels address x in MEMORY order (x is dense: contiguous in some dim permutation), so
contiguous, channels_last and other permuted layouts need no copy. The channel of memory
offset o is (o // CH_STRIDE) % NUM_CH. Math is fp32 (inputs upcast once, outputs rounded once)
and mirrors reference.py exactly; launches pass enable_fp_fusion=False so no mul+add pair is
contracted into an FMA (the EMA update and qparams must round like torch's separate ops).

Packed mask: bit k (LSB first) of byte j is in_range of element 8j + k; blocks are multiples
of 8 so each program writes whole bytes.

Bandwidth: flat kernels take an unmasked path for full blocks (128-bit accesses at any size,
see tests/test_aot.py) and a masked one for the tail block. Per-channel fake quant picks its
geometry on the host: channel runs >= BLOCK (weights' axis 0, NCHW) -> flat blocks meeting at
most two channels (SPAN2); shorter runs -> [rows, channel period] tiles with per-column qparams
(fq_forward_period_kernel); channel-innermost reductions read [rows, channels] tiles; other
per-channel reductions (LSQ backward, NCHW axis-1 min/max) read [rows, run] tiles of the
[outer, C, run] view, so no element needs an integer divide to find its channel.
"""
from __future__ import annotations

import functools
import math

import triton
import triton.language as tl

from .._aot import AotSpec
from .._triton_utils import round_half_even as _rne

BLOCK = 2048          # elementwise block: 16 fp32 per thread at 4 warps -> 128-bit accesses
RED_BLOCK = 2048      # reduction block
MAX_PARTIALS = 1024   # programs of a partial reduction (one finishing block holds all partials)
CI_BLOCK_C = 64       # channel-innermost reductions: channels per program (contiguous)
CI_BLOCK_R = 32       # ... and rows per step
PERIOD_BLOCK_W = 256  # per-channel fake quant over short channel runs: tile width (columns)
ROW_BLOCK_MAX = 4096  # per-channel min/max: a channel up to this size is read once, in one block
NUM_WARPS = 4


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. bf16 is rounded by hand in fp32 bits, so the
    final cast is exact: Triton's interpreter truncates fp32 -> bf16, GPUs round to even, and
    this way both give the correctly rounded result."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        r = tl.where(v != v, u | 0x00400000, r)  # NaN stays a (quiet) NaN
        return r.to(tl.float32, bitcast=True).to(dtype)
    else:
        return v.to(dtype)


@triton.jit
def _fq_math(x, s, inv, zp, qmin, qmax):
    """(out fp32, in_range) for an integer-valued zero point added after rounding (torch)."""
    q = _rne(x * inv) + zp
    in_range = (q >= qmin) & (q <= qmax)
    qc = tl.where(q < qmin, qmin, q)      # compare-and-select: NaN stays NaN
    qc = tl.where(qc > qmax, qmax, qc)
    return (qc - zp) * s, in_range


@triton.jit
def _store_mask_bytes(mask_ptr, byte0, bits, byte_end, BLOCK: tl.constexpr):
    """Pack a [BLOCK] 0/1 int32 vector into the bytes [byte0, min(byte0 + BLOCK // 8,
    byte_end)) of the mask."""
    b = tl.reshape(bits, (BLOCK // 8, 8))
    shifts = tl.arange(0, 8)[None, :]
    packed = tl.sum(b << shifts, axis=1).to(tl.uint8)
    idx = byte0 + tl.arange(0, BLOCK // 8)
    tl.store(mask_ptr + idx, packed, mask=idx < byte_end)


@triton.jit
def _fq_block(x_ptr, out_ptr, mask_ptr, offs, valid, s, inv, zp, qmin, qmax, byte0, byte_end,
              SAVE_MASK: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Fake-quantize the elements `offs` (BLOCK contiguous, starting at a multiple of BLOCK)
    and pack their mask bytes. MASKED=False (a full block): no mask on loads and stores, so
    they vectorise to 128-bit accesses whatever the tensor's size; the tail block is masked."""
    if MASKED:
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
    out, in_range = _fq_math(x, s, inv, zp, qmin, qmax)
    out = _round_to(out, out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_ptr + offs, out, mask=valid)
    else:
        tl.store(out_ptr + offs, out)
    if SAVE_MASK:
        if MASKED:
            in_range = in_range & valid
        _store_mask_bytes(mask_ptr, byte0, in_range.to(tl.int32), byte_end, BLOCK)


@triton.jit
def _fq_qparams(scale_ptr, zp_ptr, start, CH_STRIDE, NUM_CH, PER_CHANNEL: tl.constexpr,
                SPAN2: tl.constexpr, BLOCK: tl.constexpr):
    """(scale, 1/scale, zero point as fp32) for the block of memory offsets [start, start +
    BLOCK): scalars per tensor; per channel with SPAN2 (CH_STRIDE >= BLOCK, so the block meets
    at most two channels) a select between two per-program scalars; otherwise per-element
    gathers. 1/scale is torch's inv_scale (1.0f / scale, correctly rounded)."""
    if PER_CHANNEL:
        if SPAN2:
            c0 = start // CH_STRIDE                      # one integer divide per program
            first = (c0 + 1) * CH_STRIDE - start         # lanes of channel c0 in this block
            ch0 = c0 % NUM_CH
            ch1 = (c0 + 1) % NUM_CH
            s0 = tl.load(scale_ptr + ch0)
            s1 = tl.load(scale_ptr + ch1)
            z0 = tl.load(zp_ptr + ch0).to(tl.float32)
            z1 = tl.load(zp_ptr + ch1).to(tl.float32)
            i0 = tl.math.div_rn(1.0, s0)
            i1 = tl.math.div_rn(1.0, s1)
            second = tl.arange(0, BLOCK) >= first
            s = tl.where(second, s1, s0)
            inv = tl.where(second, i1, i0)
            zp = tl.where(second, z1, z0)
        else:
            offs = start + tl.arange(0, BLOCK)
            ch = (offs // CH_STRIDE) % NUM_CH            # always in [0, NUM_CH): no mask needed
            s = tl.load(scale_ptr + ch)
            zp = tl.load(zp_ptr + ch).to(tl.float32)
            inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    else:
        s = tl.load(scale_ptr)
        zp = tl.load(zp_ptr).to(tl.float32)
        inv = tl.math.div_rn(1.0, s)
    return s, inv, zp


@triton.jit
def fq_forward_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr, zp_ptr, N, CH_STRIDE, NUM_CH,
                      qmin, qmax, PER_CHANNEL: tl.constexpr, SPAN2: tl.constexpr,
                      SAVE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise fake quant writing out and the packed mask in one pass, over flat blocks of
    memory (so every program owns whole mask bytes); grid (cdiv(N, BLOCK),). Full blocks take
    the unmasked (vectorised) path, the one tail block the masked one. The channel geometry
    (SPAN2 for long channel runs: axis 0 of a weight, NCHW activations) is in _fq_qparams."""
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    s, inv, zp = _fq_qparams(scale_ptr, zp_ptr, start, CH_STRIDE, NUM_CH, PER_CHANNEL, SPAN2,
                             BLOCK)
    if start + BLOCK <= N:
        _fq_block(x_ptr, out_ptr, mask_ptr, offs, offs < N, s, inv, zp, qmin, qmax, start // 8,
                  (N + 7) // 8, SAVE_MASK, False, BLOCK)
    else:
        _fq_block(x_ptr, out_ptr, mask_ptr, offs, offs < N, s, inv, zp, qmin, qmax, start // 8,
                  (N + 7) // 8, SAVE_MASK, True, BLOCK)


@triton.jit
def fq_forward_period_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr, zp_ptr, R, W, CH_STRIDE,
                             n_wb, qmin, qmax, SAVE_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_W: tl.constexpr, VEC: tl.constexpr):
    """Per-channel fake quant with short channel runs (channels_last, [N, C], small NCHW
    maps): x seen as [R, W] rows of one channel period (W = NUM_CH * CH_STRIDE), tiled
    [BLOCK_R, BLOCK_W]; grid (cdiv(R, BLOCK_R) * n_wb,). The channel, scale and 1/scale are
    per column (one divide per column per program, not per element); loads are contiguous
    along a row. With SAVE_MASK the launcher ensures W % 8 == 0, so rows own whole bytes.
    W comes in units of VEC (rows provably vector-aligned, e.g. 72 channels_last channels)."""
    W = W * VEC
    pid = tl.program_id(0)
    rb = pid // n_wb
    wb = pid % n_wb
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    j = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    jv = j < W
    ch = tl.where(jv, j, 0) // CH_STRIDE
    s = tl.load(scale_ptr + ch)
    zp = tl.load(zp_ptr + ch).to(tl.float32)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    rv = r < R
    offs = tl.where(rv, r, 0)[:, None] * W + j[None, :]  # masked rows: no offset past N
    valid = rv[:, None] & jv[None, :]
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    out, in_range = _fq_math(x, s[None, :], inv[None, :], zp[None, :], qmin, qmax)
    tl.store(out_ptr + offs, _round_to(out, out_ptr.dtype.element_ty), mask=valid)
    if SAVE_MASK:
        bits = tl.reshape((in_range & valid).to(tl.int32), (BLOCK_R, BLOCK_W // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
        jb = wb * (BLOCK_W // 8) + tl.arange(0, BLOCK_W // 8)
        bidx = tl.where(rv, r, 0)[:, None] * (W // 8) + jb[None, :]
        tl.store(mask_ptr + bidx, packed, mask=rv[:, None] & (jb < W // 8)[None, :])


@triton.jit
def _mask_bits(mask_ptr, pid, N, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """The [BLOCK] mask bits (fp32 0/1) of block pid."""
    bidx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    if MASKED:
        byte = tl.load(mask_ptr + bidx, mask=bidx < (N + 7) // 8, other=0).to(tl.int32)
    else:
        byte = tl.load(mask_ptr + bidx).to(tl.int32)
    bits = (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1
    return tl.reshape(bits, (BLOCK,)).to(tl.float32)


@triton.jit
def fq_mask_backward_kernel(g_ptr, mask_ptr, out_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    # a product like torch's dY * mask (NaN * 0 = NaN, -g * 0 = -0), rounded once
    if pid * BLOCK + BLOCK <= N:  # full block: unmasked, vectorised
        g = tl.load(g_ptr + offs).to(tl.float32) * _mask_bits(mask_ptr, pid, N, False, BLOCK)
        tl.store(out_ptr + offs, _round_to(g, out_ptr.dtype.element_ty))
    else:
        valid = offs < N
        g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        g = g * _mask_bits(mask_ptr, pid, N, True, BLOCK)
        tl.store(out_ptr + offs, _round_to(g, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _lsq_math(x, g, s, inv, zp, ds_lo, ds_hi, qmin, qmax, grad_factor):
    """Per element of the LSQ backward (torch's learnable fake-quant kernels): (dx in fp32,
    the dscale term, the dzero_point term -- 0 where x is in range)."""
    q = _rne(zp + x * inv)  # torch's backward adds the zero point before rounding
    lo = q < qmin
    hi = q > qmax
    in_range = (q >= qmin) & (q <= qmax)
    dx = g * in_range.to(tl.float32)
    qc = tl.where(lo, qmin, tl.where(hi, qmax, q))
    xfq = (qc - zp) * s
    ds_in = g * (xfq - x) * inv * grad_factor
    ds_out = tl.where(lo, g * ds_lo, g * ds_hi) * grad_factor
    dz_out = g * -1.0 * s * grad_factor
    clipped = lo | hi
    return dx, tl.where(clipped, ds_out, ds_in), tl.where(clipped, dz_out, 0.0)


@triton.jit
def _lsq_tile(g_ptr, x_ptr, dx_ptr, offs, valid, s, inv, zp, ds_lo, ds_hi, qmin, qmax,
              grad_factor, acc_s, acc_z, MASKED: tl.constexpr):
    """One tile of the LSQ backward: writes dx, returns the updated dscale/dzp sums.
    MASKED=False: a full tile, unmasked loads and stores (vectorised where offs allow)."""
    if MASKED:
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
    dx, ds, dz = _lsq_math(x, g, s, inv, zp, ds_lo, ds_hi, qmin, qmax, grad_factor)
    dx = _round_to(dx, dx_ptr.dtype.element_ty)
    if MASKED:
        tl.store(dx_ptr + offs, dx, mask=valid)
        acc_s += tl.where(valid, ds, 0.0)
        acc_z += tl.where(valid, dz, 0.0)
    else:
        tl.store(dx_ptr + offs, dx)
        acc_s += ds
        acc_z += dz
    return acc_s, acc_z


@triton.jit
def _plane_split(P_I):
    """(p, P, P_O, p_o, p_i) of a per-channel plane program: its index along grid axis 1, the
    P = P_O * P_I programs of its channel, and its row (p_o) / column-block (p_i) share."""
    p = tl.program_id(1)
    P = tl.num_programs(1)
    return p, P, P // P_I, p // P_I, p % P_I


@triton.jit
def _plane_rows(o0, OUTER, c, INNER, NUM_CH, PER_CHANNEL: tl.constexpr, BLOCK_O: tl.constexpr):
    """([BLOCK_O, 1] offsets of rows o0.. of channel c in the [OUTER, NUM_CH, INNER] view, the
    rows' validity). Masked rows get row 0's offset: no offset past N. PER_CHANNEL=False
    (one [1, numel] plane): offsets 0, so full tiles vectorise whatever numel is."""
    o = o0 + tl.arange(0, BLOCK_O)
    ov = o < OUTER
    if PER_CHANNEL:
        row = tl.where(ov, o, 0)[:, None] * (NUM_CH * INNER) + c * INNER
    else:
        row = tl.zeros([BLOCK_O, 1], dtype=tl.int32)
    return row, ov


@triton.jit
def fq_lsq_backward_kernel(g_ptr, x_ptr, dx_ptr, scale_ptr, zp_ptr, part_ptr, OUTER, INNER,
                           NUM_CH, P_I, qmin, qmax, grad_factor, PER_CHANNEL: tl.constexpr,
                           BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, VEC: tl.constexpr):
    """LSQ backward over x seen as [OUTER, NUM_CH, INNER] (per tensor: [1, 1, numel]). Grid
    (NUM_CH, P), P = P_O * P_I: program (c, p) walks channel c's [OUTER, INNER] plane in
    [BLOCK_O, BLOCK_I] tiles, rows p // P_I + k P_O and column blocks p % P_I + k P_I, so
    no element needs an integer divide to find its channel; full tiles are unmasked. dscale /
    dzero_point partial sums go to part_ptr[p, c] and part_ptr[P, C] + [p, c]. zp_ptr holds the
    zero point already rounded and clamped the way torch's backward does (float).
    PER_CHANNEL=False: per tensor (see _plane_rows). INNER comes in units of VEC (see
    triton_launch._vec_units)."""
    INNER = INNER * VEC
    c = tl.program_id(0)
    p, P, P_O, p_o, p_i = _plane_split(P_I)
    s = tl.load(scale_ptr + c)
    zp = tl.load(zp_ptr + c)
    inv = tl.math.div_rn(1.0, s)
    ds_lo = qmin - zp
    ds_hi = qmax - zp
    acc_s = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for o0 in tl.range(p_o * BLOCK_O, OUTER, P_O * BLOCK_O):
        row, ov = _plane_rows(o0, OUTER, c, INNER, NUM_CH, PER_CHANNEL, BLOCK_O)
        for i0 in tl.range(p_i * BLOCK_I, INNER, P_I * BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            offs = row + i[None, :]
            valid = ov[:, None] & (i < INNER)[None, :]
            if (o0 + BLOCK_O <= OUTER) & (i0 + BLOCK_I <= INNER):
                acc_s, acc_z = _lsq_tile(g_ptr, x_ptr, dx_ptr, offs, valid, s, inv, zp, ds_lo,
                                         ds_hi, qmin, qmax, grad_factor, acc_s, acc_z, False)
            else:
                acc_s, acc_z = _lsq_tile(g_ptr, x_ptr, dx_ptr, offs, valid, s, inv, zp, ds_lo,
                                         ds_hi, qmin, qmax, grad_factor, acc_s, acc_z, True)
    tl.store(part_ptr + p * NUM_CH + c, tl.sum(tl.sum(acc_s, axis=1), axis=0))
    tl.store(part_ptr + (P + p) * NUM_CH + c, tl.sum(tl.sum(acc_z, axis=1), axis=0))


@triton.jit
def _group_columns(OUTER, INNER, GI, BLOCK_I: tl.constexpr):
    """Columns of a channel-group plane row (G channels' runs of INNER, GI = G*INNER
    elements): (j, validity, channel within the group -- one integer divide per column,
    once per program)."""
    j = tl.arange(0, BLOCK_I)
    jv = j < GI
    return j, jv, tl.where(jv, j, 0) // INNER


@triton.jit
def fq_lsq_backward_grouped_kernel(g_ptr, x_ptr, dx_ptr, scale_ptr, zp_ptr, part_ptr, OUTER,
                                   INNER, GI, NUM_G, qmin, qmax, grad_factor, G: tl.constexpr,
                                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                                   VEC: tl.constexpr):
    """fq_lsq_backward_kernel for runs that are not a whole number of vectors (NCHW 7x7 =
    49): x seen as [OUTER, NUM_G, GI] rows of G consecutive channels (GI = G*INNER a whole
    number of vectors, in units of VEC), so rows start aligned and accesses are 128-bit.
    Program (cg, p) owns group cg, rows p, p + P, ...: the channel, scale and 1/scale of each
    column once per program; per-channel partial sums folded from the column sums at the end.
    Same part layout as fq_lsq_backward_kernel; grid (NUM_G, P)."""
    GI = GI * VEC
    cg = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    j, jv, k = _group_columns(OUTER, INNER, GI, BLOCK_I)
    ch = cg * G + k
    s = tl.load(scale_ptr + ch)[None, :]
    zp = tl.load(zp_ptr + ch)[None, :]
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    ds_lo = qmin - zp
    ds_hi = qmax - zp
    acc_s = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for o0 in tl.range(p * BLOCK_O, OUTER, P * BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        ov = o < OUTER
        offs = tl.where(ov, o, 0)[:, None] * (NUM_G * GI) + cg * GI + j[None, :]
        # the mask is constant over VEC columns (GI is a multiple of VEC): still 128-bit
        acc_s, acc_z = _lsq_tile(g_ptr, x_ptr, dx_ptr, offs, ov[:, None] & jv[None, :], s, inv,
                                 zp, ds_lo, ds_hi, qmin, qmax, grad_factor, acc_s, acc_z, True)
    col_s = tl.sum(acc_s, axis=0)
    col_z = tl.sum(acc_z, axis=0)
    C = NUM_G * G
    for kk in tl.static_range(G):
        sel = jv & (k == kk)
        tl.store(part_ptr + p * C + cg * G + kk, tl.sum(tl.where(sel, col_s, 0.0), axis=0))
        tl.store(part_ptr + (P + p) * C + cg * G + kk,
                 tl.sum(tl.where(sel, col_z, 0.0), axis=0))


@triton.jit
def minmax_grouped_partials_kernel(x_ptr, part_ptr, OUTER, INNER, GI, NUM_G, G: tl.constexpr,
                                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                                   VEC: tl.constexpr):
    """minmax_channel_partials_kernel on the channel-group rows of
    fq_lsq_backward_grouped_kernel (runs that are not a whole number of vectors); grid
    (NUM_G, P), part[p, c] (min) and part[P + p, c] (max)."""
    GI = GI * VEC
    cg = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    j, jv, k = _group_columns(OUTER, INNER, GI, BLOCK_I)
    vmin = tl.full([BLOCK_O, BLOCK_I], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_O, BLOCK_I], float("-inf"), tl.float32)
    for o0 in tl.range(p * BLOCK_O, OUTER, P * BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        ov = o < OUTER
        offs = tl.where(ov, o, 0)[:, None] * (NUM_G * GI) + cg * GI + j[None, :]
        valid = ov[:, None] & jv[None, :]
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(valid, x, float("inf")))
        vmax = tl.maximum(vmax, tl.where(valid, x, float("-inf")))
    col_min = tl.min(vmin, axis=0)
    col_max = tl.max(vmax, axis=0)
    C = NUM_G * G
    for kk in tl.static_range(G):
        sel = jv & (k == kk)
        tl.store(part_ptr + p * C + cg * G + kk,
                 tl.min(tl.where(sel, col_min, float("inf")), axis=0))
        tl.store(part_ptr + (P + p) * C + cg * G + kk,
                 tl.max(tl.where(sel, col_max, float("-inf")), axis=0))


@triton.jit
def _qparams(mn, mx, qmin, qmax, eps, zp_sym, SYMMETRIC: tl.constexpr,
             RECIP: tl.constexpr = False):
    """torch.ao _calculate_qparams on fp32 scalars: (scale, zero_point as fp32).

    The range is divided by a Python float there, which torch computes per device: on CUDA
    as a multiply by the fp32 reciprocal of the divisor (RECIP=True, what the launchers pass
    for CUDA tensors; csrc/cuda/fake_quant.cu does the same), on CPU as a true division
    (RECIP=False, interpreter runs on CPU tensors). min_neg / scale is a tensor-by-tensor
    division, correctly rounded on both."""
    min_neg = tl.minimum(mn, 0.0)
    max_pos = tl.maximum(mx, 0.0)
    if SYMMETRIC:
        max_pos = tl.maximum(-min_neg, max_pos)
        d = (qmax - qmin) * 0.5  # exact: qmax - qmin is an integer below 2^24
        if RECIP:
            scale = max_pos * tl.math.div_rn(1.0, d)
        else:
            scale = tl.math.div_rn(max_pos, d)
        scale = tl.maximum(scale, eps)
        zp = zp_sym
    else:
        d = qmax - qmin
        if RECIP:
            scale = (max_pos - min_neg) * tl.math.div_rn(1.0, d)
        else:
            scale = tl.math.div_rn(max_pos - min_neg, d)
        scale = tl.maximum(scale, eps)
        zp = qmin - _rne(tl.math.div_rn(min_neg, scale))
        zp = tl.minimum(tl.maximum(zp, qmin), qmax)
    return scale, zp


@triton.jit
def fq_minmax_channel_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr, zp_ptr, M, qmin, qmax, eps,
                             zp_sym, SYMMETRIC: tl.constexpr, SAVE_MASK: tl.constexpr,
                             SINGLE: tl.constexpr, BLOCK: tl.constexpr, RECIP: tl.constexpr):
    """One program per channel of an x whose channels are contiguous memory ranges of M
    elements (axis 0 of a weight): min/max over the channel, qparams, and the fake quant of
    the channel, in one launch. SINGLE: the channel fits one block, so x is read exactly
    once. With SAVE_MASK the launcher ensures M % 8 == 0 (each channel owns whole bytes)."""
    c = tl.program_id(0)
    base = c * M
    if SINGLE:
        m = tl.arange(0, BLOCK)
        valid = m < M
        x = tl.load(x_ptr + base + m, mask=valid, other=0.0).to(tl.float32)
        mn = tl.min(tl.where(valid, x, float("inf")), axis=0)
        mx = tl.max(tl.where(valid, x, float("-inf")), axis=0)
    else:
        vmin = tl.full([BLOCK], float("inf"), tl.float32)
        vmax = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in tl.range(0, M, BLOCK):
            m = start + tl.arange(0, BLOCK)
            valid = m < M
            x = tl.load(x_ptr + base + m, mask=valid, other=0.0).to(tl.float32)
            vmin = tl.minimum(vmin, tl.where(valid, x, float("inf")))
            vmax = tl.maximum(vmax, tl.where(valid, x, float("-inf")))
        mn = tl.min(vmin, axis=0)
        mx = tl.max(vmax, axis=0)
    scale, zp = _qparams(mn, mx, qmin, qmax, eps, zp_sym, SYMMETRIC, RECIP)
    tl.store(scale_ptr + c, scale)
    tl.store(zp_ptr + c, zp.to(tl.int32))
    inv = tl.math.div_rn(1.0, scale)
    byte_end = (base + M) // 8
    if SINGLE:
        out, in_range = _fq_math(x, scale, inv, zp, qmin, qmax)
        tl.store(out_ptr + base + m, _round_to(out, out_ptr.dtype.element_ty), mask=valid)
        if SAVE_MASK:
            _store_mask_bytes(mask_ptr, base // 8, (in_range & valid).to(tl.int32), byte_end,
                              BLOCK)
    else:
        for start in tl.range(0, M, BLOCK):
            m = start + tl.arange(0, BLOCK)
            valid = m < M
            x = tl.load(x_ptr + base + m, mask=valid, other=0.0).to(tl.float32)
            out, in_range = _fq_math(x, scale, inv, zp, qmin, qmax)
            tl.store(out_ptr + base + m, _round_to(out, out_ptr.dtype.element_ty), mask=valid)
            if SAVE_MASK:
                _store_mask_bytes(mask_ptr, (base + start) // 8,
                                  (in_range & valid).to(tl.int32), byte_end, BLOCK)


@triton.jit
def minmax_channel_partials_kernel(x_ptr, part_ptr, OUTER, INNER, NUM_CH, P_I,
                                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                                   VEC: tl.constexpr):
    """Per-channel min/max partials of x seen as [OUTER, NUM_CH, INNER] (NCHW axis 1 and any
    channel that is not one contiguous range), tiled as fq_lsq_backward_kernel: program (c, p)
    writes part[p, c] (min) and part[P + p, c] (max); no per-element integer divide; full
    tiles unmasked. minmax_part_qparams_kernel reduces the partials. INNER comes in units of
    VEC."""
    INNER = INNER * VEC
    c = tl.program_id(0)
    p, P, P_O, p_o, p_i = _plane_split(P_I)
    vmin = tl.full([BLOCK_O, BLOCK_I], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_O, BLOCK_I], float("-inf"), tl.float32)
    for o0 in tl.range(p_o * BLOCK_O, OUTER, P_O * BLOCK_O):
        row, ov = _plane_rows(o0, OUTER, c, INNER, NUM_CH, True, BLOCK_O)
        for i0 in tl.range(p_i * BLOCK_I, INNER, P_I * BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            if (o0 + BLOCK_O <= OUTER) & (i0 + BLOCK_I <= INNER):
                x = tl.load(x_ptr + row + i[None, :]).to(tl.float32)
                vmin = tl.minimum(vmin, x)
                vmax = tl.maximum(vmax, x)
            else:
                valid = ov[:, None] & (i < INNER)[None, :]
                x = tl.load(x_ptr + row + i[None, :], mask=valid, other=0.0).to(tl.float32)
                vmin = tl.minimum(vmin, tl.where(valid, x, float("inf")))
                vmax = tl.maximum(vmax, tl.where(valid, x, float("-inf")))
    tl.store(part_ptr + p * NUM_CH + c, tl.min(tl.min(vmin, axis=1), axis=0))
    tl.store(part_ptr + (P + p) * NUM_CH + c, tl.max(tl.max(vmax, axis=1), axis=0))


@triton.jit
def minmax_partials_kernel(x_ptr, part_ptr, minv_ptr, maxv_ptr, N, HAS_STATE: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Per-program min/max of x into part[p] / part[P + p], grid-stride over full blocks
    (unmasked: vectorised) plus the tail block in one program. HAS_STATE: program 0 also
    copies the old EMA state to part[2P], part[2P + 1] (for finishing kernels that overwrite
    it in several programs)."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    vmin = tl.full([BLOCK], float("inf"), tl.float32)
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    n_full = N // BLOCK * BLOCK
    for start in tl.range(p * BLOCK, n_full, P * BLOCK):
        x = tl.load(x_ptr + start + tl.arange(0, BLOCK)).to(tl.float32)
        vmin = tl.minimum(vmin, x)
        vmax = tl.maximum(vmax, x)
    if (n_full < N) & (p == (n_full // BLOCK) % P):
        offs = n_full + tl.arange(0, BLOCK)
        valid = offs < N
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(valid, x, float("inf")))
        vmax = tl.maximum(vmax, tl.where(valid, x, float("-inf")))
    tl.store(part_ptr + p, tl.min(vmin, axis=0))
    tl.store(part_ptr + P + p, tl.max(vmax, axis=0))
    if HAS_STATE:
        if p == 0:
            tl.store(part_ptr + 2 * P, tl.load(minv_ptr))
            tl.store(part_ptr + 2 * P + 1, tl.load(maxv_ptr))


@triton.jit
def minmax_qparams_kernel(part_ptr, P, minv_ptr, maxv_ptr, scale_ptr, zp_ptr,
                          averaging_constant, qmin, qmax, eps, zp_sym, EMA: tl.constexpr,
                          SYMMETRIC: tl.constexpr, RECIP: tl.constexpr, PBLOCK: tl.constexpr):
    """The one finishing program of a per-tensor min/max: reduces the P partials once, applies
    the EMA update (MovingAverageMinMaxObserver) when EMA and writes the state, and writes the
    qparams that the elementwise fq_forward_kernel launch then reads."""
    vmin = tl.full([PBLOCK], float("inf"), tl.float32)
    vmax = tl.full([PBLOCK], float("-inf"), tl.float32)
    for p0 in range(0, P, PBLOCK):
        pi = p0 + tl.arange(0, PBLOCK)
        pv = pi < P
        vmin = tl.minimum(vmin, tl.load(part_ptr + pi, mask=pv, other=float("inf")))
        vmax = tl.maximum(vmax, tl.load(part_ptr + P + pi, mask=pv, other=float("-inf")))
    mn = tl.min(vmin, axis=0)
    mx = tl.max(vmax, axis=0)
    if EMA:
        old_min = tl.load(minv_ptr)
        old_max = tl.load(maxv_ptr)
        first = (old_min == float("inf")) & (old_max == float("-inf"))
        # the first observation copies the batch range (keeping -0.0); the EMA operands are
        # made finite there only to avoid computing inf - inf
        old_min = tl.where(first, mn, old_min)
        old_max = tl.where(first, mx, old_max)
        mn = tl.where(first, mn, old_min + averaging_constant * (mn - old_min))
        mx = tl.where(first, mx, old_max + averaging_constant * (mx - old_max))
        tl.store(minv_ptr, mn)
        tl.store(maxv_ptr, mx)
    scale, zp = _qparams(mn, mx, qmin, qmax, eps, zp_sym, SYMMETRIC, RECIP)
    tl.store(scale_ptr, scale)
    tl.store(zp_ptr, zp.to(tl.int32))


# --- channel-innermost reductions (channels_last axis 1, [N, C] axis 1: CH_STRIDE == 1) ------
# x is [R, C] rows; program (cb, p) reads [CI_BLOCK_R, BLOCK_C] tiles of rows p, p + P, ...
# (coalesced along the channels) and writes one partial per channel: part[p, c].

@triton.jit
def fq_lsq_backward_cinner_kernel(g_ptr, x_ptr, dx_ptr, scale_ptr, zp_ptr, part_ptr, R, C,
                                  qmin, qmax, grad_factor, BLOCK_R: tl.constexpr,
                                  BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """fq_lsq_backward_kernel for a channel-innermost x: same math, same part layout
    ([P, C] dscale partials, then [P, C] dzero_point partials); grid (cdiv(C, BLOCK_C), P).
    C comes in units of VEC (rows provably vector-aligned whatever C's power-of-2 factor)."""
    C = C * VEC
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    cv = c < C
    cc = tl.where(cv, c, 0)
    s = tl.load(scale_ptr + cc)[None, :]
    zp = tl.load(zp_ptr + cc)[None, :]
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    ds_lo = qmin - zp
    ds_hi = qmax - zp
    acc_s = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in tl.range(p * BLOCK_R, R, P * BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        valid = (r < R)[:, None] & cv[None, :]
        o = tl.where(r < R, r, 0)[:, None] * C + c[None, :]
        acc_s, acc_z = _lsq_tile(g_ptr, x_ptr, dx_ptr, o, valid, s, inv, zp, ds_lo, ds_hi, qmin,
                                 qmax, grad_factor, acc_s, acc_z, True)
    tl.store(part_ptr + p * C + c, tl.sum(acc_s, axis=0), mask=cv)
    tl.store(part_ptr + (P + p) * C + c, tl.sum(acc_z, axis=0), mask=cv)


@triton.jit
def minmax_cinner_partials_kernel(x_ptr, part_ptr, R, C, BLOCK_R: tl.constexpr,
                                  BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """Per-channel min/max partials of a channel-innermost x: part[p, c] (min) and
    part[P + p, c] (max); grid (cdiv(C, BLOCK_C), P). C comes in units of VEC."""
    C = C * VEC
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    cv = c < C
    vmin = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    for r0 in tl.range(p * BLOCK_R, R, P * BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        valid = (r < R)[:, None] & cv[None, :]
        o = tl.where(r < R, r, 0)[:, None] * C + c[None, :]
        x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(valid, x, float("inf")))
        vmax = tl.maximum(vmax, tl.where(valid, x, float("-inf")))
    tl.store(part_ptr + p * C + c, tl.min(vmin, axis=0), mask=cv)
    tl.store(part_ptr + (P + p) * C + c, tl.max(vmax, axis=0), mask=cv)


@triton.jit
def minmax_part_qparams_kernel(part_ptr, P, C, scale_ptr, zp_ptr, qmin, qmax, eps, zp_sym,
                                 SYMMETRIC: tl.constexpr, RECIP: tl.constexpr,
                                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Reduces the [P, C] partials of minmax_cinner_partials_kernel or
    minmax_channel_partials_kernel to per-channel qparams; grid (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cv = c < C
    vmin = tl.full([BLOCK_P, BLOCK_C], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pi = p0 + tl.arange(0, BLOCK_P)
        m = (pi < P)[:, None] & cv[None, :]
        o = pi[:, None] * C + c[None, :]
        vmin = tl.minimum(vmin, tl.load(part_ptr + o, mask=m, other=float("inf")))
        vmax = tl.maximum(vmax, tl.load(part_ptr + P * C + o, mask=m, other=float("-inf")))
    scale, zp = _qparams(tl.min(vmin, axis=0), tl.max(vmax, axis=0), qmin, qmax, eps, zp_sym,
                         SYMMETRIC, RECIP)
    tl.store(scale_ptr + c, scale, mask=cv)
    tl.store(zp_ptr + c, zp.to(tl.int32), mask=cv)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (acq_kernels._aot): fp32 and bf16 variants of streaming kernels.
_T = {"fp32": "*fp32", "bf16": "*bf16"}


def _aot_specs() -> list:
    """Sizes are NOT declared 16-divisible (N, M, CH_STRIDE are odd in the tests' shapes): the
    128-bit loads must come from the unmasked full-block paths alone. Pointers are aligned
    (torch allocations are)."""
    specs = []
    spec = functools.partial(AotSpec, options={"enable_fp_fusion": False})  # as launched
    for tn, tp in _T.items():
        vec = 16 // (4 if tn == "fp32" else 2)  # elements per 16-byte vector
        for mode in ("per_tensor", "per_channel_span2", "per_channel_gather"):
            specs.append(spec(
                name=f"fq_forward[{tn},{mode}]", kernel=fq_forward_kernel,
                signature={"x_ptr": tp, "out_ptr": tp, "mask_ptr": "*u8", "scale_ptr": "*fp32",
                           "zp_ptr": "*i32", "N": "i32", "CH_STRIDE": "i32", "NUM_CH": "i32",
                           "qmin": "fp32", "qmax": "fp32", "PER_CHANNEL": "constexpr",
                           "SPAN2": "constexpr", "SAVE_MASK": "constexpr", "BLOCK": "constexpr"},
                constexprs={"PER_CHANNEL": mode != "per_tensor", "SPAN2": mode.endswith("span2"),
                            "SAVE_MASK": True, "BLOCK": BLOCK},
                aligned=("x_ptr", "out_ptr", "mask_ptr"), streaming=True,
                # per-tensor / two-channel blocks: 1/scale and the channel once per program
                per_element_div=mode == "per_channel_gather", num_warps=NUM_WARPS))
        specs.append(spec(
            # channels_last per channel (W = C columns, R odd rows); W is not declared
            # 16-divisible (72 channels are not): the units of VEC prove rows aligned
            name=f"fq_forward_period[{tn}]", kernel=fq_forward_period_kernel,
            signature={"x_ptr": tp, "out_ptr": tp, "mask_ptr": "*u8", "scale_ptr": "*fp32",
                       "zp_ptr": "*i32", "R": "i32", "W": "i32", "CH_STRIDE": "constexpr",
                       "n_wb": "i32", "qmin": "fp32", "qmax": "fp32", "SAVE_MASK": "constexpr",
                       "BLOCK_R": "constexpr", "BLOCK_W": "constexpr", "VEC": "constexpr"},
            constexprs={"SAVE_MASK": True, "CH_STRIDE": 1, "BLOCK_R": BLOCK // 64,
                        "BLOCK_W": 64, "VEC": vec},
            # 1/scale once per column a thread holds (1/4 .. 1/2 per element), no integer
            # divide per element: not held to the per-program bound
            aligned=("x_ptr", "out_ptr", "mask_ptr"), streaming=True,
            num_warps=NUM_WARPS))
        specs.append(spec(
            name=f"fq_mask_backward[{tn}]", kernel=fq_mask_backward_kernel,
            signature={"g_ptr": tp, "mask_ptr": "*u8", "out_ptr": tp, "N": "i32",
                       "BLOCK": "constexpr"},
            constexprs={"BLOCK": BLOCK}, aligned=("g_ptr", "mask_ptr", "out_ptr"),
            streaming=True, num_warps=NUM_WARPS))
        # LSQ backward / min-max partials over [OUTER, NUM_CH, INNER] planes: per tensor (one
        # [1, numel] plane, odd numel), per channel with a run that is a whole number of
        # vectors but not 16-divisible (NCHW 14x14 fp32, 28x28 bf16: INNER in units of VEC),
        # and per channel with an odd run (NCHW 7x7 = 49: scalar loads, but no divide per
        # element either way)
        run_block = triton.next_power_of_2(196 if tn == "fp32" else 784)
        for mode, (bo, bi, v) in (("per_tensor", (1, RED_BLOCK, 1)),
                                  ("per_channel_vec", (RED_BLOCK // run_block, run_block, vec)),
                                  ("per_channel_odd_run", (32, 64, 1))):
            specs.append(spec(
                name=f"fq_lsq_backward[{tn},{mode}]", kernel=fq_lsq_backward_kernel,
                signature={"g_ptr": tp, "x_ptr": tp, "dx_ptr": tp, "scale_ptr": "*fp32",
                           "zp_ptr": "*fp32", "part_ptr": "*fp32", "OUTER": "i32",
                           "INNER": "i32", "NUM_CH": "i32", "P_I": "i32", "qmin": "fp32",
                           "qmax": "fp32", "grad_factor": "fp32", "PER_CHANNEL": "constexpr",
                           "BLOCK_O": "constexpr", "BLOCK_I": "constexpr", "VEC": "constexpr"},
                constexprs={"PER_CHANNEL": mode != "per_tensor", "BLOCK_O": bo, "BLOCK_I": bi,
                            "VEC": v},
                aligned=("g_ptr", "x_ptr", "dx_ptr"),
                streaming=mode != "per_channel_odd_run", per_element_div=False,
                num_warps=NUM_WARPS))
            if mode == "per_tensor":  # per-tensor min/max: minmax_partials_kernel
                continue
            specs.append(spec(
                name=f"minmax_channel_partials[{tn},{mode}]",
                kernel=minmax_channel_partials_kernel,
                signature={"x_ptr": tp, "part_ptr": "*fp32", "OUTER": "i32", "INNER": "i32",
                           "NUM_CH": "i32", "P_I": "i32", "BLOCK_O": "constexpr",
                           "BLOCK_I": "constexpr", "VEC": "constexpr"},
                constexprs={"BLOCK_O": bo, "BLOCK_I": bi, "VEC": v},
                aligned=("x_ptr",),
                streaming=mode != "per_channel_odd_run", per_element_div=False,
                num_warps=NUM_WARPS))
        # per-channel runs that are not a whole number of vectors (NCHW 512 x 7x7): rows of
        # G channels; 1/scale once per column, no divide in the loop, 128-bit loads
        g = vec // math.gcd(49, vec)
        bi = triton.next_power_of_2(g * 49)
        gcx = {"G": g, "BLOCK_O": RED_BLOCK // bi, "BLOCK_I": bi, "VEC": vec}
        specs.append(spec(
            name=f"fq_lsq_backward_grouped[{tn},7x7]", kernel=fq_lsq_backward_grouped_kernel,
            signature={"g_ptr": tp, "x_ptr": tp, "dx_ptr": tp, "scale_ptr": "*fp32",
                       "zp_ptr": "*fp32", "part_ptr": "*fp32", "OUTER": "i32", "INNER": "i32",
                       "GI": "i32", "NUM_G": "i32", "qmin": "fp32", "qmax": "fp32",
                       "grad_factor": "fp32", "G": "constexpr", "BLOCK_O": "constexpr",
                       "BLOCK_I": "constexpr", "VEC": "constexpr"},
            constexprs=gcx, aligned=("g_ptr", "x_ptr", "dx_ptr"), streaming=True,
            num_warps=NUM_WARPS))
        specs.append(spec(
            name=f"minmax_grouped_partials[{tn},7x7]", kernel=minmax_grouped_partials_kernel,
            signature={"x_ptr": tp, "part_ptr": "*fp32", "OUTER": "i32", "INNER": "i32",
                       "GI": "i32", "NUM_G": "i32", "G": "constexpr", "BLOCK_O": "constexpr",
                       "BLOCK_I": "constexpr", "VEC": "constexpr"},
            constexprs=gcx, aligned=("x_ptr",), streaming=True, num_warps=NUM_WARPS))
        specs.append(spec(
            name=f"minmax_partials[{tn}]", kernel=minmax_partials_kernel,
            signature={"x_ptr": tp, "part_ptr": "*fp32", "minv_ptr": "*fp32",
                       "maxv_ptr": "*fp32", "N": "i32", "HAS_STATE": "constexpr",
                       "BLOCK": "constexpr"},
            constexprs={"HAS_STATE": False, "BLOCK": RED_BLOCK}, aligned=("x_ptr",),
            streaming=True, num_warps=NUM_WARPS))
        for single in (True, False):
            specs.append(spec(
                name=f"fq_minmax_channel[{tn},{'one_block' if single else 'looped'}]",
                kernel=fq_minmax_channel_kernel,
                signature={"x_ptr": tp, "out_ptr": tp, "mask_ptr": "*u8", "scale_ptr": "*fp32",
                           "zp_ptr": "*i32", "M": "i32", "qmin": "fp32", "qmax": "fp32",
                           "eps": "fp32", "zp_sym": "fp32", "SYMMETRIC": "constexpr",
                           "SAVE_MASK": "constexpr", "SINGLE": "constexpr", "BLOCK": "constexpr",
                           "RECIP": "constexpr"},
                constexprs={"SYMMETRIC": False, "SAVE_MASK": True, "SINGLE": single,
                            "BLOCK": 1024 if single else BLOCK, "RECIP": True},
                aligned=("x_ptr", "out_ptr", "mask_ptr", "M"), streaming=False,
                num_warps=NUM_WARPS))
        # channel-innermost reductions over [R, C] rows (R odd; C not declared 16-divisible,
        # in units of VEC as launched)
        specs.append(spec(
            name=f"fq_lsq_backward_cinner[{tn}]", kernel=fq_lsq_backward_cinner_kernel,
            signature={"g_ptr": tp, "x_ptr": tp, "dx_ptr": tp, "scale_ptr": "*fp32",
                       "zp_ptr": "*fp32", "part_ptr": "*fp32", "R": "i32", "C": "i32",
                       "qmin": "fp32", "qmax": "fp32", "grad_factor": "fp32",
                       "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "VEC": "constexpr"},
            constexprs={"BLOCK_R": CI_BLOCK_R, "BLOCK_C": CI_BLOCK_C, "VEC": vec},
            aligned=("g_ptr", "x_ptr", "dx_ptr", "part_ptr"), streaming=True,
            num_warps=NUM_WARPS))
        specs.append(spec(
            name=f"minmax_cinner_partials[{tn}]", kernel=minmax_cinner_partials_kernel,
            signature={"x_ptr": tp, "part_ptr": "*fp32", "R": "i32", "C": "i32",
                       "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "VEC": "constexpr"},
            constexprs={"BLOCK_R": CI_BLOCK_R, "BLOCK_C": CI_BLOCK_C, "VEC": vec},
            aligned=("x_ptr", "part_ptr"), streaming=True, num_warps=NUM_WARPS))
    specs.append(spec(
        name="minmax_part_qparams", kernel=minmax_part_qparams_kernel,
        signature={"part_ptr": "*fp32", "P": "i32", "C": "i32", "scale_ptr": "*fp32",
                   "zp_ptr": "*i32", "qmin": "fp32", "qmax": "fp32", "eps": "fp32",
                   "zp_sym": "fp32", "SYMMETRIC": "constexpr", "RECIP": "constexpr",
                   "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"},
        constexprs={"SYMMETRIC": False, "RECIP": True, "BLOCK_P": 16, "BLOCK_C": CI_BLOCK_C},
        aligned=("part_ptr", "C"), num_warps=NUM_WARPS))
    for symmetric in (False, True):
        specs.append(spec(
            name=f"minmax_qparams[{'symmetric' if symmetric else 'affine'}]",
            kernel=minmax_qparams_kernel,
            signature={"part_ptr": "*fp32", "P": "i32", "minv_ptr": "*fp32", "maxv_ptr": "*fp32",
                       "scale_ptr": "*fp32", "zp_ptr": "*i32", "averaging_constant": "fp32",
                       "qmin": "fp32", "qmax": "fp32", "eps": "fp32", "zp_sym": "fp32",
                       "EMA": "constexpr", "SYMMETRIC": "constexpr", "RECIP": "constexpr",
                       "PBLOCK": "constexpr"},
            constexprs={"EMA": True, "SYMMETRIC": symmetric, "RECIP": True,
                        "PBLOCK": MAX_PARTIALS},
            num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _aot_specs()
