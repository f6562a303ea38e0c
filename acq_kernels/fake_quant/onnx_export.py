"""ONNX export of acq_kernels' fake-quant ops as QuantizeLinear/DequantizeLinear (QDQ).

Both exporters get the graph torch's own FakeQuantize exports to: Cast of the zero point to the
8-bit container, QuantizeLinear, DequantizeLinear (per-channel: both with ``axis``). A range
narrower than its container (4-bit, reduce_range's (0, 127), symmetric (-127, 127), ...) adds a
Clip of the quantized integers to [quant_min, quant_max] between the two, as torch does for
(0, 127), so the exported range is exactly the trained one. Ranges that fit neither int8 nor
uint8 raise a ValueError naming them (ONNX's QuantizeLinear saturates to its container).

* TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): the symbolics are registered
  when acq_kernels is imported (:func:`register_torchscript_symbolics`).
* dynamo exporter (``dynamo=True``): pass ``custom_translation_table=onnx_translation_table()``
  or call :func:`export`, which adds it.

Export in eval with the observers disabled (``model.apply(torch.ao.quantization.disable_observer)``):
FakeQuant then runs the fixed-qparams op these translate. The observing ops (moving average,
minmax) have no translation: ONNX would freeze their running range.
onnxruntime computes ``x / scale`` where torch multiplies by ``1 / scale``, so at exact rounding
ties the two can differ by one quantization step.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["container_dtype", "export", "onnx_translation_table",
           "register_torchscript_symbolics", "OPSET"]

# First opset with per-axis QuantizeLinear and integer Clip (the TorchScript symbolics' floor).
OPSET = 13

_UINT8, _INT8 = "uint8", "int8"
_ONNX_TYPE = {_UINT8: 2, _INT8: 3}  # TensorProto.UINT8 / INT8
_FLOAT = 1  # TensorProto.FLOAT
_LIMITS = {_UINT8: (0, 255), _INT8: (-128, 127)}


def container_dtype(quant_min: int, quant_max: int) -> str:
    """The 8-bit integer type a QDQ pair of range [quant_min, quant_max] is exported in."""
    if 0 <= quant_min and quant_max <= 255:
        return _UINT8
    if -128 <= quant_min and quant_max <= 127:
        return _INT8
    raise ValueError(f"ONNX export: the quantization range [quant_min, quant_max] = "
                     f"[{quant_min}, {quant_max}] fits neither uint8 nor int8; QuantizeLinear "
                     "would saturate it to a different range")


class _TorchScriptBuilder:
    """Emits nodes into a TorchScript-exporter graph (attributes take a type suffix)."""

    def __init__(self, g):
        self.g = g

    def op(self, name, *inputs, **attrs):
        return self.g.op(name, *inputs, **{f"{k}_i": v for k, v in attrs.items()})

    def const(self, array: np.ndarray):
        return self.g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(array)))

    def is_float(self, value) -> bool:
        return value.type().scalarType() == "Float"


class _OnnxScriptBuilder:
    """Emits nodes through onnxscript (the dynamo exporter traces translation functions)."""

    def __init__(self):
        from onnxscript import opset18
        self.ops = opset18

    def op(self, name, *inputs, **attrs):
        return getattr(self.ops, name)(*inputs, **attrs)

    def const(self, array: np.ndarray):
        from onnxscript import ir
        return self.ops.Constant(value=ir.tensor(np.ascontiguousarray(array)))

    def is_float(self, value) -> bool:
        from onnxscript import ir
        return getattr(value, "dtype", None) == ir.DataType.FLOAT


def _emit_qdq(b, x, scale, zero_point, quant_min: int, quant_max: int, axis: int,
              zero_point_is_float: bool = False):
    """The one QDQ(+Clip) pattern: x fake-quantized to [quant_min, quant_max].

    zero_point: integer tensor, or a float one (LSQ) rounded half-even and clamped first, as
    torch's learnable ops do. axis < 0 means per-tensor.
    """
    container = container_dtype(quant_min, quant_max)
    np_dtype = np.dtype(container)
    if zero_point_is_float:
        zero_point = b.op("Clip", b.op("Round", zero_point),
                          b.const(np.array(quant_min, np.float32)),
                          b.const(np.array(quant_max, np.float32)))
    zero_point = b.op("Cast", zero_point, to=_ONNX_TYPE[container])
    if not b.is_float(scale):
        scale = b.op("Cast", scale, to=_FLOAT)
    axis_attr = {"axis": axis} if axis >= 0 else {}
    q = b.op("QuantizeLinear", x, scale, zero_point, **axis_attr)
    if (quant_min, quant_max) != _LIMITS[container]:
        q = b.op("Clip", q, b.const(np.array(quant_min, np_dtype)),
                 b.const(np.array(quant_max, np_dtype)))
    return b.op("DequantizeLinear", q, scale, zero_point, **axis_attr)


_EMPTY_MASK = np.zeros(0, np.uint8)  # the STE mask output: only backward reads it


# --- TorchScript exporter -----------------------------------------------------------------

def _ts_args(*kinds):
    from torch.onnx import symbolic_helper
    return symbolic_helper.parse_args(*kinds)


def _ts_fake_quant(g, x, scale, zero_point, quant_min, quant_max, axis, save_mask, byte_mask,
                   channels_last):
    b = _TorchScriptBuilder(g)
    return _emit_qdq(b, x, scale, zero_point, quant_min, quant_max, axis), b.const(_EMPTY_MASK)


def _ts_learnable(g, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    return _emit_qdq(_TorchScriptBuilder(g), x, scale, zero_point, quant_min, quant_max, axis,
                     zero_point_is_float=True)


_registered = False


def register_torchscript_symbolics() -> None:
    """Register the symbolics with torch.onnx's TorchScript exporter (idempotent)."""
    global _registered
    if _registered:
        return
    from torch.onnx import register_custom_op_symbolic
    table = {
        "acq_kernels::fake_quant": _ts_args("v", "v", "v", "i", "i", "i", "b", "b", "b")(_ts_fake_quant),
        "acq_kernels::fake_quant_learnable":
            _ts_args("v", "v", "v", "i", "i", "i", "f")(_ts_learnable),
    }
    for name, fn in table.items():
        register_custom_op_symbolic(name, fn, OPSET)
    _registered = True


