"""Batched BN statistics as torch.library custom ops, dispatched per call to a backend.

Two ops carry all the work, whatever the number of layers:
  acq_kernels::bn_stats_packed(xs) -> [2, sum C] (row 0: means, row 1: biased variances),
      one reduction launch + one combine launch on the Triton and CUDA backends (Triton: a
      second reduction launch for layers that cannot use 128-bit loads, if any);
  acq_kernels::bn_stats_grad(xs, coef) -> [dx_l], dx = A[c] + B[c] * (x - K[c]) with
      coef = [3, sum C] (A, B, K), one grouped elementwise launch over every layer.
Everything else (losses, flat buffers) is a few elementwise ops on [sum C]-sized vectors.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from .. import _backend, _extension, _upload
from .._launch_guard import triton_launcher
from . import plan as _plan
from . import reference as _ref

_ALL = ("reference", "triton", "cpu", "cuda")


def _has_ext_ops() -> bool:
    # A stale extension built before this family existed lacks the ops: offer no cpu/cuda.
    return _extension.load() is not None and hasattr(_extension.ops(), "bn_stats_fwd")


def _supported(xs) -> tuple:
    ext = _has_ext_ops()
    if any(x.dtype == torch.float64 for x in xs):
        return ("reference", "cpu") if ext else ("reference",)
    return _ALL if ext else ("reference", "triton")


def _select(xs, op: str) -> str:
    return _backend.select(xs[0].device, supported=_supported(xs), op=op)


def _out_dtype(xs):
    return torch.float64 if all(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------- cached vectors
_vec_cache: dict = {}
_vec_lock = threading.Lock()


def _tracing() -> bool:
    """True while torch.compile / AOTAutograd / make_fx traces (fake, functional or proxy
    tensors). torch.compiler.is_compiling() alone is not enough: on torch <= 2.11 it is False
    while AOTAutograd traces a custom op's backward, and caching the traced tensors there breaks
    every later eager call ("Attempting to use FunctionalTensor on its own")."""
    if torch.compiler.is_compiling():
        return True
    get, keys = torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey
    return any(get(k) is not None for k in (keys.FAKE, keys.FUNCTIONAL, keys.PROXY))


def _cacheable(ts) -> bool:
    # Plain tensors only: never a FakeTensor, FunctionalTensor or functionalized wrapper.
    return all(type(t) is torch.Tensor and not torch._is_functional_tensor(t) for t in ts)


def _build_vectors(layers, device, dtype, traced: bool):
    counts, inv_c, idx = [], [], []
    for i, (c, m) in enumerate(layers):
        counts += [m] * c
        inv_c += [1.0 / c] * c
        idx += [i] * c
    if traced:  # constants of the traced graph
        return (torch.tensor(counts, dtype=dtype, device=device),
                torch.tensor(inv_c, dtype=dtype, device=device),
                torch.tensor(idx, dtype=torch.long, device=device))
    # Built on the host and uploaded once per shape set (pinned, async: no sync, capturable).
    return (_upload.to_device(torch.tensor(counts, dtype=dtype), device),
            _upload.to_device(torch.tensor(inv_c, dtype=dtype), device),
            _upload.to_device(torch.tensor(idx, dtype=torch.long), device))


def _vectors(layers: tuple, device, dtype):
    if _tracing():
        return _build_vectors(layers, device, dtype, traced=True)
    key = (device, dtype) + layers
    v = _vec_cache.get(key)
    if v is None:
        v = _build_vectors(layers, device, dtype, traced=False)
        if _cacheable(v):
            with _vec_lock:
                if len(_vec_cache) > 256:
                    _vec_cache.clear()
                _vec_cache[key] = v
    return v


def channel_vectors(xs, device, dtype):
    """(count per channel [sum C], 1/C_l per channel [sum C], layer index [sum C]) for these
    shapes, built once per shape set and device (rebuilt as constants under torch.compile)."""
    return _vectors(tuple((x.shape[1], x.numel() // x.shape[1]) for x in xs), device, dtype)


def layer_vectors(channels, device, dtype):
    """(1/C_l per channel [sum C], layer index [sum C]) for layers of `channels` channels,
    cached like `channel_vectors` (for losses over flat buffers, which carry no shapes)."""
    _, inv_c, idx = _vectors(tuple((c, 0) for c in channels), device, dtype)
    return inv_c, idx


# ----------------------------------------------------------------------------- triton driver
def _layer_offsets(ts):
    """Element offsets of each tensor from the lowest-addressed one (the kernel's base)."""
    base = min(ts, key=lambda t: t.data_ptr())
    es = base.element_size()
    offs = []
    for t in ts:
        d = t.data_ptr() - base.data_ptr()
        if d % es:
            raise RuntimeError("bn_stats: tensors are not element-aligned to each other")
        offs.append(d // es)
    return base, offs


def _aligned_layers(plan, vec, *bases_offs):
    """[L] bool: layers whose tiles and base offsets (of every tensor set) are vec-aligned."""
    ok = plan.layer_vec_ok(vec)
    for base, offs in bases_offs:
        if base.data_ptr() % 16:
            return np.zeros_like(ok)
        ok = ok & (np.asarray(offs, dtype=np.int64) % vec == 0)
    return ok


def _offsets_table(offs_list, vec, device):
    """One host->device copy of every base-offset table, each in units of vec and of 1
    element: rows (offs_0 // vec, offs_0, offs_1 // vec, offs_1, ...); width padded to even.
    It holds this call's data pointers, so it is uploaded on every call (pinned, async)."""
    width = (len(offs_list[0]) + 1) // 2 * 2
    t = np.zeros((2 * len(offs_list), width), dtype=np.int64)
    for i, offs in enumerate(offs_list):
        o = np.asarray(offs, dtype=np.int64)
        t[2 * i, :len(o)] = o // vec
        t[2 * i + 1, :len(o)] = o
    return _upload.to_device(torch.from_numpy(t), device)


@triton_launcher
def _triton_forward(xs):
    from . import triton_kernels as tk
    plan = _plan.get_plan(xs, _backend.triton_interpret())
    base, offs = _layer_offsets(xs)
    vec = max(1, 16 // base.element_size())
    groups = plan.tile_groups(vec, _aligned_layers(plan, vec, (base, offs)))
    table = _offsets_table([offs], vec, base.device)
    part = torch.empty(3 * plan.n_slots, dtype=torch.float32, device=base.device)
    shift = torch.empty(plan.total_c, dtype=torch.float32, device=base.device)
    for v, tiles in groups:  # one launch, or two when some layers are not vec-aligned
        tk.bn_partial_kernel[(tiles.shape[0],)](
            base, table[0 if v > 1 else 1], tiles, part, plan.n_slots, shift,
            BLOCK_R=plan.block_r, BLOCK_I=plan.block_i, VEC=v,
            enable_fp_fusion=tk.ENABLE_FP_FUSION)
    out = torch.empty(2, plan.total_c, dtype=torch.float32, device=base.device)
    tk.bn_combine_kernel[(plan.combine.shape[0],)](
        part, plan.n_slots, shift, plan.combine, out, plan.total_c, BLOCK_C=tk.BLOCK_C,
        BLOCK_P=tk.BLOCK_P, enable_fp_fusion=tk.ENABLE_FP_FUSION)
    return out


@triton_launcher
def _triton_grad(xs, coef):
    from . import triton_kernels as tk
    plan = _plan.get_plan(xs, _backend.triton_interpret())
    dxs = [torch.empty_like(x) for x in xs]
    xb, xo = _layer_offsets(xs)
    db, do = _layer_offsets(dxs)
    vec = max(1, 16 // xb.element_size())
    groups = plan.tile_groups(vec, _aligned_layers(plan, vec, (xb, xo), (db, do)))
    table = _offsets_table([xo, do], vec, xb.device)
    coef = coef.contiguous()
    for v, tiles in groups:
        r = 0 if v > 1 else 1
        tk.bn_backward_kernel[(tiles.shape[0],)](
            xb, table[r], db, table[2 + r], tiles, coef, plan.total_c,
            BLOCK_R=plan.block_r, BLOCK_I=plan.block_i, VEC=v,
            enable_fp_fusion=tk.ENABLE_FP_FUSION)
    return dxs


# ----------------------------------------------------------------------------- reference
def _reference_forward(xs):
    stats = _ref.bn_stats_reference(xs)
    dt = _out_dtype(xs)
    return torch.stack([torch.cat([m.to(dt) for m, _ in stats]), torch.cat([v.to(dt) for _, v in stats])])


def _reference_grad(xs, coef):
    out, c0 = [], 0
    for x in xs:
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        a, b, k = (coef[j, c0:c0 + c].view(shape) for j in range(3))
        out.append((a + b * (x.to(coef.dtype) - k)).to(x.dtype))
        c0 += c
    return out


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("acq_kernels::bn_stats_packed", mutates_args=())
def bn_stats_packed(xs: list[torch.Tensor]) -> torch.Tensor:
    """[2, sum C]: per-channel means (row 0) and biased variances (row 1) of every layer,
    channels concatenated in layer order. Inputs must share one dtype and be dense."""
    backend = _select(xs, "bn_stats")
    if backend == "triton":
        return _triton_forward(xs)
    if backend in ("cpu", "cuda"):
        return _extension.ops().bn_stats_fwd(xs)
    return _reference_forward(xs)


@bn_stats_packed.register_fake
def _(xs):
    return xs[0].new_empty((2, sum(x.shape[1] for x in xs)), dtype=_out_dtype(xs))


@torch.library.custom_op("acq_kernels::bn_stats_grad", mutates_args=())
def bn_stats_grad(xs: list[torch.Tensor], coef: torch.Tensor) -> list[torch.Tensor]:
    """dx_l = A[c] + B[c] * (x_l - K[c]) for every layer, coef = [3, sum C] (rows A, B, K);
    each dx_l has x_l's dtype and strides."""
    backend = _select(xs, "bn_stats_grad")
    if backend == "triton":
        return _triton_grad(xs, coef.float())
    if backend in ("cpu", "cuda"):
        return list(_extension.ops().bn_stats_bwd(xs, coef.contiguous()))
    return _reference_grad(xs, coef)


@bn_stats_grad.register_fake
def _(xs, coef):
    return [torch.empty_like(x) for x in xs]


def _setup_context(ctx, inputs, output):
    xs = inputs[0]
    ctx.n = len(xs)
    ctx.backend = _select(xs, "bn_stats")  # the backward runs where the forward ran
    ctx.save_for_backward(*xs, output)


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    xs, out = list(saved[:ctx.n]), saved[ctx.n]
    if grad is None:
        return [None] * ctx.n
    counts, _, _ = channel_vectors(xs, out.device, out.dtype)
    # d mean / dx = 1/M; d var / dx = 2 (x - mean) / M.
    coef = torch.stack([grad[0] / counts, grad[1] * 2.0 / counts, out[0]])
    with _backend.set_backend(ctx.backend):
        return bn_stats_grad(xs, coef)


bn_stats_packed.register_autograd(_backward, setup_context=_setup_context)
