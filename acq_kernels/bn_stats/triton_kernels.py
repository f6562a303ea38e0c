"""Triton kernels for batched BatchNorm statistics over many layers in one launch.

All layers of one call are described by a tile table built once per distinct set of shapes
and strides (see `plan.py`). A tile is a 2D region of one layer's input,
`x[layer_off + off + r * row_stride + i]` for rows r < n_rows and lanes i < n_cols, whose
lane axis is contiguous in memory (so loads vectorise). Two tile modes:

  mode 0 (channel-inner: channels_last / [N, C]): lane i holds channel (chan0 + i) % C and
          each lane writes its own partial (count, mean, M2);
  mode 1 (row mode: NCHW): the rows are (sample, channel) runs of contiguous positions, row r
          holding channel (chan0 + r) % C; each row writes its own partial (slots slot + r).

Integer fields that feed addresses are stored in units of VEC elements and multiplied by the
constexpr VEC here, which lets Triton prove 16-byte alignment and emit 128-bit loads; the host
launches VEC=1 when some layer is not aligned that way.
"""
import triton
import triton.language as tl

# Tile table columns (int64).
T_LAYER, T_OFF, T_RSTRIDE, T_NROWS, T_NCOLS, T_MODE, T_CHAN0, T_SLOT, T_C, T_CBASE = range(10)
TILE_FIELDS = 10
# Combine table columns (int64), one row per program: a block of channels of one layer.
K_PBASE, K_P, K_C, K_CBASE, K_C0 = range(5)
COMBINE_FIELDS = 5

# Passed to every launch and AOT spec (Triton 3.10 changes the default): FMA contraction on;
# the statistics are tolerance-tested against the reference, not bitwise.
ENABLE_FP_FUSION = True

BLOCK_R = 32      # rows per inner step of a tile
# Under TRITON_INTERPRET every program and step costs Python time: fewer, bigger blocks.
BLOCK_R_INTERPRET = 256
BLOCK_I_INTERPRET = 256


@triton.jit
def _chan_merge(cnt, mean, m2, nb, bmean, bm2):
    """Chan et al.'s parallel merge of a running (count, mean, M2) with a block's (nb, bmean, bM2)."""
    tot = cnt + nb
    w = nb / tl.maximum(tot, 1.0)
    delta = bmean - mean
    return tot, mean + delta * w, m2 + bm2 + delta * delta * cnt * w
BLOCK_I = 64      # lanes (contiguous elements) of a tile
BLOCK_C = 128     # channels per combine program
BLOCK_P = 16      # partial rows per combine step (merged as a tree)


@triton.jit
def bn_partial_kernel(x_ptr, layer_off_ptr, tiles_ptr, part_ptr, n_slots, shift_ptr,
                      BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, VEC: tl.constexpr):
    """One program per tile, writing (count, mean - k, M2) partials to part [3, n_slots] and
    the channel shifts k to shift [total_c]. k is the channel's first element, the same for
    every tile, so partial means are small numbers that merge without cancellation; blocks
    are merged with Chan's formula, each centred on its own mean."""
    t = tl.program_id(0).to(tl.int64)
    d = tiles_ptr + t * 10
    layer = tl.load(d + 0)
    layer_base = x_ptr + tl.load(layer_off_ptr + layer) * VEC
    chan0 = tl.load(d + 6)
    c_layer = tl.load(d + 8)
    cbase = tl.load(d + 9)
    off = tl.load(d + 1) * VEC
    rstride = tl.load(d + 2) * VEC
    n_rows = tl.load(d + 3).to(tl.int32)
    n_cols = tl.load(d + 4).to(tl.int32) * VEC
    mode = tl.load(d + 5)
    slot = tl.load(d + 7)

    lanes = tl.arange(0, BLOCK_I)
    rows = tl.arange(0, BLOCK_R)
    base = layer_base + off
    if mode == 0:
        # Channel-inner: lane i is one channel; accumulate down the rows, a partial per lane.
        lmask = lanes < n_cols
        ch = (chan0 + lanes) % c_layer
        k = tl.load(layer_base + ch, mask=lmask, other=0.0).to(tl.float32)
        tl.store(shift_ptr + cbase + ch, k, mask=lmask)
        cnt = tl.zeros([BLOCK_I], dtype=tl.float32)
        mean = tl.zeros([BLOCK_I], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_I], dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rr = r0 + rows
            m = (rr[:, None] < n_rows) & lmask[None, :]
            x = tl.load(base + rr[:, None].to(tl.int64) * rstride + lanes[None, :], mask=m,
                        other=0.0).to(tl.float32)
            x = tl.where(m, x - k[None, :], 0.0)
            nb = tl.where(lmask, tl.minimum(n_rows - r0, BLOCK_R), 0).to(tl.float32)
            bmean = tl.sum(x, axis=0) / tl.maximum(nb, 1.0)
            dev = tl.where(m, x - bmean[None, :], 0.0)
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, nb, bmean, tl.sum(dev * dev, axis=0))
        tl.store(part_ptr + slot + lanes, cnt, mask=lmask)
        tl.store(part_ptr + n_slots + slot + lanes, mean, mask=lmask)
        tl.store(part_ptr + 2 * n_slots + slot + lanes, m2, mask=lmask)
    else:
        # Row mode (NCHW): each row is one (sample, channel) run; a partial per row.
        for r0 in range(0, n_rows, BLOCK_R):
            rr = r0 + rows
            rmask = rr < n_rows
            rbase = base + rr[:, None].to(tl.int64) * rstride
            # Row r is channel (chan0 + r) % C, whose first element starts row `ch`.
            ch = (chan0 + rr) % c_layer
            k = tl.load(layer_base + ch.to(tl.int64) * rstride, mask=rmask, other=0.0).to(tl.float32)
            tl.store(shift_ptr + cbase + ch, k, mask=rmask)
            cnt = tl.zeros([BLOCK_R], dtype=tl.float32)
            mean = tl.zeros([BLOCK_R], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, n_cols, BLOCK_I):
                cc = c0 + lanes
                m = rmask[:, None] & (cc < n_cols)[None, :]
                x = tl.load(rbase + cc[None, :], mask=m, other=0.0).to(tl.float32)
                x = tl.where(m, x - k[:, None], 0.0)
                nb = tl.where(rmask, tl.minimum(n_cols - c0, BLOCK_I), 0).to(tl.float32)
                bmean = tl.sum(x, axis=1) / tl.maximum(nb, 1.0)
                dev = tl.where(m, x - bmean[:, None], 0.0)
                cnt, mean, m2 = _chan_merge(cnt, mean, m2, nb, bmean, tl.sum(dev * dev, axis=1))
            tl.store(part_ptr + slot + rr, cnt, mask=rmask)
            tl.store(part_ptr + n_slots + slot + rr, mean, mask=rmask)
            tl.store(part_ptr + 2 * n_slots + slot + rr, m2, mask=rmask)


