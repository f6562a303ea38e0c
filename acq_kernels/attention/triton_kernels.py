"""Triton kernels of the spatial-attention family.

Forward: `_attn_map_kernel` reads F once. One program owns one sample x BLOCK_HW pixels and loops
over C, accumulating |F|^p in fp32; it writes the fp32 map. When one block covers the whole map
(FINALIZE) the same program also computes norm, sum and center and writes every output; otherwise
`_attn_finalize_kernel` does that from the fp32 map ([N, HW], C times smaller than F).
Backward: `_attn_feat_grad_kernel` reads F and dA once and writes dF once.
Loss: `_pair_sq_dist_fwd_kernel` / `_pair_sq_dist_bwd_kernel`, one program per row.

Layouts: CHANNELS_LAST=False addresses F as n*stride_n + c*stride_c + s (pixels contiguous:
NCHW and channel slices of it); CHANNELS_LAST=True as n*stride_n + s*stride_s + c (channels
contiguous: channels_last and channel slices of it). Tiles are [BLOCK_C, BLOCK_HW] either way;
Triton's coalescing picks the contiguous axis from the offsets.

NCHW maps whose H*W is not a whole number of 16-byte vectors (7x7 in any dtype, 14x14 in
16-bit) would read channel rows that start unaligned, so scalar loads. When the channels of a
sample are one aligned run, the plane kernels (`_attn_map_plane_kernel`,
`_attn_feat_grad_plane_kernel`) read it instead as rows of G channels (G*H*W a whole number of
vectors) with column j holding pixel j % (H*W): 128-bit loads, and the G column sums of a
pixel are folded once per sample (see plane_geometry).
"""
import math

import triton
import triton.language as tl

from .._aot import AotSpec

EPS = tl.constexpr(1e-12)  # as reference.EPS
# Passed to every launch and AOT spec (Triton 3.10 changes the default): FMA contraction on;
# results are tolerance-tested against the reference, not bitwise.
ENABLE_FP_FUSION = True


@triton.jit
def _pow_abs(x, p, P_IS_TWO: tl.constexpr):
    if P_IS_TWO:
        return x * x
    else:
        # exp(p log|x|): 0 at x == 0 (exp(-inf)), NaN stays NaN.
        return tl.exp(p * tl.log(tl.abs(x)))


@triton.jit
def _pow_grad(x, pm1, P_IS_TWO: tl.constexpr):
    """d|x|^p/dx without p: x (p == 2) or sign(x)|x|^(p-1), 0 at x == 0."""
    if P_IS_TWO:
        return x
    else:
        # log of 1 at x == 0 keeps 0 * -inf (p == 1) and exp(+inf) (p < 1) out of the way.
        mag = tl.exp(pm1 * tl.log(tl.where(x == 0.0, 1.0, tl.abs(x))))
        return tl.where(x == 0.0, 0.0, tl.where(x > 0.0, mag, -mag))


@triton.jit
def _norm_and_center(sq, tot, sx, sy):
    """||A||, 1/max(||A||, eps), and the center (sum A u / sum A, sum A v / sum A; 0 for A = 0)
    of one sample's map from its sums."""
    norm = tl.sqrt(sq)
    inv = 1.0 / tl.where(norm < EPS, EPS, norm)  # not tl.maximum: it drops NaN
    zero = tot == 0.0
    cx = tl.where(zero, 0.0, sx / tl.where(zero, 1.0, tot))
    cy = tl.where(zero, 0.0, sy / tl.where(zero, 1.0, tot))
    return norm, inv, cx, cy


@triton.jit
def _store_center_and_stats(center_ptr, stats_ptr, n, norm, tot, cx, cy):
    """center[n] in the output dtype; stats[n] = (||A||, sum A, cx, cy) in fp32 for the backward."""
    dt = center_ptr.dtype.element_ty
    tl.store(center_ptr + n * 2, cx.to(dt))
    tl.store(center_ptr + n * 2 + 1, cy.to(dt))
    tl.store(stats_ptr + n * 4, norm)
    tl.store(stats_ptr + n * 4 + 1, tot)
    tl.store(stats_ptr + n * 4 + 2, cx)
    tl.store(stats_ptr + n * 4 + 3, cy)


