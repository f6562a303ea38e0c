"""Public functions of the BN-statistics family.

Flat buffer format (for multi-process runs): a float32 tensor [3 * sum C] holding three rows of
sum C entries, channels concatenated in layer order:
  row 0: count     M_c                    (elements per channel)
  row 1: s1        sum (x - k_c)          = M (mean - k)
  row 2: s2        sum (x - k_c)^2        = M (var + (mean - k)^2)
with a per-channel shift k (`shifts`, default 0). All rows are additive, so the buffers of
several processes (or batch parts) merge with ONE all_reduce(SUM) / `merge_bn_stats` — provided
every process uses the same shifts. Pass the layers' running means as shifts (identical on all
ranks, and close to the batch means): the variance is then recovered without cancellation even
for means far from zero. The local s1/s2 are computed from numerically stable per-rank
(mean, var), and the buffer is differentiable w.r.t. the local inputs.

Gradients through an all-reduce: `all_reduce_flat(local)` returns a tensor whose value is the
global sum and whose gradient flows to `local` unchanged (d global / d local = I for the local
contribution), so `bns_loss_from_flat(all_reduce_flat(bn_stats_flat(xs, rms)), ...)` gives every
rank d loss / d x_local = d loss / d global_stats * d global_stats / d x_local.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _upload
from . import ops as _ops
from .plan import layout as _layout

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_tensors(tensors, name="tensors") -> list[torch.Tensor]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} must be a non-empty list of tensors")
    dev = None
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{name}[{i}] must have at least 2 dims ([N, C, ...]), got shape "
                             f"{tuple(x.shape)}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name}[{i}] must be float32/float16/bfloat16/float64, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"{name}[{i}] is empty (shape {tuple(x.shape)})")
        if dev is None:
            dev = x.device
        elif x.device != dev:
            raise ValueError(f"{name}[{i}] is on {x.device} but {name}[0] is on {dev}")
    return list(tensors)


def _check_per_channel(vals, name, channels, device):
    if not isinstance(vals, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(vals).__name__}")
    if len(vals) != len(channels):
        raise ValueError(f"{name} has {len(vals)} entries but there are {len(channels)} layers")
    for i, (v, c) in enumerate(zip(vals, channels)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(v).__name__}")
        if v.dim() != 1 or v.shape[0] != c:
            raise ValueError(f"{name}[{i}] must have shape [{c}] (the layer's channels), got "
                             f"{tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating tensor, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name}[{i}] is on {v.device} but the inputs are on {device}")


def _check_channels(channels) -> list[int]:
    if not isinstance(channels, (list, tuple)) or not channels:
        raise ValueError("channels must be a non-empty list of per-layer channel counts")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"channels must hold positive ints, got {list(channels)}")
    return list(channels)


def _dense(x):
    # Non-dense views (slices, permutations other than NCHW/NHWC) are copied once.
    return x if _layout(x) is not None else x.contiguous()


# ----------------------------------------------------------------------------- core
def _packed(xs) -> torch.Tensor:
    """[2, sum C] means/vars of all layers; one op call per input dtype (normally one)."""
    xs = [_dense(x) for x in xs]
    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1:
        return _ops.bn_stats_packed(xs)
    out_dt = torch.float64 if dtypes == {torch.float64} else torch.float32
    parts, order = [], []
    for dt in sorted(dtypes, key=str):
        idx = [i for i, x in enumerate(xs) if x.dtype == dt]
        parts.append(_ops.bn_stats_packed([xs[i] for i in idx]).to(out_dt))
        order += idx
    # Columns of layer order[j] sit in parts' concatenation; gather them back in layer order.
    cs = [x.shape[1] for x in xs]
    starts, s = {}, 0
    for i in order:
        starts[i] = s
        s += cs[i]
    perm = torch.cat([torch.arange(starts[i], starts[i] + cs[i]) for i in range(len(xs))])
    return torch.cat(parts, dim=1)[:, _upload.to_device(perm, parts[0].device)]


def _split(vec, channels):
    return list(torch.split(vec, channels, dim=-1))


def bn_stats(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (mean [C], biased var [C]) over every dim but 1 of each BN input, fp32
    (fp64 for fp64 inputs), differentiable w.r.t. the inputs. All layers are reduced together
    (one reduction + one combine launch on the Triton/CUDA backends).

    tensors: the inputs of the BN layers, one per layer: [N, C, ...] (e.g. [N, C, H, W] or [N, C]),
        floating point, all on one device; C may differ between layers.
    """
    xs = _check_tensors(tensors)
    packed = _packed(xs)
    channels = [x.shape[1] for x in xs]
    return list(zip(_split(packed[0], channels), _split(packed[1], channels)))


def _loss_from_stats(mean, var, running_means, running_vars, inv_c, idx, n_layers):
    rm = torch.cat([r.detach() for r in running_means]).to(mean)
    rv = torch.cat([r.detach() for r in running_vars]).to(var)
    sq = ((mean - rm) ** 2 + (var - rv) ** 2) * inv_c
    per_layer = torch.zeros(n_layers, dtype=sq.dtype, device=sq.device).index_add(0, idx, sq)
    return per_layer.sum() / n_layers, per_layer.detach()


