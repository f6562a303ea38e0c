"""Fake quantization: reference, Triton kernels, extension dispatch, autograd and functional API."""
from .functional import (fake_quantize, fake_quantize_learnable,  # noqa: F401
                         fake_quantize_minmax, fake_quantize_moving_average)