@triton.jit
def _finalize_block(a, s, smask, W, H, n, amap_ptr, anorm_ptr, center_ptr, stats_ptr):
    """All outputs of one sample whose whole fp32 map `a` (masked to 0) is in this block."""
    w = s % W
    h = s // W
    u = (2 * w + 1).to(tl.float32) / W - 1.0
    v = (2 * h + 1).to(tl.float32) / H - 1.0
    tot = tl.sum(a, axis=0)
    norm, inv, cx, cy = _norm_and_center(tl.sum(a * a, axis=0), tot, tl.sum(a * u, axis=0), tl.sum(a * v, axis=0))
    HW = H * W
    dt = amap_ptr.dtype.element_ty
    tl.store(amap_ptr + n * HW + s, a.to(dt), mask=smask)
    tl.store(anorm_ptr + n * HW + s, (a * inv).to(dt), mask=smask)
    _store_center_and_stats(center_ptr, stats_ptr, n, norm, tot, cx, cy)


@triton.jit
def _attn_map_kernel(f_ptr, a32_ptr, amap_ptr, anorm_ptr, center_ptr, stats_ptr,
                     C, HW, H, W, stride_n, stride_c, stride_s, n_hw_blocks, p,
                     CHANNELS_LAST: tl.constexpr, P_IS_TWO: tl.constexpr,
                     FINALIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                     VEC: tl.constexpr):
    """The contiguous axis' size and the strides that step across it come in units of VEC
    elements (see vec_units): HW, stride_n, stride_c (NCHW); C, stride_n, stride_s
    (channels_last)."""
    stride_n = stride_n * VEC
    if CHANNELS_LAST:
        C = C * VEC
        stride_s = stride_s * VEC
    else:
        HW = HW * VEC
        stride_c = stride_c * VEC
    pid = tl.program_id(0)
    n = (pid // n_hw_blocks).to(tl.int64)  # n * HW, n * stride_n may pass 2^31
    hb = pid % n_hw_blocks
    s = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    smask = s < HW
    cs = tl.arange(0, BLOCK_C)
    base = f_ptr + n * stride_n
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        if CHANNELS_LAST:
            off = c[:, None] + s[None, :] * stride_s
        else:
            off = c[:, None] * stride_c + s[None, :]
        m = (c < C)[:, None] & smask[None, :]
        x = tl.load(base + off, mask=m, other=0.0).to(tl.float32)
        acc += _pow_abs(x, p, P_IS_TWO)
    a = tl.sum(acc, axis=0) / C
    tl.store(a32_ptr + n * HW + s, a, mask=smask)
    if FINALIZE:
        _finalize_block(a, s, smask, W, H, n, amap_ptr, anorm_ptr, center_ptr, stats_ptr)


@triton.jit
def _plane_fold(col_ptr, s, smask, HW, G: tl.constexpr, BLOCK: tl.constexpr):
    """Per-pixel sums from one sample's plane column sums: a[s] = sum_g col[g HW + s]."""
    a = tl.zeros([BLOCK], dtype=tl.float32)
    for g in tl.static_range(G):
        a += tl.load(col_ptr + g * HW + s, mask=smask, other=0.0)
    return a


@triton.jit
def _attn_map_plane_kernel(f_ptr, col_ptr, a32_ptr, amap_ptr, anorm_ptr, center_ptr, stats_ptr,
                           C, HW, H, W, R, T, GHW, stride_n, n_jb, p,
                           P_IS_TWO: tl.constexpr, FINALIZE: tl.constexpr, G: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr,
                           VEC: tl.constexpr):
    """Forward for NCHW maps whose H*W is not a multiple of the 16-byte vector (7x7, 14x14
    in 16-bit): sample n's channels are one contiguous C*HW run, read as R rows of GHW = G*HW
    elements (G channels; GHW a multiple of VEC, so every row starts 16-byte aligned and
    the loads stay 128-bit) plus a partial row of T = (C % G)*HW. Column j holds pixel
    j % HW; program (n, jb) sums |F|^p down its columns into col[n, j] (fp32). FINALIZE (one
    program has every column): the same program folds the G columns of each pixel
    (after a barrier: other threads wrote them) and writes every output; otherwise
    _attn_finalize_kernel folds. GHW and stride_n come in units of VEC."""
    GHW = GHW * VEC
    stride_n = stride_n * VEC
    pid = tl.program_id(0)
    n = (pid // n_jb).to(tl.int64)  # n * stride_n may pass 2^31
    jb = pid % n_jb
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = j < GHW
    base = f_ptr + n * stride_n
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_J], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rs
        rv = r < R
        off = tl.where(rv, r, 0)[:, None] * GHW + j[None, :]
        x = tl.load(base + off, mask=rv[:, None] & jmask[None, :], other=0.0).to(tl.float32)
        acc += _pow_abs(x, p, P_IS_TWO)
    col = tl.sum(acc, axis=0)
    if T > 0:  # the last C % G channels: one partial, masked row
        tm = j < T
        x = tl.load(base + R * GHW + j, mask=tm, other=0.0).to(tl.float32)
        col += tl.where(tm, _pow_abs(x, p, P_IS_TWO), 0.0)
    tl.store(col_ptr + n * GHW + j, col, mask=jmask)
    if FINALIZE:
        tl.debug_barrier()
        s = tl.arange(0, BLOCK_HW)
        smask = s < HW
        a = _plane_fold(col_ptr + n * GHW, s, smask, HW, G, BLOCK_HW) / C
        tl.store(a32_ptr + n * HW + s, a, mask=smask)
        _finalize_block(a, s, smask, W, H, n, amap_ptr, anorm_ptr, center_ptr, stats_ptr)


@triton.jit
def _finalize_map(a32_ptr, col_ptr, n, s, m, C, HW, G: tl.constexpr, BLOCK: tl.constexpr):
    """The fp32 map at pixels s of sample n: from a32 (G = 0), or folded from the plane
    forward's column sums (G > 0)."""
    if G > 0:
        return _plane_fold(col_ptr + n * (G * HW), s, m, HW, G, BLOCK) / C
    else:
        return tl.load(a32_ptr + n * HW + s, mask=m, other=0.0)


@triton.jit
def _attn_finalize_kernel(a32_ptr, col_ptr, amap_ptr, anorm_ptr, center_ptr, stats_ptr, C, H, W,
                          G: tl.constexpr, BLOCK: tl.constexpr):
    """Second pass over the fp32 map of one sample when it spans several forward programs
    (G > 0: the plane forward's G column sums per pixel are folded here, and a32 written)."""
    n = tl.program_id(0).to(tl.int64)
    HW = H * W
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    tot = tl.zeros([BLOCK], dtype=tl.float32)
    sx = tl.zeros([BLOCK], dtype=tl.float32)
    sy = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, HW, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        m = s < HW
        a = _finalize_map(a32_ptr, col_ptr, n, s, m, C, HW, G, BLOCK)
        if G > 0:
            tl.store(a32_ptr + n * HW + s, a, mask=m)
        w = s % W
        h = s // W
        sq += a * a
        tot += a
        sx += a * ((2 * w + 1).to(tl.float32) / W - 1.0)
        sy += a * ((2 * h + 1).to(tl.float32) / H - 1.0)
    tot_t = tl.sum(tot, axis=0)
    norm, inv, cx, cy = _norm_and_center(tl.sum(sq, axis=0), tot_t, tl.sum(sx, axis=0), tl.sum(sy, axis=0))
    dt = amap_ptr.dtype.element_ty
    for s0 in range(0, HW, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        m = s < HW
        a = _finalize_map(a32_ptr, col_ptr, n, s, m, C, HW, G, BLOCK)
        tl.store(amap_ptr + n * HW + s, a.to(dt), mask=m)
        tl.store(anorm_ptr + n * HW + s, (a * inv).to(dt), mask=m)
    _store_center_and_stats(center_ptr, stats_ptr, n, norm, tot_t, cx, cy)


@triton.jit
def _attn_map_grad_kernel(a32_ptr, stats_ptr, ga_ptr, gn_ptr, gc_ptr, da_ptr, H, W,
                          HAS_GA: tl.constexpr, HAS_GN: tl.constexpr, HAS_GC: tl.constexpr,
                          BLOCK: tl.constexpr):
    """dA [N, HW] fp32 for one sample from the output grads (see reference.map_grad):
    dA = g_amap + (g_anorm - an <an, g_anorm>) / ||A|| + (gx (u - cx) + gy (v - cy)) / sum A."""
    n = tl.program_id(0).to(tl.int64)
    HW = H * W
    row = n * HW
    norm = tl.load(stats_ptr + n * 4)
    tot = tl.load(stats_ptr + n * 4 + 1)
    cx = tl.load(stats_ptr + n * 4 + 2)
    cy = tl.load(stats_ptr + n * 4 + 3)
    active = norm >= EPS  # F.normalize's clamp_min passes grads where norm >= eps
    denom = tl.where(active, norm, EPS)
    dot = 0.0
    if HAS_GN:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s0 in range(0, HW, BLOCK):
            s = s0 + tl.arange(0, BLOCK)
            m = s < HW
            a = tl.load(a32_ptr + row + s, mask=m, other=0.0)
            g = tl.load(gn_ptr + row + s, mask=m, other=0.0).to(tl.float32)
            acc += (a / denom) * g
        dot = tl.where(active, tl.sum(acc, axis=0), 0.0)
    gx = 0.0
    gy = 0.0
    if HAS_GC:
        gx = tl.load(gc_ptr + n * 2).to(tl.float32)
        gy = tl.load(gc_ptr + n * 2 + 1).to(tl.float32)
    zero_map = tot == 0.0
    inv_tot = 1.0 / tl.where(zero_map, 1.0, tot)
    for s0 in range(0, HW, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        m = s < HW
        d = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_GA:
            d += tl.load(ga_ptr + row + s, mask=m, other=0.0).to(tl.float32)
        if HAS_GN:
            a = tl.load(a32_ptr + row + s, mask=m, other=0.0)
            g = tl.load(gn_ptr + row + s, mask=m, other=0.0).to(tl.float32)
            d += (g - (a / denom) * dot) / denom
        if HAS_GC:
            w = s % W
            h = s // W
            u = (2 * w + 1).to(tl.float32) / W - 1.0
            v = (2 * h + 1).to(tl.float32) / H - 1.0
            d += tl.where(zero_map, 0.0, (gx * (u - cx) + gy * (v - cy)) * inv_tot)
        tl.store(da_ptr + row + s, d, mask=m)


@triton.jit
def _attn_feat_grad_kernel(f_ptr, da_ptr, df_ptr, C, HW,
                           f_stride_n, f_stride_c, f_stride_s,
                           g_stride_n, g_stride_c, g_stride_s,
                           n_hw_blocks, scale, pm1,
                           CHANNELS_LAST: tl.constexpr, P_IS_TWO: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                           VEC: tl.constexpr):
    """dF = dA[n, s] * scale * g(F); g = F (p == 2, scale = 2/C) or sign(F)|F|^(p-1)
    (scale = p/C), 0 at F == 0. As in _attn_map_kernel, the contiguous axis' size (HW or C)
    and the n and c (NCHW) / s (channels_last) strides come in units of VEC elements."""
    f_stride_n = f_stride_n * VEC
    g_stride_n = g_stride_n * VEC
    if CHANNELS_LAST:
        C = C * VEC
        f_stride_s = f_stride_s * VEC
        g_stride_s = g_stride_s * VEC
    else:
        HW = HW * VEC
        f_stride_c = f_stride_c * VEC
        g_stride_c = g_stride_c * VEC
    pid = tl.program_id(0)
    n = (pid // n_hw_blocks).to(tl.int64)
    hb = pid % n_hw_blocks
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    smask = s < HW
    m = (c < C)[:, None] & smask[None, :]
    da = tl.load(da_ptr + n * HW + s, mask=smask, other=0.0) * scale
    if CHANNELS_LAST:
        f_off = c[:, None] + s[None, :] * f_stride_s
        g_off = c[:, None] + s[None, :] * g_stride_s
    else:
        f_off = c[:, None] * f_stride_c + s[None, :]
        g_off = c[:, None] * g_stride_c + s[None, :]
    x = tl.load(f_ptr + n * f_stride_n + f_off, mask=m, other=0.0).to(tl.float32)
    out = da[None, :] * _pow_grad(x, pm1, P_IS_TWO)
    tl.store(df_ptr + n * g_stride_n + g_off, out.to(df_ptr.dtype.element_ty), mask=m)


@triton.jit
def _attn_feat_grad_plane_kernel(f_ptr, da_ptr, df_ptr, HW, R, GHW, f_stride_n, g_stride_n,
                                 n_jb, scale, pm1, P_IS_TWO: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                                 VEC: tl.constexpr):
    """_attn_feat_grad_kernel on the plane view of _attn_map_plane_kernel (NCHW, H*W not a
    multiple of the vector): program (n, jb; rb) owns rows rb*BLOCK_R.. and columns jb*BLOCK_J..
    of sample n's [R, GHW] rows. dF is contiguous, so R*GHW = C*HW here (whole rows only:
    C*HW a whole number of vectors means C % G == 0). The pixel of a column (j % HW) and its
    dA are found once per column, not per element; the mask is constant over VEC columns,
    so accesses stay 128-bit. GHW and the n strides come in units of VEC."""
    GHW = GHW * VEC
    f_stride_n = f_stride_n * VEC
    g_stride_n = g_stride_n * VEC
    pid = tl.program_id(0)
    n = (pid // n_jb).to(tl.int64)
    jb = pid % n_jb
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = j < GHW
    pix = tl.where(jmask, j, 0) % HW
    da = tl.load(da_ptr + n * HW + pix, mask=jmask, other=0.0) * scale
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rv = r < R
    off = tl.where(rv, r, 0)[:, None] * GHW + j[None, :]
    m = rv[:, None] & jmask[None, :]
    x = tl.load(f_ptr + n * f_stride_n + off, mask=m, other=0.0).to(tl.float32)
    out = da[None, :] * _pow_grad(x, pm1, P_IS_TWO)
    tl.store(df_ptr + n * g_stride_n + off, out.to(df_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pair_sq_dist_fwd_kernel(a_ptr, b_ptr, out_ptr, K, stride_a, stride_b, BLOCK: tl.constexpr):
    """out[n] = sum_k (a[n, k] - b[n, k])^2 in fp32 (rows contiguous along k)."""
    n = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = k < K
        a = tl.load(a_ptr + n.to(tl.int64) * stride_a + k, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + n.to(tl.int64) * stride_b + k, mask=m, other=0.0).to(tl.float32)
        d = a - b
        acc += d * d
    tl.store(out_ptr + n, tl.sum(acc, axis=0))


@triton.jit
def _pair_sq_dist_bwd_kernel(a_ptr, b_ptr, g_ptr, ga_ptr, gb_ptr, K, stride_a, stride_b,
                             stride_ga, stride_gb,
                             WRITE_A: tl.constexpr, WRITE_B: tl.constexpr, BLOCK: tl.constexpr):
    """ga = 2 (a - b) g[n], gb = -ga, one read of a and b."""
    n = tl.program_id(0)
    g2 = 2.0 * tl.load(g_ptr + n).to(tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = k < K
        a = tl.load(a_ptr + n.to(tl.int64) * stride_a + k, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + n.to(tl.int64) * stride_b + k, mask=m, other=0.0).to(tl.float32)
        d = (a - b) * g2
        if WRITE_A:
            tl.store(ga_ptr + n.to(tl.int64) * stride_ga + k, d.to(ga_ptr.dtype.element_ty), mask=m)
        if WRITE_B:
            tl.store(gb_ptr + n.to(tl.int64) * stride_gb + k, (-d).to(gb_ptr.dtype.element_ty),
                     mask=m)


# ---- launch configuration (shared by the launchers and the AOT specs) ----

def map_blocks(C: int, HW: int, channels_last: bool):
    """(BLOCK_C, BLOCK_HW) of the forward tile: ~2K elements, wide along the contiguous axis."""
    if channels_last:
        bc = min(triton.next_power_of_2(C), 64)
        bhw = min(triton.next_power_of_2(HW), max(1, 2048 // bc))
    else:
        bhw = min(triton.next_power_of_2(HW), 256)
        bc = min(triton.next_power_of_2(C), max(1, 2048 // bhw))
    return bc, bhw


def grad_blocks(C: int, HW: int, channels_last: bool):
    return map_blocks(C, HW, channels_last)


def vec_units(element_size: int, *sizes: int) -> int:
    """VEC of the channel-tile kernels: the widest 16-byte-or-less element group dividing
    every size (the contiguous axis' length and the strides across it: HW and the n / c
    strides for NCHW, C and the n / s strides for channels_last), passed in units of it so
    Triton can prove rows start VEC-aligned (14x14 fp32: 4 -> 128-bit loads; 72 channels
    channels_last: 4; 7x7: 1). Triton itself only specialises sizes divisible by 16."""
    vec = max(1, 16 // element_size)
    while vec > 1 and any(s % vec for s in sizes):
        vec //= 2
    return vec


def plane_geometry(element_size: int, N: int, C: int, HW: int, stride_c: int, *stride_ns: int):
    """(VEC, G) of the plane kernels for an NCHW map, or None where the channel-tile kernels
    already read 16-byte vectors (HW a multiple of the vector) or the plane view does not
    apply: channels must follow each other (stride_c == HW) and every sample must start
    16-byte aligned (its stride a multiple of the vector; not waived for N == 1, so that a
    sample's result does not depend on the batch it is in). G = channels per row: the fewest
    whose G*HW elements are a whole number of vectors."""
    vec = max(1, 16 // element_size)
    if HW % vec == 0 or stride_c != HW or C < 1:
        return None
    if any(sn % vec for sn in stride_ns):
        return None
    return vec, vec // math.gcd(HW, vec)


def plane_blocks(ghw: int):
    """(BLOCK_R, BLOCK_J) of a plane tile: ~2K elements, up to 1024 columns, so that maps up
    to ~1024 / G pixels are covered by one program (which then finalizes in place)."""
    bj = min(triton.next_power_of_2(ghw), 1024)
    return max(1, 2048 // bj), bj


def _sig(kernel, dt: str, constexprs=(), floats=(), ptr_types=None) -> dict:
    """An AOT signature from the kernel's argument names: `*_ptr` -> *dt (or ptr_types[name]),
    names in `floats` -> fp32, constexprs, the rest i32."""
    ptr_types = ptr_types or {}
    sig = {}
    for a in kernel.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = ptr_types.get(a, f"*{dt}")
        elif a in floats:
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


_F32_OUT = {"a32_ptr": "*fp32", "stats_ptr": "*fp32", "col_ptr": "*fp32", "da_ptr": "*fp32"}


def _aot_specs():
    import functools
    AotSpec_ = functools.partial(AotSpec, options={"enable_fp_fusion": ENABLE_FP_FUSION})

    def map_spec(name, dt, constexprs, **kw):
        return AotSpec_(name=name, kernel=_attn_map_kernel, constexprs=constexprs,
                        signature=_sig(_attn_map_kernel, dt, constexprs, ("p",), _F32_OUT), **kw)

    def grad_spec(name, dt, constexprs, **kw):
        return AotSpec_(name=name, kernel=_attn_feat_grad_kernel, constexprs=constexprs,
                        signature=_sig(_attn_feat_grad_kernel, dt, constexprs, ("scale", "pm1"),
                                       _F32_OUT), **kw)

    specs = []
    for dt, tag in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")):
        for cl in (False, True):
            lay = "nhwc" if cl else "nchw"
            # 64x56x56 (ResNet-18 stage 1): the streaming case that sets the bandwidth target.
            bc, bhw = map_blocks(64, 3136, cl)
            specs.append(map_spec(
                f"attn_map_fwd[{tag},{lay}]", dt,
                {"CHANNELS_LAST": cl, "P_IS_TWO": True, "FINALIZE": False, "BLOCK_C": bc,
                 "BLOCK_HW": bhw, "VEC": 1},
                aligned=("f_ptr", "a32_ptr", "C", "HW", "stride_n", "stride_c", "stride_s"),
                streaming=True))
            specs.append(grad_spec(
                f"attn_feat_grad[{tag},{lay}]", dt,
                {"CHANNELS_LAST": cl, "P_IS_TWO": True, "BLOCK_C": bc, "BLOCK_HW": bhw,
                 "VEC": 1},
                aligned=("f_ptr", "da_ptr", "df_ptr", "C", "HW", "f_stride_n", "f_stride_c",
                         "f_stride_s", "g_stride_n", "g_stride_c", "g_stride_s"),
                streaming=True))
    # 256x14x14 (ResNet-18 stage 3, NCHW fp32): HW = 196 is not 16-divisible; in units of
    # VEC = 4 rows are provably 16-byte aligned, so the channel-tile loads stay 128-bit.
    bc, bhw = map_blocks(256, 196, False)
    vec = vec_units(4, 196, 256 * 196, 196)
    specs.append(map_spec(
        "attn_map_fwd[fp32,nchw,14x14]", "fp32",
        {"CHANNELS_LAST": False, "P_IS_TWO": True, "FINALIZE": True, "BLOCK_C": bc,
         "BLOCK_HW": bhw, "VEC": vec}, aligned=("f_ptr", "a32_ptr"), streaming=True))
    specs.append(grad_spec(
        "attn_feat_grad[fp32,nchw,14x14]", "fp32",
        {"CHANNELS_LAST": False, "P_IS_TWO": True, "BLOCK_C": bc, "BLOCK_HW": bhw, "VEC": vec},
        aligned=("f_ptr", "da_ptr", "df_ptr"), streaming=True))
    # channels_last with a channel count that is not 16-divisible (72: MobileNet/EfficientNet
    # widths): C and the strides across it in units of VEC keep the loads 128-bit.
    for dt, esize in (("fp32", 4), ("bf16", 2)):
        bc, bhw = map_blocks(72, 784, True)
        vec = vec_units(esize, 72, 72 * 784, 72)
        specs.append(map_spec(
            f"attn_map_fwd[{dt},nhwc,C72]", dt,
            {"CHANNELS_LAST": True, "P_IS_TWO": True, "FINALIZE": False, "BLOCK_C": bc,
             "BLOCK_HW": bhw, "VEC": vec}, aligned=("f_ptr", "a32_ptr"), streaming=True))
        specs.append(grad_spec(
            f"attn_feat_grad[{dt},nhwc,C72]", dt,
            {"CHANNELS_LAST": True, "P_IS_TWO": True, "BLOCK_C": bc, "BLOCK_HW": bhw,
             "VEC": vec}, aligned=("f_ptr", "da_ptr", "df_ptr"), streaming=True))
    # The channel-tile kernel where no vector fits (a 7x7 map whose samples start unaligned,
    # e.g. an odd channel count): scalar, one program per map, finalized in place; general p.
    bc, bhw = map_blocks(511, 49, False)
    specs.append(map_spec(
        "attn_map_fwd_fused[fp32,nchw,p]", "fp32",
        {"CHANNELS_LAST": False, "P_IS_TWO": False, "FINALIZE": True, "BLOCK_C": bc,
         "BLOCK_HW": bhw, "VEC": 1}, aligned=("f_ptr",)))
    # Plane kernels: NCHW maps whose H*W is not a whole number of 16-byte vectors (ResNet-18
    # stage 4, 512x7x7, in every dtype; stage 3, 256x14x14, in 16-bit). Sizes are not declared
    # divisible: the 128-bit loads come from the units of VEC alone.
    for dt, (C, H), p2 in (("fp32", (512, 7), True), ("bf16", (512, 7), True),
                           ("fp16", (512, 7), False), ("bf16", (256, 14), True),
                           ("fp16", (256, 14), True)):
        HW = H * H
        vec, G = plane_geometry(4 if dt == "fp32" else 2, 2, C, HW, HW, C * HW)
        br, bj = plane_blocks(G * HW)
        tag = f"{dt},{H}x{H}" + ("" if p2 else ",p")
        fwd_cx = {"P_IS_TWO": p2, "FINALIZE": True, "G": G, "BLOCK_R": br, "BLOCK_J": bj,
                  "BLOCK_HW": triton.next_power_of_2(HW), "VEC": vec}
        specs.append(AotSpec_(
            name=f"attn_map_plane[{tag}]", kernel=_attn_map_plane_kernel, constexprs=fwd_cx,
            signature=_sig(_attn_map_plane_kernel, dt, fwd_cx, ("p",), _F32_OUT),
            aligned=("f_ptr", "col_ptr", "a32_ptr"), streaming=True))
        bwd_cx = {"P_IS_TWO": p2, "BLOCK_R": br, "BLOCK_J": bj, "VEC": vec}
        specs.append(AotSpec_(
            name=f"attn_feat_grad_plane[{tag}]", kernel=_attn_feat_grad_plane_kernel,
            constexprs=bwd_cx, aligned=("f_ptr", "da_ptr", "df_ptr"), streaming=True,
            signature=_sig(_attn_feat_grad_plane_kernel, dt, bwd_cx, ("scale", "pm1"),
                           _F32_OUT)))
    for G in (0, 4):  # from a32 / folding a plane forward's column sums
        cx = {"G": G, "BLOCK": 1024}
        specs.append(AotSpec_(
            name=f"attn_finalize[bf16{',fold' if G else ''}]", kernel=_attn_finalize_kernel,
            constexprs=cx, signature=_sig(_attn_finalize_kernel, "bf16", cx, (), _F32_OUT),
            aligned=("a32_ptr", "col_ptr")))
    cx = {"HAS_GA": True, "HAS_GN": True, "HAS_GC": True, "BLOCK": 1024}
    specs.append(AotSpec_(
        name="attn_map_grad[bf16]", kernel=_attn_map_grad_kernel, constexprs=cx,
        signature=_sig(_attn_map_grad_kernel, "bf16", cx, (), _F32_OUT),
        aligned=("a32_ptr", "da_ptr")))
    cx = {"BLOCK": 1024}
    specs.append(AotSpec_(
        name="pair_sq_dist_fwd[bf16]", kernel=_pair_sq_dist_fwd_kernel, constexprs=cx,
        signature=_sig(_pair_sq_dist_fwd_kernel, "bf16", cx, (), {"out_ptr": "*fp32"}),
        aligned=("a_ptr", "b_ptr", "K", "stride_a", "stride_b")))
    cx = {"WRITE_A": True, "WRITE_B": True, "BLOCK": 1024}
    specs.append(AotSpec_(
        name="pair_sq_dist_bwd[bf16]", kernel=_pair_sq_dist_bwd_kernel, constexprs=cx,
        signature=_sig(_pair_sq_dist_bwd_kernel, "bf16", cx, (), {"g_ptr": "*fp32"}),
        aligned=("a_ptr", "b_ptr", "ga_ptr", "gb_ptr", "K", "stride_a", "stride_b", "stride_ga",
                 "stride_gb")))
    return specs


AOT_SPECS = _aot_specs()
