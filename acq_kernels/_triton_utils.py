"""Small Triton helpers shared by the kernel families."""
import functools
import itertools

import torch
import triton
import triton.language as tl


def triton_launcher(fn):
    """Decorator of every host function that launches Triton kernels: runs it with the CUDA
    device of its first tensor argument (or tensor in a list argument) current. Triton launches on the current device
    (torch.cuda.current_device()), so a tensor on cuda:1 while cuda:0 is current would be
    read from the wrong device. CPU tensors (the interpreter) need no guard."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        t = next((a for a in itertools.chain(args, kwargs.values(), *(
                  a for a in itertools.chain(args, kwargs.values()) if isinstance(a, (list, tuple))))
                  if isinstance(a, torch.Tensor)), None)
        if t is not None and t.device.type == "cuda":
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    guarded.device_guarded = True
    return guarded


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