@triton.jit
def bn_combine_kernel(part_ptr, n_slots, shift_ptr, combine_ptr, out_ptr, total_c,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per block of channels of one layer: merges the layer's P partial rows into
    mean and biased variance, written to out [2, total_c] (mean row, var row). The partials
    are read BLOCK_P rows at a time ([BLOCK_P, BLOCK_C] tiles, coalesced along the channels);
    a tile is combined in closed form with tree reductions (count = sum n_i, mean = sum n_i
    m_i / count, M2 = sum M2_i + sum n_i (m_i - mean)^2), then Chan-merged into the running
    result: cdiv(P, BLOCK_P) steps instead of P serial merges.
    """
    p = tl.program_id(0).to(tl.int64)
    d = combine_ptr + p * 5
    pbase = tl.load(d + 0)
    n_part = tl.load(d + 1).to(tl.int32)
    c_layer = tl.load(d + 2)
    cbase = tl.load(d + 3)
    c0 = tl.load(d + 4)
    ch = c0 + tl.arange(0, BLOCK_C)
    cm = ch < c_layer
    rows = tl.arange(0, BLOCK_P)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j0 in range(0, n_part, BLOCK_P):
        j = j0 + rows
        m = (j < n_part)[:, None] & cm[None, :]
        s = pbase + j[:, None].to(tl.int64) * c_layer + ch[None, :]
        nb = tl.load(part_ptr + s, mask=m, other=0.0)  # masked rows: count 0, merge no-ops
        mb = tl.load(part_ptr + n_slots + s, mask=m, other=0.0)
        qb = tl.load(part_ptr + 2 * n_slots + s, mask=m, other=0.0)
        tn = tl.sum(nb, axis=0)
        tm = tl.sum(nb * mb, axis=0) / tl.maximum(tn, 1.0)
        dev = tl.where(m, mb - tm[None, :], 0.0)
        tq = tl.sum(qb, axis=0) + tl.sum(nb * dev * dev, axis=0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, tn, tm, tq)
    var = m2 / tl.maximum(cnt, 1.0)
    k = tl.load(shift_ptr + cbase + ch, mask=cm, other=0.0)
    tl.store(out_ptr + cbase + ch, mean + k, mask=cm)
    tl.store(out_ptr + total_c + cbase + ch, var, mask=cm)


@triton.jit
def bn_backward_kernel(x_ptr, x_off_ptr, dx_ptr, dx_off_ptr, tiles_ptr, coef_ptr, total_c,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, VEC: tl.constexpr):
    """dx = A[c] + B[c] * (x - K[c]) for every element of every layer, over the same tiles.
    coef is [3, total_c] fp32 (rows A, B, K); for the BN statistics A = dmean / M,
    B = 2 dvar / M, K = mean. dx has the same strides as x."""
    t = tl.program_id(0).to(tl.int64)
    d = tiles_ptr + t * 10
    layer = tl.load(d + 0)
    rel = tl.load(d + 1) * VEC
    xb = x_ptr + tl.load(x_off_ptr + layer) * VEC + rel
    db = dx_ptr + tl.load(dx_off_ptr + layer) * VEC + rel
    rstride = tl.load(d + 2) * VEC
    n_rows = tl.load(d + 3).to(tl.int32)
    n_cols = tl.load(d + 4).to(tl.int32) * VEC
    mode = tl.load(d + 5)
    chan0 = tl.load(d + 6)
    c_layer = tl.load(d + 8)
    cbase = tl.load(d + 9)

    lanes = tl.arange(0, BLOCK_I)
    rows = tl.arange(0, BLOCK_R)
    if mode == 0:
        lmask = lanes < n_cols
        ch = cbase + (chan0 + lanes) % c_layer
        a = tl.load(coef_ptr + ch, mask=lmask, other=0.0)
        b = tl.load(coef_ptr + total_c + ch, mask=lmask, other=0.0)
        k = tl.load(coef_ptr + 2 * total_c + ch, mask=lmask, other=0.0)
        for r0 in range(0, n_rows, BLOCK_R):
            rr = r0 + rows
            m = (rr[:, None] < n_rows) & lmask[None, :]
            o = rr[:, None].to(tl.int64) * rstride + lanes[None, :]
            x = tl.load(xb + o, mask=m, other=0.0).to(tl.float32)
            g = a[None, :] + b[None, :] * (x - k[None, :])
            tl.store(db + o, g.to(dx_ptr.dtype.element_ty), mask=m)
    else:
        for r0 in range(0, n_rows, BLOCK_R):
            rr = r0 + rows
            rmask = rr < n_rows
            ch = cbase + (chan0 + rr) % c_layer
            a = tl.load(coef_ptr + ch, mask=rmask, other=0.0)
            b = tl.load(coef_ptr + total_c + ch, mask=rmask, other=0.0)
            k = tl.load(coef_ptr + 2 * total_c + ch, mask=rmask, other=0.0)
            ro = rr[:, None].to(tl.int64) * rstride
            for c0 in range(0, n_cols, BLOCK_I):
                cc = c0 + lanes
                m = rmask[:, None] & (cc < n_cols)[None, :]
                o = ro + cc[None, :]
                x = tl.load(xb + o, mask=m, other=0.0).to(tl.float32)
                g = a[:, None] + b[:, None] * (x - k[:, None])
                tl.store(db + o, g.to(dx_ptr.dtype.element_ty), mask=m)


def _aot_specs():
    import functools

    from .._aot import AotSpec
    AotSpec_ = functools.partial(AotSpec, options={"enable_fp_fusion": ENABLE_FP_FUSION})

    specs = []
    for name, ty, vec in (("fp32", "*fp32", 4), ("fp16", "*fp16", 8), ("bf16", "*bf16", 8)):
        specs.append(AotSpec_(
            name=f"bn_partial[{name}]", kernel=bn_partial_kernel,
            signature={"x_ptr": ty, "layer_off_ptr": "*i64", "tiles_ptr": "*i64",
                       "part_ptr": "*fp32", "n_slots": "i64", "shift_ptr": "*fp32",
                       "BLOCK_R": "constexpr", "BLOCK_I": "constexpr", "VEC": "constexpr"},
            constexprs={"BLOCK_R": BLOCK_R, "BLOCK_I": BLOCK_I, "VEC": vec},
            aligned=("x_ptr", "layer_off_ptr", "tiles_ptr", "part_ptr", "shift_ptr"),
            streaming=True))
        specs.append(AotSpec_(
            name=f"bn_backward[{name}]", kernel=bn_backward_kernel,
            signature={"x_ptr": ty, "x_off_ptr": "*i64", "dx_ptr": ty, "dx_off_ptr": "*i64",
                       "tiles_ptr": "*i64", "coef_ptr": "*fp32", "total_c": "i64",
                       "BLOCK_R": "constexpr", "BLOCK_I": "constexpr", "VEC": "constexpr"},
            constexprs={"BLOCK_R": BLOCK_R, "BLOCK_I": BLOCK_I, "VEC": vec},
            aligned=("x_ptr", "x_off_ptr", "dx_ptr", "dx_off_ptr", "tiles_ptr", "coef_ptr"),
            streaming=True))
    specs.append(AotSpec_(
        name="bn_combine", kernel=bn_combine_kernel,
        signature={"part_ptr": "*fp32", "n_slots": "i64", "shift_ptr": "*fp32", "combine_ptr": "*i64",
                   "out_ptr": "*fp32", "total_c": "i64", "BLOCK_C": "constexpr",
                   "BLOCK_P": "constexpr"},
        constexprs={"BLOCK_C": BLOCK_C, "BLOCK_P": BLOCK_P},
        aligned=("part_ptr", "shift_ptr", "combine_ptr", "out_ptr")))
    return specs


AOT_SPECS = _aot_specs()
