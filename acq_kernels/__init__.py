"""acq_kernels: fused kernels for data-free quantization."""
__version__ = "0.1.0"
from ._backend import get_backend, set_backend  # noqa: E402,F401
from .cpu_allocator import tune_cpu_allocator  # noqa: E402,F401
from .fake_quant import (fake_quantize, fake_quantize_learnable,  # noqa: E402,F401
                         fake_quantize_minmax, fake_quantize_moving_average)
from .fake_quant.modules import FakeQuant, LearnableFakeQuant  # noqa: E402,F401
from .fake_quant.onnx_export import onnx_translation_table  # noqa: E402,F401
from .fake_quant.onnx_export import register_torchscript_symbolics as _register_onnx
_register_onnx()  # plain torch.onnx.export(..., dynamo=False) then knows the fake-quant ops
from .bn_stats import (BNStatCollector, all_reduce_flat, bn_stats, bn_stats_flat,  # noqa: E402,F401
                       bn_stats_from_flat, bns_loss, bns_loss_from_flat, merge_bn_stats)
from .attention import (attention_center_loss, attention_pair_distance,  # noqa: E402,F401
                        attention_pair_hinge, attention_sq_distance, spatial_attention)

# The public API (everything else is internal and may change).
__all__ = [
    "__version__",
    # backend selection
    "get_backend", "set_backend", "tune_cpu_allocator",
    # fake quantization: functions and torch.ao-compatible modules
    "fake_quantize", "fake_quantize_learnable", "fake_quantize_minmax", "fake_quantize_moving_average",
    "FakeQuant", "LearnableFakeQuant",
    # ONNX export of fake-quant models with the dynamo exporter (custom_translation_table=...)
    "onnx_translation_table",
    # batched BatchNorm statistics and the BNS loss
    "BNStatCollector", "all_reduce_flat", "bn_stats", "bn_stats_flat", "bn_stats_from_flat", "bns_loss",
    "bns_loss_from_flat", "merge_bn_stats",
    # spatial attention maps and the ACQ attention losses
    "attention_center_loss", "attention_pair_distance", "attention_pair_hinge", "attention_sq_distance",
    "spatial_attention",
]
