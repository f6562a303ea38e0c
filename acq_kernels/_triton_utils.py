"""Small Triton helpers shared by the kernel families."""
import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """Round to nearest, ties to even, with plain ops (libdevice's rint does not run under
    TRITON_INTERPRET). x - floor(x) is exact in binary floating point, so ties are detected
    exactly at every magnitude (unlike floor(x + 0.5), which double-rounds 0.49999997 and
    2^23 + 1); NaN and +-Inf pass through."""
    r = tl.floor(x)
    d = x - r
    odd = (r * 0.5) != tl.floor(r * 0.5)
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)
