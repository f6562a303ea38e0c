"""How a [N, C, H, W] feature map is addressed by the kernels (shared by every backend and by
the fake implementations, so that real and traced outputs agree on strides).

Two addressing modes cover contiguous, channels_last and channel-slice views without a copy:
  "nchw": offset = n*stride_n + c*stride_c + s           (pixels contiguous)
  "nhwc": offset = n*stride_n + s*stride_s + c           (channels contiguous)
with s = h*W + w. Anything else is copied to contiguous first.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Layout(NamedTuple):
    channels_last: bool
    stride_n: int
    stride_c: int   # used by "nchw"
    stride_s: int   # used by "nhwc"


def _pixel_stride(shape, strides) -> Optional[int]:
    """ps with offset(h, w) = (h*W + w) * ps for all h, w, or None."""
    _, _, H, W = shape
    _, _, sh, sw = strides
    if H * W == 1:
        return 0
    if W == 1:
        return sh
    if H == 1:
        return sw
    return sw if sh == W * sw else None


def feature_layout(feat: torch.Tensor) -> Optional[Layout]:
    """The addressing of `feat` itself, or None when it needs a contiguous copy."""
    N, C, H, W = feat.shape
    sn, sc, _, _ = feat.stride()
    ps = _pixel_stride(feat.shape, feat.stride())
    if ps is None:
        return None
    if sc == 1 and C > 1:
        return Layout(True, sn, 1, ps)
    if ps == 1 or H * W == 1:
        return Layout(False, sn, sc, 1)
    if C == 1:
        return Layout(True, sn, 1, ps)
    return None


def input_layout(feat: torch.Tensor):
    """(tensor the kernels read, its Layout): feat itself when addressable, else a copy."""
    lay = feature_layout(feat)
    if lay is None:
        feat = feat.contiguous()
        lay = feature_layout(feat)
    return feat, lay


def grad_layout(feat: torch.Tensor) -> Layout:
    """Layout of dF: channels_last when F is read channels-contiguous, else contiguous NCHW."""
    N, C, H, W = feat.shape
    lay = feature_layout(feat)
    if lay is not None and lay.channels_last:
        return Layout(True, C * H * W, 1, C)
    return Layout(False, C * H * W, H * W, 1)


def empty_grad(feat: torch.Tensor) -> torch.Tensor:
    """Uninitialised dF with grad_layout(feat)'s strides."""
    lay = grad_layout(feat)
    fmt = torch.channels_last if lay.channels_last else torch.contiguous_format
    return torch.empty(feat.shape, dtype=feat.dtype, device=feat.device, memory_format=fmt)
