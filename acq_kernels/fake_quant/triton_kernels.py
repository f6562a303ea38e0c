"""Triton kernels of the fake-quant family and their launchers.

All kernels address x in MEMORY order (x is dense: contiguous in some dim permutation), so
contiguous, channels_last and other permuted layouts need no copy. The channel of memory
offset o is (o // CH_STRIDE) % NUM_CH. Math is fp32 (inputs upcast once, outputs rounded once)
and mirrors reference.py exactly; launches pass enable_fp_fusion=False so no mul+add pair is
contracted into an FMA (the EMA update and qparams must round like torch's separate ops).

Packed mask: bit k (LSB first) of byte j is in_range of element 8j + k; blocks are multiples
of 8 so each program writes whole bytes.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .._aot import AotSpec
from .._triton_utils import round_half_even as _rne

BLOCK = 2048          # elementwise block: 16 fp32 per thread at 4 warps -> 128-bit accesses
RED_BLOCK = 2048      # reduction block
MAX_PARTIALS = 1024   # programs of a partial reduction (one finishing block holds all partials)
ROW_BLOCK_MAX = 4096  # per-channel min/max: a channel up to this size is read once, in one block
ROWS_MIN = 512        # per-channel fake quant: channel runs at least this long use the row grid
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
def fq_forward_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr, zp_ptr, N, CH_STRIDE, NUM_CH,
                      qmin, qmax, PER_CHANNEL: tl.constexpr, ROWS: tl.constexpr,
                      SAVE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise fake quant writing out and the packed mask in one pass.

    ROWS (per-channel, long channel runs such as axis 0 of a weight or NCHW activations):
    x is seen as rows of CH_STRIDE elements, one channel each; grid (rows, row blocks), so the
    qparams are per-program scalars instead of per-element gathers and integer divisions.
    The launcher uses it only when CH_STRIDE % 8 == 0 (or no mask), so rows own whole bytes."""
    if ROWS:
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = col < CH_STRIDE
        start = row * CH_STRIDE + tl.program_id(1) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        ch = row % NUM_CH
        s = tl.load(scale_ptr + ch)
        zp = tl.load(zp_ptr + ch).to(tl.float32)
        byte_end = ((row + 1) * CH_STRIDE) // 8
    else:
        start = tl.program_id(0) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        valid = offs < N
        byte_end = (N + 7) // 8
        if PER_CHANNEL:
            ch = (offs // CH_STRIDE) % NUM_CH
            s = tl.load(scale_ptr + ch, mask=valid, other=1.0)
            zp = tl.load(zp_ptr + ch, mask=valid, other=0).to(tl.float32)
        else:
            s = tl.load(scale_ptr)
            zp = tl.load(zp_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    out, in_range = _fq_math(x, s, inv, zp, qmin, qmax)
    tl.store(out_ptr + offs, _round_to(out, out_ptr.dtype.element_ty), mask=valid)
    if SAVE_MASK:
        bits = (in_range & valid).to(tl.int32)
        _store_mask_bytes(mask_ptr, start // 8, bits, byte_end, BLOCK)


@triton.jit
def fq_mask_backward_kernel(g_ptr, mask_ptr, out_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    bidx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    byte = tl.load(mask_ptr + bidx, mask=bidx < (N + 7) // 8, other=0).to(tl.int32)
    bits = (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1
    bit = tl.reshape(bits, (BLOCK,)).to(tl.float32)
    # a product like torch's dY * mask (NaN * 0 = NaN, -g * 0 = -0), rounded once
    tl.store(out_ptr + offs, _round_to(g.to(tl.float32) * bit, out_ptr.dtype.element_ty),
             mask=valid)


@triton.jit
def _channel_offsets(m, c, CH_STRIDE, NUM_CH, PER_CHANNEL: tl.constexpr):
    """Memory offset of the m-th element of channel c (x seen as [outer, NUM_CH, CH_STRIDE])."""
    if PER_CHANNEL:
        return (m // CH_STRIDE) * (CH_STRIDE * NUM_CH) + c * CH_STRIDE + (m % CH_STRIDE)
    else:
        return m


@triton.jit
def fq_lsq_backward_kernel(g_ptr, x_ptr, dx_ptr, scale_ptr, zp_ptr, part_ptr, M, CH_STRIDE,
                           NUM_CH, qmin, qmax, grad_factor, PER_CHANNEL: tl.constexpr,
                           BLOCK: tl.constexpr):
    """LSQ backward (torch's learnable fake-quant kernels). Grid (channels, P): program (c, p)
    strides over channel c's M elements; dscale/dzero_point partial sums go to
    part_ptr[p, c] and part_ptr[P, C] + [p, c]. zp_ptr holds the zero point already rounded and
    clamped the way torch's backward does (float)."""
    c = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    s = tl.load(scale_ptr + c)
    zp = tl.load(zp_ptr + c)
    inv = tl.math.div_rn(1.0, s)
    ds_lo = qmin - zp
    ds_hi = qmax - zp
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(p * BLOCK, M, P * BLOCK):
        m = start + tl.arange(0, BLOCK)
        valid = m < M
        o = _channel_offsets(m, c, CH_STRIDE, NUM_CH, PER_CHANNEL)
        x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + o, mask=valid, other=0.0).to(tl.float32)
        q = _rne(zp + x * inv)  # torch's backward adds the zero point before rounding
        lo = q < qmin
        hi = q > qmax
        in_range = (q >= qmin) & (q <= qmax)
        tl.store(dx_ptr + o, _round_to(g * in_range.to(tl.float32), dx_ptr.dtype.element_ty),
                 mask=valid)
        qc = tl.where(lo, qmin, tl.where(hi, qmax, q))
        xfq = (qc - zp) * s
        ds_in = g * (xfq - x) * inv * grad_factor
        ds_out = tl.where(lo, g * ds_lo, g * ds_hi) * grad_factor
        dz_out = g * -1.0 * s * grad_factor
        clipped = lo | hi
        acc_s += tl.where(valid, tl.where(clipped, ds_out, ds_in), 0.0)
        acc_z += tl.where(valid & clipped, dz_out, 0.0)
    tl.store(part_ptr + p * NUM_CH + c, tl.sum(acc_s, axis=0))
    tl.store(part_ptr + (P + p) * NUM_CH + c, tl.sum(acc_z, axis=0))


@triton.jit
def _qparams(mn, mx, qmin, qmax, eps, zp_sym, SYMMETRIC: tl.constexpr):
    """torch.ao _calculate_qparams on fp32 scalars: (scale, zero_point as fp32)."""
    min_neg = tl.minimum(mn, 0.0)
    max_pos = tl.maximum(mx, 0.0)
    if SYMMETRIC:
        max_pos = tl.maximum(-min_neg, max_pos)
        scale = tl.math.div_rn(max_pos, (qmax - qmin) * 0.5)
        scale = tl.maximum(scale, eps)
        zp = zp_sym
    else:
        scale = tl.math.div_rn(max_pos - min_neg, qmax - qmin)
        scale = tl.maximum(scale, eps)
        zp = qmin - _rne(tl.math.div_rn(min_neg, scale))
        zp = tl.minimum(tl.maximum(zp, qmin), qmax)
    return scale, zp


@triton.jit
def fq_minmax_channel_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr, zp_ptr, M, CH_STRIDE, NUM_CH,
                             qmin, qmax, eps, zp_sym, SYMMETRIC: tl.constexpr,
                             FUSED: tl.constexpr, SAVE_MASK: tl.constexpr,
                             SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per channel: min/max over the channel's M elements, qparams, and (FUSED:
    the channel is one contiguous memory range, e.g. axis 0 of a weight) the fake quant of
    the channel. SINGLE: the channel fits one block, so x is read exactly once."""
    c = tl.program_id(0)
    if SINGLE:
        m = tl.arange(0, BLOCK)
        valid = m < M
        o = _channel_offsets(m, c, CH_STRIDE, NUM_CH, True)
        x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float32)
        mn = tl.min(tl.where(valid, x, float("inf")), axis=0)
        mx = tl.max(tl.where(valid, x, float("-inf")), axis=0)
    else:
        vmin = tl.full([BLOCK], float("inf"), tl.float32)
        vmax = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in tl.range(0, M, BLOCK):
            m = start + tl.arange(0, BLOCK)
            valid = m < M
            o = _channel_offsets(m, c, CH_STRIDE, NUM_CH, True)
            x = tl.load(x_ptr + o, mask=valid, other=0.0).to(tl.float32)
            vmin = tl.minimum(vmin, tl.where(valid, x, float("inf")))
            vmax = tl.maximum(vmax, tl.where(valid, x, float("-inf")))
        mn = tl.min(vmin, axis=0)
        mx = tl.max(vmax, axis=0)
    scale, zp = _qparams(mn, mx, qmin, qmax, eps, zp_sym, SYMMETRIC)
    tl.store(scale_ptr + c, scale)
    tl.store(zp_ptr + c, zp.to(tl.int32))
    if FUSED:
        inv = tl.math.div_rn(1.0, scale)
        byte_end = ((c + 1) * M) // 8  # M % 8 == 0 with a mask: the channel owns whole bytes
        if SINGLE:
            out, in_range = _fq_math(x, scale, inv, zp, qmin, qmax)
            tl.store(out_ptr + c * M + m, _round_to(out, out_ptr.dtype.element_ty), mask=valid)
            if SAVE_MASK:
                _store_mask_bytes(mask_ptr, (c * M) // 8,
                                  (in_range & valid).to(tl.int32), byte_end, BLOCK)
        else:
            for start in tl.range(0, M, BLOCK):
                m = start + tl.arange(0, BLOCK)
                valid = m < M
                x = tl.load(x_ptr + c * M + m, mask=valid, other=0.0).to(tl.float32)
                out, in_range = _fq_math(x, scale, inv, zp, qmin, qmax)
                tl.store(out_ptr + c * M + m, _round_to(out, out_ptr.dtype.element_ty),
                         mask=valid)
                if SAVE_MASK:
                    _store_mask_bytes(mask_ptr, (c * M + start) // 8,
                                      (in_range & valid).to(tl.int32), byte_end, BLOCK)


@triton.jit
def minmax_partials_kernel(x_ptr, part_ptr, minv_ptr, maxv_ptr, N, HAS_STATE: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Per-program min/max of x into part[p] / part[P + p]. Program 0 also copies the old EMA
    state to part[2P], part[2P + 1]: the finishing kernel reads only the copies while its
    program 0 overwrites the buffers, so no program can see a half-updated state."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    vmin = tl.full([BLOCK], float("inf"), tl.float32)
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in tl.range(p * BLOCK, N, P * BLOCK):
        offs = start + tl.arange(0, BLOCK)
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
def minmax_finish_fq_kernel(x_ptr, out_ptr, mask_ptr, part_ptr, minv_ptr, maxv_ptr, scale_ptr,
                            zp_ptr, N, P, averaging_constant, qmin, qmax, eps, zp_sym,
                            EMA: tl.constexpr, SYMMETRIC: tl.constexpr,
                            SAVE_MASK: tl.constexpr, BLOCK: tl.constexpr,
                            PBLOCK: tl.constexpr):
    """Every program finishes the (tiny) min/max reduction, applies the EMA update
    (MovingAverageMinMaxObserver) when EMA, computes the qparams, and fake-quantizes its block;
    program 0 writes the state buffers."""
    pid = tl.program_id(0)
    pi = tl.arange(0, PBLOCK)
    pv = pi < P
    mn = tl.min(tl.load(part_ptr + pi, mask=pv, other=float("inf")), axis=0)
    mx = tl.max(tl.load(part_ptr + P + pi, mask=pv, other=float("-inf")), axis=0)
    if EMA:
        old_min = tl.load(part_ptr + 2 * P)
        old_max = tl.load(part_ptr + 2 * P + 1)
        first = (old_min == float("inf")) & (old_max == float("-inf"))
        # the first observation copies the batch range (keeping -0.0); the EMA operands are
        # made finite there only to avoid computing inf - inf
        old_min = tl.where(first, mn, old_min)
        old_max = tl.where(first, mx, old_max)
        mn = tl.where(first, mn, old_min + averaging_constant * (mn - old_min))
        mx = tl.where(first, mx, old_max + averaging_constant * (mx - old_max))
        if pid == 0:
            tl.store(minv_ptr, mn)
            tl.store(maxv_ptr, mx)
    scale, zp = _qparams(mn, mx, qmin, qmax, eps, zp_sym, SYMMETRIC)
    if pid == 0:
        tl.store(scale_ptr, scale)
        tl.store(zp_ptr, zp.to(tl.int32))
    inv = tl.math.div_rn(1.0, scale)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    out, in_range = _fq_math(x, scale, inv, zp, qmin, qmax)
    tl.store(out_ptr + offs, _round_to(out, out_ptr.dtype.element_ty), mask=valid)
    if SAVE_MASK:
        _store_mask_bytes(mask_ptr, pid * (BLOCK // 8), (in_range & valid).to(tl.int32),
                          (N + 7) // 8, BLOCK)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (acq_kernels._aot): fp32 and bf16 variants of streaming kernels.
_T = {"fp32": "*fp32", "bf16": "*bf16"}


def _aot_specs() -> list:
    specs = []
    spec = functools.partial(AotSpec, options={"enable_fp_fusion": False})  # as launched
    for tn, tp in _T.items():
        for mode in ("per_tensor", "per_channel", "per_channel_rows"):
            specs.append(spec(
                name=f"fq_forward[{tn},{mode}]", kernel=fq_forward_kernel,
                signature={"x_ptr": tp, "out_ptr": tp, "mask_ptr": "*u8", "scale_ptr": "*fp32",
                           "zp_ptr": "*i32", "N": "i32", "CH_STRIDE": "i32", "NUM_CH": "i32",
                           "qmin": "fp32", "qmax": "fp32", "PER_CHANNEL": "constexpr",
                           "ROWS": "constexpr", "SAVE_MASK": "constexpr", "BLOCK": "constexpr"},
                constexprs={"PER_CHANNEL": mode != "per_tensor", "ROWS": mode.endswith("rows"),
                            "SAVE_MASK": True, "BLOCK": BLOCK},
                aligned=("x_ptr", "out_ptr", "mask_ptr", "N", "CH_STRIDE"), streaming=True,
                num_warps=NUM_WARPS))
        specs.append(spec(
            name=f"fq_mask_backward[{tn}]", kernel=fq_mask_backward_kernel,
            signature={"g_ptr": tp, "mask_ptr": "*u8", "out_ptr": tp, "N": "i32",
                       "BLOCK": "constexpr"},
            constexprs={"BLOCK": BLOCK}, aligned=("g_ptr", "mask_ptr", "out_ptr", "N"),
            streaming=True, num_warps=NUM_WARPS))
        for per_channel in (False, True):
            # per-channel walks a channel's (possibly strided) elements: not provably
            # vectorisable, so only the per-tensor variant carries the streaming check
            specs.append(spec(
                name=f"fq_lsq_backward[{tn},{'per_channel' if per_channel else 'per_tensor'}]",
                kernel=fq_lsq_backward_kernel,
                signature={"g_ptr": tp, "x_ptr": tp, "dx_ptr": tp, "scale_ptr": "*fp32",
                           "zp_ptr": "*fp32", "part_ptr": "*fp32", "M": "i32",
                           "CH_STRIDE": "i32", "NUM_CH": "i32", "qmin": "fp32", "qmax": "fp32",
                           "grad_factor": "fp32", "PER_CHANNEL": "constexpr",
                           "BLOCK": "constexpr"},
                constexprs={"PER_CHANNEL": per_channel, "BLOCK": RED_BLOCK},
                aligned=("g_ptr", "x_ptr", "dx_ptr", "M"), streaming=not per_channel,
                num_warps=NUM_WARPS))
        specs.append(spec(
            name=f"minmax_partials[{tn}]", kernel=minmax_partials_kernel,
            signature={"x_ptr": tp, "part_ptr": "*fp32", "minv_ptr": "*fp32",
                       "maxv_ptr": "*fp32", "N": "i32", "HAS_STATE": "constexpr",
                       "BLOCK": "constexpr"},
            constexprs={"HAS_STATE": True, "BLOCK": RED_BLOCK}, aligned=("x_ptr", "N"),
            streaming=True, num_warps=NUM_WARPS))
        specs.append(spec(
            name=f"minmax_finish_fq[{tn}]", kernel=minmax_finish_fq_kernel,
            signature={"x_ptr": tp, "out_ptr": tp, "mask_ptr": "*u8", "part_ptr": "*fp32",
                       "minv_ptr": "*fp32", "maxv_ptr": "*fp32", "scale_ptr": "*fp32",
                       "zp_ptr": "*i32", "N": "i32", "P": "i32", "averaging_constant": "fp32",
                       "qmin": "fp32", "qmax": "fp32", "eps": "fp32", "zp_sym": "fp32",
                       "EMA": "constexpr", "SYMMETRIC": "constexpr", "SAVE_MASK": "constexpr",
                       "BLOCK": "constexpr", "PBLOCK": "constexpr"},
            constexprs={"EMA": True, "SYMMETRIC": False, "SAVE_MASK": True, "BLOCK": BLOCK,
                        "PBLOCK": MAX_PARTIALS},
            aligned=("x_ptr", "out_ptr", "mask_ptr", "N"), streaming=True,
            num_warps=NUM_WARPS))
        for single in (True, False):
            specs.append(spec(
                name=f"fq_minmax_channel[{tn},{'one_block' if single else 'looped'}]",
                kernel=fq_minmax_channel_kernel,
                signature={"x_ptr": tp, "out_ptr": tp, "mask_ptr": "*u8", "scale_ptr": "*fp32",
                           "zp_ptr": "*i32", "M": "i32", "CH_STRIDE": "i32", "NUM_CH": "i32",
                           "qmin": "fp32", "qmax": "fp32", "eps": "fp32", "zp_sym": "fp32",
                           "SYMMETRIC": "constexpr", "FUSED": "constexpr",
                           "SAVE_MASK": "constexpr", "SINGLE": "constexpr", "BLOCK": "constexpr"},
                constexprs={"SYMMETRIC": False, "FUSED": True, "SAVE_MASK": True,
                            "SINGLE": single, "BLOCK": 1024 if single else BLOCK},
                aligned=("x_ptr", "out_ptr", "mask_ptr", "M", "CH_STRIDE"), streaming=False,
                num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _aot_specs()
