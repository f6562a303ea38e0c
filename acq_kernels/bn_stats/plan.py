"""Host-side planning for the batched BN-statistics kernels.

`layout(x)` says how one layer's input is walked (or that it needs a contiguous copy);
`Plan` is the work list for one set of shapes/strides/dtypes: the tile table of the reduction
and backward kernels and the combine table, built once with numpy and cached per device.
Only the layers' base offsets change between calls (they depend on data pointers); they are
a tiny [L] int64 table copied per call.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch

from .. import _upload
from . import triton_kernels as tk

# Elements a tile aims to cover: big enough to amortise the per-tile overhead on a GPU,
# bigger under the interpreter where every program costs Python time.
TILE_ELEMS = 8192
TILE_ELEMS_INTERPRET = 1 << 16
COLS_PER_TILE = 1024  # row mode: longest run of one row a tile covers (a multiple of BLOCK_I)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a layer's per-channel elements are addressed (in elements).

    kind "cin": channels are the contiguous axis; the M = N*H*W positions are `rows` rows of
    stride `rstride` (channels_last, [N, C]). kind "sp": each channel is `rows` runs (one per
    sample, `rstride` apart) of `inner` contiguous elements; channels are `cstride` = inner
    apart (NCHW, or a transposed [N, C])."""
    kind: str
    channels: int
    rows: int
    rstride: int
    inner: int = 1
    cstride: int = 0


def _merge(dims):
    """Merge (size, stride) dims (outer to inner) into as few uniformly strided groups as
    possible, ignoring size-1 dims. Returns a list of (size, stride)."""
    groups = []
    for size, stride in dims:
        if size == 1:
            continue
        if groups and groups[-1][1] == size * stride:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    return groups


