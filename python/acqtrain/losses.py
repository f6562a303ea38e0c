"""The ACQ losses (definitions: ACQ_SPEC.md), on top of the acq_kernels attention / BN-stat ops.

Attention features arrive as one list per forward pass (one tensor per layer in S). Where two passes
are compared (eval vs train mode, teacher vs student) their features are stacked along the batch so
that each layer costs one attention launch.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
import torch.nn.functional as F

from . import ops


def kd_loss(student_logits, teacher_logits, temperature: float = 20.0, reduction: str = "batchmean"):
    """T^2 * KL(softmax(t/T) || softmax(s/T)). reduction='mean' is GDFQ's (divides by the class count too)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    if reduction == "mean":  # GDFQ's: the elementwise mean (torch warns about 'mean' for KL, so spell it out)
        return temperature ** 2 * F.kl_div(log_p, q, reduction="sum") / log_p.numel()
    return temperature ** 2 * F.kl_div(log_p, q, reduction=reduction)


def attention_of(feats: list[torch.Tensor], p: float = 2.0):
    """[(amap, anorm, center)] per layer."""
    return [ops.spatial_attention(f, p=p) for f in feats]


def acm_loss(centers: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """L_ACM: mean over samples and layers of ||center_l - c||^2."""
    return torch.stack([ops.attention_center_loss(c, target) for c in centers]).mean()


def pair_loss(anorms: list[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """L_PAIR on a batch laid out as [first draws; second draws] of the same (y, c).

    As ACQ_SPEC.md defines it: d = ||a(x1) - a(x2)||_2 averaged over the layers in S, then
    mean(relu(margin - d)). Each layer's distance is one fused launch over its stacked halves.
    """
    d = torch.stack([ops.attention_pair_distance(a, None, reduction="none") for a in anorms]).mean(0)
    return torch.relu(margin - d).mean()


def stacked_sq_distance(anorms: list[torch.Tensor]) -> torch.Tensor:
    """Mean over S of the per-sample ||a - b||^2 of stacked halves [a; b] (L_CONS, attention transfer)."""
    return torch.stack([ops.attention_sq_distance(a, None) for a in anorms]).mean()


@contextlib.contextmanager
def batch_stat_bn(model: nn.Module):
    """Run `model`'s BN layers on batch statistics WITHOUT touching their running stats (no copies).

    training=True with track_running_stats=False makes BatchNorm pass no running buffers to
    F.batch_norm, so nothing is updated; both flags are restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in bns]
    try:
        for m in bns:
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, (tr, trs) in zip(bns, saved):
            m.training, m.track_running_stats = tr, trs


class Captured:
    """The feature maps of one capture (owned by the caller, not by the tap)."""

    def __init__(self):
        self.feats: list[torch.Tensor] = []


class FeatureTap:
    """Forward hooks that collect the outputs of the given modules during `capture()`.

    The tap holds the capture's tensors only while it lasts, so no activation (and its autograd
    graph) outlives it through the hooks, and a hooked model stays deep-copyable."""

    def __init__(self, modules):
        self._current: Captured | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, args, out):
        if self._current is not None:
            self._current.feats.append(out)

    @contextlib.contextmanager
    def capture(self):
        self._current = cap = Captured()
        try:
            yield cap
        finally:
            self._current = None

    @staticmethod
    @contextlib.contextmanager
    def nothing():
        """A capture context that collects nothing (no loss term needs attention maps)."""
        yield Captured()

    def remove(self):
        for h in self._handles:
            h.remove()
