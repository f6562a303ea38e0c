"""Batched BatchNorm statistics and the fused BNS loss over every BN layer of a network.

    acq_kernels.bn_stats(tensors)                      -> [(mean [C], biased var [C]), ...]
    acq_kernels.bns_loss(tensors, running_means, running_vars) -> (loss, per_layer)
    acq_kernels.bn_stats_flat(tensors, shifts=None)    -> flat [3 * sum C] (count, s1, s2)
    acq_kernels.bn_stats_from_flat / merge_bn_stats / bns_loss_from_flat / all_reduce_flat
    acq_kernels.BNStatCollector(model)                 -> hooks BN inputs, .loss()

How it runs (ops.py): every layer of a call goes through two custom ops, whatever the number
of layers. On Triton (triton_kernels.py, work list in plan.py, cached per shapes/strides):
one tile-reduction launch writing (count, mean - k, M2) partials, one combine launch (Chan's
formula, k = each channel's first element), and one grouped elementwise launch for the
backward dx = dmean/M + 2 dvar (x - mean)/M. Layers whose sizes allow 16-byte-aligned
vector loads and those that do not (e.g. 7x7 maps in NCHW) go in separate launches, so the
count is at most 2 + 1 forward and 2 backward, independent of the number of layers. NCHW tiles walk (sample, channel) rows,
channels_last / [N, C] tiles put channels on the lanes; other strides are copied once to
contiguous. The CUDA extension (csrc/cuda/bn_stats.cu) has the same launch structure; the
CPU extension (csrc/cpu/bn_stats.cpp) runs (layer, channel-block) items on at::parallel_for
with shifted sums. The reference backend is the GDFQ hook pattern (mean, var per layer).
Inputs of different dtypes are reduced with one call per dtype (normally there is one).
Limitation: the Triton/CUDA paths copy a small per-call table (layer base addresses) to the
device, so they are not CUDA-graph capturable as they stand.
"""
from .collector import BNStatCollector
from .functional import (all_reduce_flat, bn_stats, bn_stats_flat, bn_stats_from_flat,
                         bns_loss, bns_loss_from_flat, merge_bn_stats)
from .reference import bn_stats_reference, bns_loss_reference

__all__ = ["BNStatCollector", "all_reduce_flat", "bn_stats", "bn_stats_flat",
           "bn_stats_from_flat", "bns_loss", "bns_loss_from_flat", "merge_bn_stats",
           "bn_stats_reference", "bns_loss_reference"]