def layout(x: torch.Tensor) -> Layout | None:
    """The walk for a dense (non-overlapping, gap-free) tensor, or None if it needs a copy.

    Only dense layouts are accepted so that the gradient, allocated with empty_like, has the
    very same strides (the backward kernel addresses x and dx with one offset)."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) \
        or (x.dim() == 2 and x.t().is_contiguous())
    if not dense:
        return None
    c, sc = x.shape[1], x.stride(1)
    pos = [(x.shape[0], x.stride(0))] + [(x.shape[d], x.stride(d)) for d in range(2, x.dim())]
    groups = _merge(pos)
    if not groups:  # one position per channel
        groups = [(1, 1)]
    if (sc == 1 or c == 1) and len(groups) == 1:
        return Layout("cin", c, groups[0][0], groups[0][1])
    if groups[-1][1] == 1 and len(groups) <= 2:
        inner = groups[-1][0]
        rows, rstride = groups[0] if len(groups) == 2 else (1, inner)
        # Row mode needs the (sample, channel) runs uniformly spaced: NCHW-dense.
        if (c == 1 or sc == inner) and (rows == 1 or rstride == c * inner):
            return Layout("sp", c, rows, rstride, inner, sc)
    return None


def _chunks(total, step):
    starts = np.arange(0, total, step, dtype=np.int64)
    return starts, np.minimum(step, total - starts)


def _layer_tiles(lay: Layout, rows_per_tile: int, target_elems: int, block_r: int,
                 bi: int):
    """Tiles of one layer (columns as in triton_kernels, slot relative to the layer's
    partials) and the number of partial rows P (partials of a layer are [P, C])."""
    c = lay.channels
    cols = {k: [] for k in ("off", "rs", "nr", "nc", "mode", "chan0", "slot")}

    def add(off, rs, nr, nc, mode, chan0, slot):
        n = np.broadcast(off, nr, nc, chan0, slot).shape
        for k, v in zip(cols, (off, rs, nr, nc, mode, chan0, slot)):
            cols[k].append(np.broadcast_to(np.asarray(v, dtype=np.int64), n).ravel())

    if lay.kind == "cin":
        if c < bi and bi % c == 0 and lay.rstride == c:
            # Fold bi // c consecutive rows into the lanes: lane i is channel i % c.
            total = lay.rows * c
            frows, rem = divmod(total, bi)
            starts, counts = _chunks(frows, rows_per_tile)
            add(starts * bi, bi, counts, bi, 0, 0, np.arange(len(starts)) * bi)
            p_rows = len(starts) * (bi // c)
            if rem:
                add(frows * bi, bi, 1, rem, 0, 0, len(starts) * bi)
                p_rows += rem // c
            return cols, p_rows
        rstarts, rcounts = _chunks(lay.rows, rows_per_tile)
        cstarts, ccounts = _chunks(c, bi)
        p = np.arange(len(rstarts))[:, None]
        add(rstarts[:, None] * lay.rstride + cstarts[None, :], lay.rstride, rcounts[:, None],
            ccounts[None, :], 0, cstarts[None, :], p * c + cstarts[None, :])
        return cols, len(rstarts)
    # "sp": rows r = n * C + c of `inner` contiguous elements, uniformly `inner` apart
    # (layout() guarantees it). Long rows are split into column ranges of COLS_PER_TILE; the
    # partials of a layer are [n_col_ranges * rows, C], row r of column range j in slot
    # j * (rows * C) + r.
    s = lay.inner
    n_r = lay.rows * c
    ct = min(s, COLS_PER_TILE)
    rows_per = max(block_r, (target_elems // ct) // block_r * block_r)
    rstarts, rcounts = _chunks(n_r, rows_per)
    cstarts, ccounts = _chunks(s, ct)
    j = np.arange(len(cstarts))[:, None]
    add(rstarts[None, :] * s + cstarts[:, None], s, rcounts[None, :], ccounts[:, None], 1,
        rstarts[None, :] % c, j * n_r + rstarts[None, :])
    return cols, len(cstarts) * lay.rows


class Plan:
    """Work list for one call signature (layouts in layer order, one dtype)."""

    def __init__(self, layouts, device, interpret: bool):
        self.layouts = layouts
        self.channels = [lay.channels for lay in layouts]
        self.total_c = int(sum(self.channels))
        self.cbase = np.concatenate([[0], np.cumsum(self.channels)[:-1]]).astype(np.int64)
        target = TILE_ELEMS_INTERPRET if interpret else TILE_ELEMS
        self.block_r = block_r = tk.BLOCK_R_INTERPRET if interpret else tk.BLOCK_R
        self.block_i = block_i = tk.BLOCK_I_INTERPRET if interpret else tk.BLOCK_I
        rows_per_tile = max(block_r, (target // block_i) // block_r * block_r)
        tiles, combine, pbase = [], [], 0
        for li, lay in enumerate(layouts):
            cols, p_rows = _layer_tiles(lay, rows_per_tile, target, block_r, block_i)
            n = sum(len(v) for v in cols["off"])
            t = np.empty((n, tk.TILE_FIELDS), dtype=np.int64)
            t[:, tk.T_LAYER] = li
            for k, j in (("off", tk.T_OFF), ("rs", tk.T_RSTRIDE), ("nr", tk.T_NROWS),
                         ("nc", tk.T_NCOLS), ("mode", tk.T_MODE), ("chan0", tk.T_CHAN0),
                         ("slot", tk.T_SLOT)):
                t[:, j] = np.concatenate(cols[k])
            t[:, tk.T_SLOT] += pbase
            t[:, tk.T_C] = lay.channels
            t[:, tk.T_CBASE] = self.cbase[li]
            tiles.append(t)
            c0 = np.arange(0, lay.channels, tk.BLOCK_C, dtype=np.int64)
            k = np.empty((len(c0), tk.COMBINE_FIELDS), dtype=np.int64)
            k[:, tk.K_PBASE], k[:, tk.K_P], k[:, tk.K_C] = pbase, p_rows, lay.channels
            k[:, tk.K_CBASE], k[:, tk.K_C0] = self.cbase[li], c0
            combine.append(k)
            pbase += p_rows * lay.channels
        self.n_slots = pbase
        self.tiles_np = np.concatenate(tiles)
        self.combine = _upload.to_device(torch.from_numpy(np.concatenate(combine)), device)
        self.device = device
        self._tiles = {}

    _ADDR = [tk.T_OFF, tk.T_RSTRIDE, tk.T_NCOLS]

    def layer_vec_ok(self, vec: int) -> np.ndarray:
        """[L] bool: every tile of the layer has its address fields divisible by `vec`."""
        t = self.tiles_np
        bad = t[~np.all(t[:, self._ADDR] % vec == 0, axis=1), tk.T_LAYER]
        ok = np.ones(len(self.layouts), dtype=bool)
        ok[np.unique(bad)] = False
        return ok

    def tile_groups(self, vec: int, aligned: np.ndarray) -> list:
        """[(VEC, tile table on the device)]: the tiles of the `aligned` layers with address
        fields in units of `vec` (128-bit loads), then the others in elements; empty groups
        are left out. So a network with a few odd layers (7x7 maps in NCHW) costs one extra
        launch, not the vector loads of every layer."""
        key = (vec, aligned.tobytes())
        groups = self._tiles.get(key)
        if groups is None:
            sel = aligned[self.tiles_np[:, tk.T_LAYER]] if vec > 1 else np.zeros(self.n_tiles, bool)
            groups = []
            if sel.any():
                t = self.tiles_np[sel].copy()
                t[:, self._ADDR] //= vec
                groups.append((vec, _upload.to_device(torch.from_numpy(t), self.device)))
            if (~sel).any():
                groups.append((1, _upload.to_device(torch.from_numpy(self.tiles_np[~sel].copy()),
                                                     self.device)))
            self._tiles[key] = groups
        return groups

    @property
    def n_tiles(self) -> int:
        return len(self.tiles_np)


_cache: dict = {}
_lock = threading.Lock()
_CACHE_MAX = 64


def get_plan(xs, interpret: bool) -> Plan:
    key = (xs[0].device, interpret) + tuple((tuple(x.shape), tuple(x.stride())) for x in xs)
    plan = _cache.get(key)
    if plan is None:
        plan = Plan([layout(x) for x in xs], xs[0].device, interpret)
        with _lock:
            if len(_cache) >= _CACHE_MAX:
                _cache.pop(next(iter(_cache)))
            _cache[key] = plan
    return plan