# --- dynamo exporter ------------------------------------------------------------------------

def _dy_fake_quant(x, scale, zero_point, quant_min: int, quant_max: int, axis: int,
                   save_mask: bool, byte_mask: bool = False, channels_last: bool = False):
    b = _OnnxScriptBuilder()
    return _emit_qdq(b, x, scale, zero_point, quant_min, quant_max, axis), b.const(_EMPTY_MASK)


def _dy_learnable(x, scale, zero_point, quant_min: int, quant_max: int, axis: int,
                  grad_factor: float):
    return _emit_qdq(_OnnxScriptBuilder(), x, scale, zero_point, quant_min, quant_max, axis,
                     zero_point_is_float=True)


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    from . import ops  # noqa: F401  (defines the torch.ops.acq_kernels operators)
    ak = torch.ops.acq_kernels
    return {
        ak.fake_quant.default: _dy_fake_quant,
        ak.fake_quant_learnable.default: _dy_learnable,
    }


def export(model, args, f=None, *, dynamo: bool = True, **kwargs):
    """torch.onnx.export with acq_kernels' fake-quant translations added (dynamo=True) or
    registered (dynamo=False); other keyword arguments are torch.onnx.export's."""
    if dynamo:
        table = onnx_translation_table()
        table.update(kwargs.pop("custom_translation_table", None) or {})
        kwargs["custom_translation_table"] = table
    else:
        register_torchscript_symbolics()
    return torch.onnx.export(model, args, f, dynamo=dynamo, **kwargs)
