"""Pure-PyTorch reference: the GDFQ forward-hook pattern, one mean and one var per layer.

The oracle of every test and the baseline of the benchmark."""
from __future__ import annotations

import torch


def _reduce_dims(x: torch.Tensor):
    return [0] + list(range(2, x.dim()))


def bn_stats_reference(xs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (mean [C], biased var [C]) over every dim but 1; fp32 (fp64 for fp64 input)."""
    out = []
    for x in xs:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dims = _reduce_dims(x)
        out.append((xf.mean(dims), xf.var(dims, unbiased=False)))
    return out


def bns_loss_reference(xs, running_means, running_vars):
    """(1/L) * sum_l [MSE(mean_l, rm_l) + MSE(var_l, rv_l)] and the detached per-layer terms."""
    terms = []
    for (m, v), rm, rv in zip(bn_stats_reference(xs), running_means, running_vars):
        terms.append(torch.mean((m - rm.to(m)) ** 2) + torch.mean((v - rv.to(v)) ** 2))
    per_layer = torch.stack(terms)
    return per_layer.mean(), per_layer.detach()
