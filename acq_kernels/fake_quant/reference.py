"""Pure-PyTorch reference of the fake-quant extension contract (the oracle of every test).

Each function has exactly the signature and semantics of the `torch.ops.acq_kernels_C` operator
of the same name, so the backends are interchangeable. Arguments are assumed validated.

Math (bitwise equal to torch's native ops on finite fp32 input):
  inv_scale = 1 / scale (IEEE fp32 division), q = rne(x * inv_scale) + zp, in the float type of
  the computation (fp32; fp64 for float64 x), clamp by compare-and-select so NaN propagates, and
  out = (clamp(q) - zp) * scale rounded once to x's dtype. torch adds an *integer* zero point after
  rounding both per-tensor and per-channel (checked against torch on exact ties), also in its
  learnable forwards. float64 input: float64 math with an fp32 1/scale, as torch's CPU kernels;
  per-tensor the output is rounded through fp32 as torch's is.
"""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_order(x: torch.Tensor) -> list[int]:
    """Permutation of x's dims that makes it contiguous (x dense): outermost first."""
    return sorted(range(x.dim()), key=lambda d: -x.stride(d)) if x.dim() else []


def is_dense(x: torch.Tensor) -> bool:
    """Whether x is non-overlapping and dense (any dim order: contiguous, channels_last, ...),
    so that kernels can walk it in memory order."""
    return x.is_contiguous() or x.permute(memory_order(x)).is_contiguous()


def to_memory_flat(t: torch.Tensor, perm: list[int]) -> torch.Tensor:
    """t's elements in the memory order given by `perm` (of a tensor laid out like t)."""
    return t.permute(perm).reshape(-1)


