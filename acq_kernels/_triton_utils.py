"""Small Triton helpers shared by the kernel families."""
import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """Round to nearest, ties to even, with plain ops (libdevice's rint does not run under
    TRITON_INTERPRET). Compiles to the same few instructions; NaN and +-Inf pass through."""
    r = tl.floor(x + 0.5)
    # r - x == 0.5 exactly only at a tie; then r may be odd and the even neighbour is r - 1.
    tie = (r - x) == 0.5
    odd = (r * 0.5) != tl.floor(r * 0.5)
    return tl.where(tie & odd, r - 1.0, r)