def bns_loss(tensors, running_means, running_vars):
    """(loss, per_layer): loss = (1/L) sum_l [MSE(mean_l, rm_l) + MSE(var_l, rv_l)] (a scalar,
    differentiable w.r.t. the inputs; the running statistics are constants), per_layer [L]
    detached, for logging. The number of launches does not grow with L.

    tensors: the L BN-layer inputs [N, C_l, ...] (as `bn_stats`).
    running_means, running_vars: per layer the BN's running statistics [C_l] (treated as constants).
    """
    xs = _check_tensors(tensors)
    channels = [x.shape[1] for x in xs]
    _check_per_channel(running_means, "running_means", channels, xs[0].device)
    _check_per_channel(running_vars, "running_vars", channels, xs[0].device)
    packed = _packed(xs)
    _, inv_c, idx = _ops.channel_vectors(xs, packed.device, packed.dtype)
    return _loss_from_stats(packed[0], packed[1], running_means, running_vars, inv_c, idx, len(xs))


# ----------------------------------------------------------------------------- flat buffers
def _shift_vec(shifts, channels, device, dtype):
    if shifts is None:
        return torch.zeros((), dtype=dtype, device=device)
    _check_per_channel(shifts, "shifts", channels, device)
    return torch.cat([s.detach() for s in shifts]).to(dtype)


def bn_stats_flat(tensors, shifts=None) -> torch.Tensor:
    """One float32 buffer [3 * sum C] of additive per-channel (count, s1, s2) over all layers
    (format in the module doc); differentiable w.r.t. the inputs.

    tensors: the BN-layer inputs [N, C_l, ...] (as `bn_stats`).
    shifts: None, or per layer a [C_l] tensor subtracted before summing (numerically safer sums of
        squares; the same shifts must be passed to `bn_stats_from_flat` / `bns_loss_from_flat`).
    """
    xs = _check_tensors(tensors)
    channels = [x.shape[1] for x in xs]
    if shifts is not None:  # validate before any launch
        _check_per_channel(shifts, "shifts", channels, xs[0].device)
    packed = _packed(xs)
    counts, _, _ = _ops.channel_vectors(xs, packed.device, packed.dtype)
    k = _shift_vec(shifts, channels, packed.device, packed.dtype)
    dm = packed[0] - k
    flat = torch.stack([counts, counts * dm, counts * (packed[1] + dm * dm)])
    return flat.reshape(-1)


def _unflat(flat, channels, shifts):
    channels = _check_channels(channels)
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"flat must be a Tensor, got {type(flat).__name__}")
    if not flat.is_floating_point():
        raise TypeError(f"flat must be a floating tensor, got {flat.dtype}")
    total = sum(channels)
    if flat.dim() != 1 or flat.numel() != 3 * total:
        raise ValueError(f"flat must have shape [{3 * total}] (3 * sum(channels)), got "
                         f"{tuple(flat.shape)}")
    count, s1, s2 = flat.view(3, total)
    k = _shift_vec(shifts, channels, flat.device, flat.dtype)
    d = s1 / count
    mean = d + k
    var = torch.clamp(s2 / count - d * d, min=0.0)
    return mean, var, channels


def bn_stats_from_flat(flat, channels, shifts=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (mean, var) from a (possibly merged/all-reduced) flat buffer; `shifts` must be
    the ones the buffer was made with.

    flat: a [3 * sum C_l] buffer from `bn_stats_flat` (or merged / all-reduced ones).
    channels: the channel count C_l of each layer, in order.
    shifts: as given to `bn_stats_flat` (None: none).
    """
    mean, var, channels = _unflat(flat, channels, shifts)
    return list(zip(_split(mean, channels), _split(var, channels)))


def merge_bn_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two flat buffers (same layers, same shifts): the statistics of the union of both
    batches. Equivalent to what all_reduce(SUM) does across processes.

    a, b: [3 * sum C_l] flat buffers of the same layers (same dtype, device and shifts).
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if b.dtype != a.dtype or b.device != a.device:
        raise ValueError(f"b ({b.dtype}, {b.device}) must match a's dtype and device "
                         f"({a.dtype}, {a.device})")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a + b


def bns_loss_from_flat(flat, channels, running_means, running_vars, shifts=None):
    """(loss, per_layer) as `bns_loss`, from a flat buffer (e.g. `all_reduce_flat` of
    `bn_stats_flat`); differentiable w.r.t. whatever the buffer depends on.

    flat: a [3 * sum C_l] buffer; channels: C_l per layer; running_means, running_vars: [C_l] per
    layer; shifts: as given to `bn_stats_flat`.
    """
    mean, var, channels = _unflat(flat, channels, shifts)
    _check_per_channel(running_means, "running_means", channels, flat.device)
    _check_per_channel(running_vars, "running_vars", channels, flat.device)
    inv_c, idx = _ops.layer_vectors(channels, flat.device, flat.dtype)  # cached: no host sync
    return _loss_from_stats(mean, var, running_means, running_vars, inv_c, idx, len(channels))


def all_reduce_flat(flat: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `flat` over the processes of `group` with ONE all_reduce; the result's value is the
    global sum, its gradient flows to the local `flat` as is (see the module doc). Without an
    initialised process group it returns `flat` unchanged.

    flat: a [3 * sum C_l] buffer from `bn_stats_flat`; group: a torch.distributed process group
    (None: the default group).
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return flat
    total = flat.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return flat + (total - flat.detach())