def pack_mask(bits_flat: torch.Tensor) -> torch.Tensor:
    """bool[n] -> uint8[ceil(n / 8)], bit k (LSB first) of byte j = element 8j + k."""
    n = bits_flat.numel()
    nbytes = (n + 7) // 8
    padded = torch.zeros(nbytes * 8, dtype=torch.uint8, device=bits_flat.device)
    padded[:n] = bits_flat.to(torch.uint8)
    weights = (1 << torch.arange(8, device=bits_flat.device, dtype=torch.int32))
    return (padded.view(nbytes, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_mask for a dense tensor `like`: bool tensor of like's shape."""
    n = like.numel()
    # a 256 x 8 table of each byte's bits, gathered: one pass that writes a byte per element
    # (shifting the mask broadcast to [bytes, 8] took three int32 passes)
    shifts = torch.arange(8, device=mask.device, dtype=torch.int32)
    table = ((torch.arange(256, device=mask.device, dtype=torch.int32)[:, None] >> shifts) & 1
             ).bool()
    bits = table.index_select(0, mask.to(torch.int32)).reshape(-1)[:n]
    perm = memory_order(like)
    permuted_shape = [like.size(d) for d in perm]
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    return bits.reshape(permuted_shape).permute(inv)


def _channel_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-tensor ([1]) or per-channel ([C]) qparam broadcastable against x."""
    if axis < 0:
        return t.reshape([])
    shape = [1] * x.dim()
    shape[axis] = x.size(axis)
    return t.reshape(shape)


def _quantize(x, scale, zero_point, quant_min, quant_max, axis):
    """(out in x's dtype, in_range bool) for int-valued zero points."""
    cdt = compute_dtype(x)
    # torch's CPU kernels take float64 x times the fp32 1/scale in float64; the per-tensor one
    # then rounds the dequantized value through fp32 ((qc - zp) * scale is an integer times an
    # fp32, exact in fp32 or double alike, so that rounding is the only difference)
    via_float = axis < 0 and cdt == torch.float64 and scale.dtype != torch.float64
    if scale.dtype == torch.float64 and cdt == torch.float64:  # all-double (gradcheck)
        s = _channel_view(scale, x, axis)
        inv = 1.0 / s
    else:
        s32 = _channel_view(scale, x, axis).to(torch.float32)
        inv = (1.0 / s32).to(cdt)  # fp32 division as torch does, even for float64 x
        s = s32.to(cdt)
    zp = _channel_view(zero_point, x, axis).to(cdt)
    q = torch.round(x.to(cdt) * inv) + zp
    in_range = (q >= quant_min) & (q <= quant_max)
    qc = torch.where(q < quant_min, torch.full_like(q, quant_min), q)
    qc = torch.where(qc > quant_max, torch.full_like(q, quant_max), qc)
    res = (qc - zp) * s
    if via_float:
        res = res.to(torch.float32)
    out = torch.empty_like(x)
    out.copy_(res)
    return out, in_range


def _mask_of(in_range: torch.Tensor, x: torch.Tensor, save_mask: bool) -> torch.Tensor:
    if not save_mask:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    return pack_mask(to_memory_flat(in_range, memory_order(x)))


def fq_forward(x, scale, zero_point, quant_min: int, quant_max: int, axis: int, save_mask: bool):
    out, in_range = _quantize(x, scale, zero_point, quant_min, quant_max, axis)
    return out, _mask_of(in_range, x, save_mask)


def fq_mask_backward(grad, mask):
    bits = unpack_mask(mask, grad)
    out = torch.empty_like(grad)
    out.copy_(grad * bits)  # a product like torch's dY * mask: NaN * 0 stays NaN, -g * 0 is -0
    return out


def lsq_uses_fma(device: torch.device) -> bool:
    """Whether torch's LSQ backward kernels for `device` round zp + x * inv and
    (xc - zp) * scale - x once (fused multiply-adds). CPU: torch builds its kernels with FP
    contraction, which gives FMAs in the AVX2/AVX512 builds and none in the default one
    (torch.backends.cpu.get_cpu_capability() says which runs); CUDA: nvcc contracts by default
    (not verified on a GPU here)."""
    if torch.device(device).type != "cpu":
        return True
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # aarch64 and others: FMA in the base ISA, contracted by default
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def fma(a: torch.Tensor, b: torch.Tensor, c) -> torch.Tensor:
    """a * b + c rounded once (an IEEE fused multiply-add) for float32 tensors; float64 a, b, c
    use the plain expression (their exact FMA needs more than double precision; the all-double
    path is for gradcheck only). The float32 product is exact in float64; the sum is formed in
    float64 with round-to-odd (its error term recovered by TwoSum), which makes the final
    rounding to float32 correct."""
    if a.dtype == torch.float64:
        return a * b + c
    p = a.double() * b.double()
    if isinstance(c, torch.Tensor):
        cd = c.double()
    else:
        cd = torch.tensor(float(c), dtype=torch.float64, device=a.device)
    s = p + cd
    bv = s - p
    err = (p - (s - bv)) + (cd - bv)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even & torch.isfinite(s), torch.nextafter(s, toward), s)
    return s.to(torch.float32)


def fq_learnable_backward(grad, x, scale, zero_point, quant_min: int, quant_max: int, axis: int,
                          grad_factor: float):
    """Backward of torch._fake_quantize_learnable_per_{tensor,channel}_affine, mirroring torch's
    CPU kernels (including their different zero-point rounding per-tensor and per-channel)."""
    # fp32 as torch; all-double when x and scale are float64 (gradcheck)
    f32 = torch.float64 if (x.dtype == scale.dtype == torch.float64) else torch.float32
    gf = torch.tensor(grad_factor, dtype=f32, device=x.device)
    xs = x.to(f32)
    g = grad.to(f32)
    s = _channel_view(scale, x, axis).to(f32)
    inv = 1.0 / s
    if axis < 0:
        # torch's backward takes zp = int(clamp(zp + 0.5)) (truncation; its forward rounds
        # half-even instead)
        zp = torch.trunc(torch.clamp(zero_point.to(f32) + 0.5, quant_min, quant_max)).reshape([])
    else:
        zp = _channel_view(torch.clamp(torch.round(zero_point.to(f32)), quant_min, quant_max),
                           x, axis)
    # Both of torch's backward kernels add the zero point BEFORE rounding, q = rne(zp + x * inv)
    # (its forwards add it after), so at exact ties with an odd zero point the x-gradient mask
    # is not the forward's in-range mask.
    use_fma = lsq_uses_fma(x.device)
    q = torch.round(fma(xs, inv, zp) if use_fma else zp + xs * inv)
    # clipped means strictly outside the range
    in_range = (q >= quant_min) & (q <= quant_max)
    qc = torch.clamp(q, quant_min, quant_max)
    lo = q < quant_min
    hi = q > quant_max
    dx = torch.empty_like(grad)
    dx.copy_(g * in_range)
    zero_point = zero_point.to(f32)
    err = fma(qc - zp, s, -xs) if use_fma else (qc - zp) * s - xs  # xfq - x
    ds_in = g * err * inv * gf
    ds_lo = (g * (quant_min - zp)) * gf
    ds_hi = (g * (quant_max - zp)) * gf
    dscale_el = torch.where(lo, ds_lo, torch.where(hi, ds_hi, ds_in))
    dzp_el = torch.where(lo | hi, g * -1.0 * s * gf, torch.zeros_like(g))
    if axis < 0:
        dscale = dscale_el.sum().reshape(scale.shape)
        dzp = dzp_el.sum().reshape(zero_point.shape)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        dscale = (dscale_el.sum(dims) if dims else dscale_el).reshape(scale.shape)
        dzp = (dzp_el.sum(dims) if dims else dzp_el).reshape(zero_point.shape)
    return dx, dscale.to(scale.dtype), dzp.to(scale.dtype)


def calculate_qparams(min_val, max_val, quant_min: int, quant_max: int, symmetric: bool,
                      eps: float, symmetric_zero_point: int | None = None):
    """torch.ao UniformQuantizationObserverBase._calculate_qparams (reduce_range=False, the range
    given explicitly): float32 scale and int32 zero point of min_val's shape. For a symmetric
    scheme the zero point is `symmetric_zero_point` when given, else 0 on a signed range and the
    down-rounded midpoint on an unsigned one (torch's rule for a customized range)."""
    f32 = torch.float32
    min_val = min_val.to(f32)
    max_val = max_val.to(f32)
    eps_t = torch.tensor(eps, dtype=f32, device=min_val.device)
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        max_pos = torch.maximum(-min_neg, max_pos)
        scale = torch.maximum(max_pos / (float(quant_max - quant_min) / 2), eps_t)
        zp_val = symmetric_zero_point
        if zp_val is None:
            zp_val = (quant_min + quant_max) // 2 if quant_min >= 0 else 0
        zero_point = torch.full_like(min_val, zp_val, dtype=torch.int32)
    else:
        scale = torch.maximum((max_pos - min_neg) / float(quant_max - quant_min), eps_t)
        zero_point = quant_min - torch.round(min_neg / scale).to(torch.int32)
        zero_point = torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)
    return scale, zero_point


def _minmax_along(x, axis):
    if axis < 0:
        return torch.aminmax(x.to(torch.float32))
    flat = x.to(torch.float32).movedim(axis, 0).reshape(x.size(axis), -1)
    return torch.aminmax(flat, dim=1)


def fq_minmax_forward(x, axis: int, quant_min: int, quant_max: int, symmetric: bool, eps: float,
                      save_mask: bool):
    channels = 1 if axis < 0 else x.size(axis)
    if x.numel() == 0:  # torch's observer has no range: scale 1, zero point 0
        scale = torch.ones(channels, dtype=torch.float32, device=x.device)
        zero_point = torch.zeros(channels, dtype=torch.int32, device=x.device)
    else:
        mn, mx = _minmax_along(x, axis)
        scale, zero_point = calculate_qparams(mn.reshape(-1), mx.reshape(-1), quant_min,
                                              quant_max, symmetric, eps)
    out, mask = fq_forward(x, scale, zero_point, quant_min, quant_max, axis, save_mask)
    return out, mask, scale, zero_point


def fq_moving_average_forward(x, min_val, max_val, scale, zero_point, averaging_constant: float,
                              quant_min: int, quant_max: int, symmetric: bool, eps: float,
                              observe: bool, save_mask: bool):
    if observe and x.numel() > 0:
        cur_min, cur_max = torch.aminmax(x.to(torch.float32))
        first = (min_val == float("inf")) & (max_val == float("-inf"))
        c = torch.tensor(averaging_constant, dtype=torch.float32, device=x.device)
        new_min = torch.where(first, cur_min, min_val + c * (cur_min - min_val))
        new_max = torch.where(first, cur_max, max_val + c * (cur_max - max_val))
        min_val.copy_(new_min.reshape(min_val.shape))
        max_val.copy_(new_max.reshape(max_val.shape))
        s, z = calculate_qparams(new_min.reshape(1), new_max.reshape(1), quant_min, quant_max,
                                 symmetric, eps)
        scale.copy_(s.reshape(scale.shape))
        zero_point.copy_(z.reshape(zero_point.shape))
    return fq_forward(x, scale.reshape(1), zero_point.reshape(1), quant_min, quant_max, -1,
                      save_mask)


def observe(x, min_val, max_val, axis: int, averaging_constant: float, moving_average: bool):
    """One step of torch.ao's min/max observers on min_val/max_val ([1] or [C] float32), in
    place. moving_average: MovingAverage(PerChannel)MinMaxObserver (a channel at +inf/-inf has
    seen nothing yet and takes the batch range), else (PerChannel)MinMaxObserver (running min
    and max). x must not be empty."""
    cur_min, cur_max = _minmax_along(x, axis)
    cur_min, cur_max = cur_min.reshape(-1), cur_max.reshape(-1)
    if moving_average:
        first = (min_val == float("inf")) & (max_val == float("-inf"))
        c = torch.tensor(averaging_constant, dtype=torch.float32, device=x.device)
        new_min = torch.where(first, cur_min, min_val + c * (cur_min - min_val))
        new_max = torch.where(first, cur_max, max_val + c * (cur_max - max_val))
    else:
        new_min = torch.min(cur_min, min_val)
        new_max = torch.max(cur_max, max_val)
    min_val.copy_(new_min)
    max_val.copy_(new_max)


def fq_observe_forward(x, min_val, max_val, scale, zero_point, axis: int,
                       averaging_constant: float, moving_average: bool, quant_min: int,
                       quant_max: int, symmetric: bool, symmetric_zero_point: int, eps: float,
                       quantize: bool, save_mask: bool, fq_forward_impl=None):
    """Observer step + qparams + fake quant (the module's forward with its observer enabled).

    min_val/max_val/scale (float32) and zero_point (int32) are [1] (axis -1) or [x.size(axis)]
    and are updated in place; per-tensor qparams of a range that saw nothing (+inf/-inf) are
    torch's 1.0 / 0. Returns (out, mask); when not quantize, out and mask are empty (only the
    state is updated). An empty x leaves the state untouched. fq_forward_impl: the backend's
    fq_forward (default: this module's)."""
    if x.numel() > 0:
        observe(x, min_val, max_val, axis, averaging_constant, moving_average)
        s, z = calculate_qparams(min_val, max_val, quant_min, quant_max, symmetric, eps,
                                 symmetric_zero_point)
        if axis < 0:
            seen = ~((min_val == float("inf")) & (max_val == float("-inf")))
            s = torch.where(seen, s, torch.ones_like(s))
            z = torch.where(seen, z, torch.zeros_like(z))
        scale.copy_(s)
        zero_point.copy_(z)
    if not quantize:
        return x.new_empty(0), x.new_empty(0, dtype=torch.uint8)
    return (fq_forward_impl or fq_forward)(x, scale, zero_point, quant_min, quant_max, axis,
                                           save_mask)
