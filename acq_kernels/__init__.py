"""acq_kernels: fused kernels for data-free quantization."""
__version__ = "0.1.0"
from ._backend import get_backend, set_backend  # noqa: E402,F401
