"""The acq_kernels ops on the loop's hot path, in one place.

Everything goes through the public acq_kernels API, which dispatches each call to the backend chosen
with `acq_kernels.set_backend` ("auto" picks the fastest for the device; "reference" is the
pure-PyTorch baseline of the end-to-end benchmark), so one switch changes the whole loop.
"""
from __future__ import annotations

from acq_kernels import (BNStatCollector, attention_center_loss, attention_pair_distance,  # noqa: F401
                         attention_pair_hinge,
                         attention_sq_distance, fake_quantize_minmax, fake_quantize_moving_average,
                         set_backend, spatial_attention)


def bn_stat_collector(model):
    """Hooks every BN layer's input during a forward; `.loss()` -> (L_BNS, per-layer terms)."""
    return BNStatCollector(model)
