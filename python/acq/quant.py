"""Model quantization: a copy of the teacher with fake-quantized weights and activations.

- Every Conv2d/Linear becomes a Quant* module whose weight is fake-quantized per output channel
  (asymmetric min/max recomputed each forward, W bits) by `acq_kernels.fake_quantize_minmax`.
- After every ReLU an ActQuant fake-quantizes the activation per tensor (A bits) with an EMA range
  (`acq_kernels.fake_quantize_moving_average`). The EMA follows torch.ao's MovingAverageMinMaxObserver:
  the first observation initialises the range and later ones move it by `averaging_constant`
  (= 1 - momentum). That initialisation is already unbiased; GDFQ's code instead divides by a
  compounding bias-correction term and overshoots the range early on, which is not reproduced.
- The ranges are buffers (min_val, max_val, scale, zero_point), so they travel in state_dict()
  and in checkpoints.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
import torch.nn.functional as F

from . import ops
from .errors import AcqError

STE_MODES = ("pure", "clipped")
MIN_BITS, MAX_BITS = 2, 16


def check_bits(name: str, bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise AcqError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


class WeightQuant:
    """Marker of a weight-quantized layer (per-output-channel asymmetric min/max, `w_bits`)."""

    def weight_qparams(self):
        """(scale fp32[C], zero_point int32[C], quant_min, quant_max, axis) of the fake-quantized weight:
        clamp(round(w * (1 / scale)) + zero_point, quant_min, quant_max) are its integers (export)."""
        qmax = 2 ** self.w_bits - 1
        _, scale, zp = ops.fake_quantize_minmax(self.weight.detach(), 0, qmax, axis=0, ste=self.ste)
        return scale, zp, 0, qmax, 0


class QuantConv2d(WeightQuant, nn.Conv2d):
    def forward(self, x):
        w, _, _ = ops.fake_quantize_minmax(self.weight, 0, 2 ** self.w_bits - 1, axis=0, ste=self.ste)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(WeightQuant, nn.Linear):
    def forward(self, x):
        w, _, _ = ops.fake_quantize_minmax(self.weight, 0, 2 ** self.w_bits - 1, axis=0, ste=self.ste)
        return F.linear(x, w, self.bias)


def _quant_copy(layer: nn.Module, cls, bits: int, ste: str) -> nn.Module:
    q = copy.copy(layer)  # same parameters/buffers (already deep-copied), new class
    q.__class__ = cls
    q.w_bits, q.ste = bits, ste
    return q


class ActQuant(nn.Module):
    """Per-tensor asymmetric activation fake quantization with an EMA range (observing or frozen)."""

    def __init__(self, bits: int, averaging_constant: float = 0.1, ste: str = "pure"):
        super().__init__()
        self.bits, self.averaging_constant, self.ste = bits, averaging_constant, ste
        self.observing = True
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        # shapes as torch.ao's FakeQuantize: 0-dim range, [1] qparams
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    def forward(self, x):
        return ops.fake_quantize_moving_average(
            x, self.min_val, self.max_val, self.scale, self.zero_point, 0, 2 ** self.bits - 1,
            averaging_constant=self.averaging_constant, observe=self.observing, ste=self.ste)

    def extra_repr(self):
        return f"bits={self.bits}, averaging_constant={self.averaging_constant}, ste={self.ste}"


class ReLUQuant(nn.Sequential):
    """ReLU followed by its activation quantizer (keeps the module tree readable)."""

    def __init__(self, relu: nn.Module, quant: ActQuant):
        super().__init__(relu, quant)


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """deepcopy(model) minus its forward hooks (a trainer's feature taps belong to the teacher only)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
    saved = []
    for m in model.modules():
        saved.append({n: getattr(m, n) for n in names if hasattr(m, n)})
        for n in saved[-1]:
            setattr(m, n, type(saved[-1][n])())
    try:
        return copy.deepcopy(model)
    finally:
        for m, hooks in zip(model.modules(), saved):
            for n, v in hooks.items():
                setattr(m, n, v)


def quantize_model(teacher: nn.Module, w_bits: int, a_bits: int, first_last_bits: int | None = None,
                   ste: str = "pure", momentum: float = 0.9) -> nn.Module:
    """A quantized deep copy of `teacher` in eval mode (BN stays a fixed affine; gamma/beta trainable).

    teacher: the float model (not modified); the copy takes the same inputs ([N, C, H, W]) and returns
        the same outputs ([N, classes]).
    w_bits: weight bits, per output channel, asymmetric min/max recomputed each forward.
    a_bits: activation bits after every ReLU, per tensor, asymmetric, EMA range.
    first_last_bits: weight bits of the first conv and the last linear layer (None: w_bits).
    ste: straight-through estimator of the rounding: "pure" (identity) or "clipped" (zero outside the range).
    momentum: EMA momentum of the activation ranges (averaging constant 1 - momentum).
    """
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits)
    if first_last_bits is not None:
        check_bits("first_last_bits", first_last_bits)
    if ste not in STE_MODES:
        raise AcqError(f"ste must be one of {STE_MODES}, got {ste!r}")
    if not 0.0 <= momentum < 1.0:
        raise AcqError(f"momentum must be in [0, 1), got {momentum}")
    student = _copy_without_hooks(teacher)
    layers = [m for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    edge = {id(layers[0]), id(layers[-1])} if layers else set()

    def convert(parent: nn.Module):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                bits = first_last_bits if (first_last_bits is not None and id(child) in edge) else w_bits
                cls = QuantConv2d if isinstance(child, nn.Conv2d) else QuantLinear
                setattr(parent, name, _quant_copy(child, cls, bits, ste))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, ReLUQuant(child, ActQuant(a_bits, 1.0 - momentum, ste)))
            else:
                convert(child)

    convert(student)
    student.requires_grad_(True)
    return student.eval()


def act_quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


def set_observing(model: nn.Module, observing: bool) -> None:
    """Track activation ranges (the first `range_epochs`) or freeze them."""
    for m in act_quantizers(model):
        m.observing = observing


@torch.no_grad()
def calibrate_on_noise(student: nn.Module, shape, batches: int = 4, batch_size: int = 64,
                       generator: torch.Generator | None = None, device="cpu") -> None:
    """Naive data-free baseline: observe activation ranges on N(0, 1) noise images, then freeze."""
    set_observing(student, True)
    for _ in range(batches):
        student(torch.randn((batch_size, *shape), generator=generator).to(device))
    set_observing(student, False)
