"""CPU emulation of how csrc/cuda/fake_quant_observe.cu splits its work (no GPU needed).

The kernel's index arithmetic (the grid plan, the per-channel min/max tasks, the division-free
channel cursors of the fake-quant pass, the mask word of each warp tile) is transcribed here
statement by statement and run for every thread of a sweep of layouts, vector widths and grid
sizes: every element must be read exactly once per pass, by a thread that attributes it to its
true channel ((offset / inner) % C), every partial [K, C] must be written before the finishing
pass reads it, and every mask word must hold the 32 elements it is stored for. The arithmetic
of the values (observer update, qparams, fake quant) is checked against torch on the GPU in
tests/test_gpu.py; this file guards the part a wrong index would silently break.
Keep it in step with the .cu file (names match)."""
import numpy as np
import pytest

K_THREADS = 256
K_WARPS = K_THREADS // 32


def pow2_at_least(v, lo, hi):
    p = lo
    while p < v and p < hi:
        p *= 2
    return p


def ceil_div(a, b):
    return (a + b - 1) // b


def make_plan(n, C, inner, V, grid, per_channel):
    """make_plan() after the grid size is chosen: (K, tpr, gx)."""
    if not per_channel:
        return grid, 1, 1
    if inner == 1:
        rows, CV = n // C, C // V
        tpr = pow2_at_least(CV, 1, K_THREADS)
        rpb = K_THREADS // tpr
        gx = ceil_div(CV, tpr)
        K = max(1, min(grid // gx, ceil_div(rows, rpb)))
        return K, tpr, gx
    units = (n // V) // C
    K = max(1, min(grid // C, ceil_div(units, K_THREADS)))
    return K, 1, 1


def vector_ok(C, inner, V, per_channel):
    """plan_for(): 128-bit vectors only when a vector holds one channel or V channels."""
    if V == 1 or not per_channel:
        return True
    return C % V == 0 if inner == 1 else inner % V == 0


def true_channel(o, inner, C):
    return (o // inner) % C


def columns_minmax(n, C, V, grid, K, tpr, gx, seen, written):
    rows, CV = n // C, C // V
    rpb = K_THREADS // tpr
    step = K * rpb
    for b in range(grid):
        for t in range(b, gx * K, grid):
            tile, k = t % gx, t // gx
            for tid in range(K_THREADS):
                col, r = tid % tpr, tid // tpr
                cv = tile * tpr + col
                if cv >= CV:
                    continue
                q = k * rpb + r
                qs = np.arange(q, rows, step, dtype=np.int64)
                for j in range(V):
                    o = qs * C + cv * V + j
                    assert (true_channel(o, 1, C) == cv * V + j).all()
                    np.add.at(seen, o, 1)
            c0 = tile * tpr * V
            for i in range(tpr * V):
                if c0 + i < C:
                    written[k, c0 + i] += 1


def runs_minmax(n, C, inner, V, grid, K, seen, written):
    inner_v = inner // V
    rows = n // (C * inner)
    dq, di = divmod(K * K_THREADS, inner_v)
    for b in range(grid):
        for t in range(b, C * K, grid):
            c, k = t % C, t // C
            for tid in range(K_THREADS):
                q, i = divmod(k * K_THREADS + tid, inner_v)
                while q < rows:
                    o = (q * C + c) * inner + i * V + np.arange(V)
                    assert (true_channel(o, inner, C) == c).all()
                    np.add.at(seen, o, 1)
                    i += di
                    q += dq
                    if i >= inner_v:
                        i -= inner_v
                        q += 1
            written[k, c] += 1


class ChanCursor:
    def __init__(self, o, step, inner, C):
        q = o // inner
        self.pos, self.c = o - q * inner, q % C
        q = step // inner
        self.step_pos, self.step_c = step - q * inner, q % C

    def advance(self, inner, C):
        self.pos += self.step_pos
        carry = self.pos >= inner
        if carry:
            self.pos -= inner
        self.c += self.step_c + int(carry)
        assert self.c < 2 * C
        if self.c >= C:
            self.c -= C


def fake_quant_phase(n, C, inner, V, grid, per_channel, seen, words):
    columns = inner == 1
    nwarps = grid * K_WARPS
    ntiles = n // (32 * V) if V > 1 else 0
    for gwarp in range(nwarps):
        for lane in range(32):
            if V > 1 and gwarp < ntiles:
                cur = ChanCursor((gwarp * 32 + lane) * V, nwarps * 32 * V, inner, C)
                for t in range(gwarp, ntiles, nwarps):
                    base = t * 32 * V + lane * V
                    for j in range(V):
                        c = cur.c + j if (per_channel and columns) else cur.c
                        if per_channel:
                            assert c == true_channel(base + j, inner, C), (base, j)
                        seen[base + j] += 1
                    if lane % (32 // V) == 0:  # the word of this lane group's 32 elements
                        w = t * V + lane // (32 // V)
                        assert w * 32 == base
                        words[w] += 1
                    cur.advance(inner, C)
            start = ntiles * 32 * V
            ntail = (n - start + 31) // 32
            if gwarp < ntail:
                cur = ChanCursor(start + gwarp * 32 + lane, nwarps * 32, inner, C)
                for t in range(gwarp, ntail, nwarps):
                    i = start + t * 32 + lane
                    if i < n:
                        if per_channel:
                            assert cur.c == true_channel(i, inner, C), i
                        seen[i] += 1
                    if lane == 0:
                        assert (start // 32 + t) * 32 == start + t * 32
                        words[start // 32 + t] += 1
                    cur.advance(inner, C)


# (rows, C, inner) of a per-channel layout: x viewed as [rows, C, inner] in memory order.
PER_CHANNEL = [
    (1, 1, 1), (7, 1, 1), (1, 5, 3), (3, 16, 1), (5, 37, 1), (33, 64, 1), (2, 300, 1),
    (4, 8, 36), (2, 3, 1000), (1, 4, 4096), (9, 5, 7), (3, 2, 8), (1, 1, 777), (2, 7, 40),
]
GRIDS = [1, 2, 3, 17, 64]


@pytest.mark.parametrize("rows,C,inner", PER_CHANNEL, ids=str)
@pytest.mark.parametrize("V", [1, 4, 8])
def test_per_channel_passes_cover_each_element_once(rows, C, inner, V):
    n = rows * C * inner
    if not vector_ok(C, inner, V, True):
        pytest.skip("the plan takes the scalar variant here")
    for grid in GRIDS:
        K, tpr, gx = make_plan(n, C, inner, V, grid, True)
        seen = np.zeros(n, dtype=np.int64)
        written = np.zeros((K, C), dtype=np.int64)
        if inner == 1:
            columns_minmax(n, C, V, grid, K, tpr, gx, seen, written)
        else:
            runs_minmax(n, C, inner, V, grid, K, seen, written)
        assert (seen == 1).all(), (grid, np.flatnonzero(seen != 1)[:5])
        assert (written == 1).all(), grid  # every partial written exactly once
        seen[:] = 0
        words = np.zeros(ceil_div(n, 32), dtype=np.int64)
        fake_quant_phase(n, C, inner, V, grid, True, seen, words)
        assert (seen == 1).all(), grid
        assert (words == 1).all(), grid


@pytest.mark.parametrize("n", [1, 31, 32, 33, 255, 1000, 4099, 8192 + 7])
@pytest.mark.parametrize("V", [1, 4, 8])
def test_per_tensor_fake_quant_covers_each_element_once(n, V):
    for grid in GRIDS:
        seen = np.zeros(n, dtype=np.int64)
        words = np.zeros(ceil_div(n, 32), dtype=np.int64)
        fake_quant_phase(n, 1, n, V, grid, False, seen, words)
        assert (seen == 1).all() and (words == 1).all(), grid


def test_cursor_wraps_at_most_once_for_any_step():
    """ChanCursor.advance's single compare-and-subtract is enough: for random offsets, steps,
    runs and channel counts it tracks (o / inner) % C over many steps."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        inner, C = int(rng.integers(1, 50)), int(rng.integers(1, 40))
        o, step = int(rng.integers(0, 5000)), int(rng.integers(1, 5000))
        cur = ChanCursor(o, step, inner, C)
        for _ in range(50):
            assert cur.c == true_channel(o, inner, C) and cur.pos == o % inner
            o += step
            cur.advance(inner, C)
