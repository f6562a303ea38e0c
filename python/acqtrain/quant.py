"""Model quantization: a traced copy of the teacher with fake-quantized weights and activations.

`quantize_model` traces the teacher with torch.fx (one pass over the graph finds the weight layers
and the activation call sites, one inserts the quantizers), like torch.ao's prepare_qat_fx but small:
- Every Conv1d/2d/3d (grouped and depthwise included), ConvTranspose1d/2d/3d and Linear the forward
  calls becomes a `WeightQuant` layer (same parameters, new class) whose weight is fake-quantized per
  output channel (axis 0; axis 1 for transposed convolutions, as torch.ao) with W bits, min/max
  recomputed each forward. weight_range "zero": torch.ao's rule, the range widened to include 0
  (`acq_kernels.fake_quantize_minmax`); "raw": GDFQ's raw per-channel [min, max].
- Every activation call site gets its own `ActQuant` after it (a module called at three places
  gets three): per-tensor asymmetric fake quantization with an EMA range
  (`acq_kernels.fake_quantize_moving_average`). The EMA follows torch.ao's MovingAverageMinMaxObserver
  (first observation initialises the range, later ones move it by averaging_constant = 1 - momentum);
  GDFQ's compounding bias correction, which overshoots early on, is not reproduced.
  ReLU-like sites (ReLU, ReLU6) observe [0, max]; activations without a ReLU rule (LeakyReLU,
  Hardtanh, GELU, SiLU, Hardswish, Hardsigmoid, ELU, Mish, Sigmoid, Tanh, ...) get the same
  quantizer on their observed signed range [min, max] (zero always representable).
- Anything that would leave a weight or an activation in float is refused with an AcqError
  (functional convolutions, weight layers hidden inside a leaf module).
- Ranges are buffers (min_val, max_val, scale, zero_point), so they travel in state_dict().
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx, nn
import torch.nn.functional as F

from . import graph as G
from . import ops
from .errors import AcqError

STE_MODES = ("pure", "clipped")
WEIGHT_RANGES = ("zero", "raw")
MIN_BITS, MAX_BITS = 2, 16
_EPS = torch.finfo(torch.float32).eps  # torch.ao's smallest scale


def check_bits(name: str, bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise AcqError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


# ----------------------------------------------------------------------------- weights
def _raw_qparams(w: torch.Tensor, bits: int, axis: int):
    """GDFQ's per-channel qparams from the raw [min, max] (not widened to include 0): the zero
    point -round(min / scale) may lie outside [0, 2^bits - 1] (a channel of one sign)."""
    flat = w.detach().float().transpose(0, axis).flatten(1)
    mn, mx = flat.aminmax(dim=1)
    scale = ((mx - mn) / (2 ** bits - 1)).clamp_min(_EPS)
    return scale, (-torch.round(mn / scale)).to(torch.int32)


def _raw_fake_quantize(w: torch.Tensor, bits: int, axis: int, ste: str) -> torch.Tensor:
    # acq_kernels' fake_quantize requires zero points inside the integer range, which raw ranges
    # break, so this mode is spelled out in torch ops (weights are small next to activations)
    scale, zp = _raw_qparams(w, bits, axis)
    shape = [-1 if d == axis else 1 for d in range(w.dim())]
    s, z = scale.view(shape), zp.view(shape).float()
    q = torch.round(w.detach().float() / s) + z
    out = ((q.clamp(0, 2 ** bits - 1) - z) * s).to(w.dtype)
    grad = w if ste == "pure" else w * ((q >= 0) & (q <= 2 ** bits - 1))
    return out + (grad - grad.detach())


class WeightQuant:
    """Marker mixin of every weight-quantized layer: w_bits, ste, weight_range and the qparams its
    forward uses. The float layer's own parameters (weight, bias) are kept."""

    w_bits: int
    ste: str
    weight_range: str
    w_axis = 0

    @property
    def quant_min(self) -> int:
        return 0

    @property
    def quant_max(self) -> int:
        return 2 ** self.w_bits - 1

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_range == "raw":
            return _raw_fake_quantize(self.weight, self.w_bits, self.w_axis, self.ste)
        w, _, _ = ops.fake_quantize_minmax(self.weight, 0, self.quant_max, axis=self.w_axis, ste=self.ste)
        return w

    @torch.no_grad()
    def weight_qparams(self):
        """(scale fp32 [C], zero_point int32 [C], quant_min, quant_max, axis) of the forward's weight:
        (clamp(round(w / scale) + zero_point, quant_min, quant_max) - zero_point) * scale."""
        if self.weight_range == "raw":
            scale, zp = _raw_qparams(self.weight, self.w_bits, self.w_axis)
        else:
            _, scale, zp = ops.fake_quantize_minmax(self.weight.detach(), 0, self.quant_max, axis=self.w_axis)
        return scale.float(), zp.to(torch.int32), self.quant_min, self.quant_max, self.w_axis

    def extra_repr(self):
        return super().extra_repr() + f", w_bits={self.w_bits}, weight_range={self.weight_range}, ste={self.ste}"


class QuantConv1d(WeightQuant, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv2d(WeightQuant, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv3d(WeightQuant, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class _QuantConvTranspose(WeightQuant):
    w_axis = 1  # weight [C_in, C_out / groups, ...]: the output axis, as torch.ao's per-channel observers
    _dims: int
    _fn = None

    def forward(self, x, output_size=None):
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, self._dims,
                                   self.dilation)
        return type(self)._fn(x, self.quantized_weight(), self.bias, self.stride, self.padding, pad, self.groups,
                              self.dilation)


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    _dims, _fn = 1, F.conv_transpose1d


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    _dims, _fn = 2, F.conv_transpose2d


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    _dims, _fn = 3, F.conv_transpose3d


class QuantLinear(WeightQuant, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)


# float type -> its quantized class (subclasses with their own forward are refused)
QUANT_CLASSES = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
                 nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
                 nn.ConvTranspose3d: QuantConvTranspose3d, nn.Linear: QuantLinear}
WEIGHT_TYPES = tuple(QUANT_CLASSES)
_FUNCTIONAL_WEIGHT_OPS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                          F.linear, torch.conv1d, torch.conv2d, torch.conv3d}


# ----------------------------------------------------------------------------- activations
class ActQuant(nn.Module):
    """Per-tensor asymmetric activation fake quantization with an EMA range (observing or frozen)."""

    def __init__(self, bits: int, averaging_constant: float = 0.1, ste: str = "pure", op: str = "relu"):
        super().__init__()
        self.bits, self.averaging_constant, self.ste, self.op = bits, averaging_constant, ste, op
        self.quant_min, self.quant_max = 0, 2 ** bits - 1
        self.observing = True
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        # shapes as torch.ao's FakeQuantize: 0-dim range, [1] qparams
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    def forward(self, x):
        return ops.fake_quantize_moving_average(
            x, self.min_val, self.max_val, self.scale, self.zero_point, self.quant_min, self.quant_max,
            averaging_constant=self.averaging_constant, observe=self.observing, ste=self.ste)

    def extra_repr(self):
        return f"op={self.op}, bits={self.bits}, averaging_constant={self.averaging_constant}, ste={self.ste}"


# (type, kind) in match order (ReLU6 subclasses Hardtanh)
ACT_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.Hardtanh, "hardtanh"), (nn.LeakyReLU, "leaky_relu"),
               (nn.PReLU, "prelu"), (nn.RReLU, "rrelu"), (nn.ELU, "elu"), (nn.SELU, "selu"), (nn.CELU, "celu"),
               (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.Mish, "mish"), (nn.Hardswish, "hardswish"),
               (nn.Hardsigmoid, "hardsigmoid"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"),
               (nn.Softplus, "softplus"), (nn.Softsign, "softsign"), (nn.Threshold, "threshold"))
ACT_FUNCTIONS = {F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                 F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh", F.leaky_relu: "leaky_relu",
                 F.leaky_relu_: "leaky_relu", F.prelu: "prelu", F.rrelu: "rrelu", F.elu: "elu", F.elu_: "elu",
                 F.selu: "selu", F.celu: "celu", F.gelu: "gelu", F.silu: "silu", F.mish: "mish",
                 F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
                 F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.softplus: "softplus",
                 F.softsign: "softsign", F.threshold: "threshold"}
ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
               "tanh_": "tanh"}
ACT_TYPES = tuple(t for t, _ in ACT_MODULES)


def _act_kind(node: fx.Node, modules: dict):
    """(kind, in_place) of an activation call site, or None."""
    if node.op == "call_module":
        m = modules[node.target]
        for t, kind in ACT_MODULES:
            if isinstance(m, t):
                return kind, bool(getattr(m, "inplace", False))
    elif node.op == "call_function" and node.target in ACT_FUNCTIONS:
        name = getattr(node.target, "__name__", "")
        return ACT_FUNCTIONS[node.target], (name.endswith("_") or node.kwargs.get("inplace") is True
                                            or any(a is True for a in node.args[1:]))
    elif node.op == "call_method" and node.target in ACT_METHODS:
        return ACT_METHODS[node.target], node.target.endswith("_")
    return None


# ----------------------------------------------------------------------------- summary
@dataclasses.dataclass
class QuantSummary:
    """What quantize_model did, in graph (execution) order."""
    weight_layers: list  # (module name, float type, w_bits, weight_range)
    act_sites: list      # (ActQuant name, site node, op kind, a_bits)

    def __str__(self):
        lines = [f"{len(self.weight_layers)} weight layers, {len(self.act_sites)} activation sites"]
        lines += [f"  W{b} {name} ({t}, range {r})" for name, t, b, r in self.weight_layers]
        lines += [f"  A{b} {q} after {site} ({kind})" for q, site, kind, b in self.act_sites]
        return "\n".join(lines)


def summary(student: fx.GraphModule) -> QuantSummary:
    """The weight layers and activation sites of a quantize_model student, in execution order."""
    modules = dict(student.named_modules())
    weights, acts, seen = [], [], set()
    for node in student.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, WeightQuant) and node.target not in seen:
            seen.add(node.target)
            float_type = next(t for t, q in QUANT_CLASSES.items() if isinstance(m, q)).__name__
            weights.append((node.target, float_type, m.w_bits, m.weight_range))
        elif isinstance(m, ActQuant):
            acts.append((node.target, node.args[0].name, m.op, m.bits))
    return QuantSummary(weights, acts)


# ----------------------------------------------------------------------------- quantize_model
def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """deepcopy(model) minus its forward hooks (hooks on the teacher belong to the teacher only)."""
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


def _float_base(m: nn.Module) -> type:
    return next(t for t in type(m).__mro__ if t in QUANT_CLASSES)


def _check_nothing_hidden(gm: fx.GraphModule, modules: dict) -> None:
    """Refuse graphs where a weight or an activation would escape quantization."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_WEIGHT_OPS:
            raise AcqError(f"{node.name}: functional {getattr(node.target, '__name__', node.target)} cannot have its "
                           "weight quantized; use the nn module (nn.Conv2d, nn.Linear, ...) instead")
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, WEIGHT_TYPES) and type(m).forward is not _float_base(m).forward:
            raise AcqError(f"{node.target} is a {type(m).__name__} (a {_float_base(m).__name__} with its own "
                           "forward): cannot quantize its weight")
        if not isinstance(m, WEIGHT_TYPES + ACT_TYPES):
            hidden = [n for n, c in m.named_modules() if n and isinstance(c, WEIGHT_TYPES + ACT_TYPES)]
            if hidden:
                raise AcqError(f"{node.target} ({type(m).__name__}) is traced as one opaque module but holds "
                               f"{', '.join(hidden[:4])}: they would stay in float")


def quantize_model(teacher: nn.Module, w_bits: int, a_bits: int, first_last_bits: int | None = None,
                   ste: str = "pure", momentum: float = 0.9, weight_range: str = "zero",
                   leaf_modules=()) -> fx.GraphModule:
    """A quantized, traced deep copy of `teacher` in eval mode (BN stays a fixed affine; gamma/beta
    trainable). `summary(student)` lists what was quantized.

    teacher: the float model (not modified); the student takes the same inputs ([N, C, H, W]) and
        returns the same outputs ([N, classes]).
    w_bits: weight bits, per output channel, min/max recomputed each forward.
    a_bits: activation bits at every activation call site, per tensor, asymmetric, EMA range.
    first_last_bits: weight bits of the first and last weight layer in execution order (None: w_bits).
    ste: straight-through estimator of the rounding: "pure" (identity) or "clipped" (zero outside the range).
    momentum: EMA momentum of the activation ranges (averaging constant 1 - momentum).
    weight_range: "zero" (torch.ao: the range includes 0) or "raw" (GDFQ: the raw per-channel [min, max]).
    leaf_modules: module types torch.fx must not trace into (they may hold no weights/activations).
    """
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits)
    if first_last_bits is not None:
        check_bits("first_last_bits", first_last_bits)
    if ste not in STE_MODES:
        raise AcqError(f"ste must be one of {STE_MODES}, got {ste!r}")
    if weight_range not in WEIGHT_RANGES:
        raise AcqError(f"weight_range must be one of {WEIGHT_RANGES}, got {weight_range!r}")
    if not 0.0 <= momentum < 1.0:
        raise AcqError(f"momentum must be in [0, 1), got {momentum}")
    student = G.trace(_copy_without_hooks(teacher).eval(), leaf_modules)
    modules = dict(student.named_modules())
    _check_nothing_hidden(student, modules)

    # pass 1: weight layers (first call decides the order) and activation sites
    nodes = list(student.graph.nodes)
    weights = list(dict.fromkeys(n.target for n in nodes
                                 if n.op == "call_module" and isinstance(modules[n.target], WEIGHT_TYPES)))
    sites = [(n, k) for n in nodes if (k := _act_kind(n, modules)) is not None]
    if not weights:
        raise AcqError(f"{type(teacher).__name__} has no Conv/Linear layer in its forward: nothing to quantize")

    # pass 2: swap in the quantized classes, insert one ActQuant per site
    for i, name in enumerate(weights):
        m = modules[name]
        m.__class__ = QUANT_CLASSES[_float_base(m)]  # same parameters/buffers, new forward
        edge = i in (0, len(weights) - 1) and first_last_bits is not None
        m.w_bits, m.ste, m.weight_range = first_last_bits if edge else w_bits, ste, weight_range
    position = {n: i for i, n in enumerate(nodes)}
    for node, (kind, in_place) in sites:
        attr = f"{node.name}_aq"
        while hasattr(student, attr):
            attr += "_"
        student.add_submodule(attr, ActQuant(a_bits, 1.0 - momentum, ste, op=kind))
        with student.graph.inserting_after(node):
            q = student.graph.call_module(attr, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        if in_place and node.args and isinstance(node.args[0], fx.Node):
            # the input now holds the activation: its later readers read the quantized value
            for user in list(node.args[0].users):
                if user not in (node, q) and position.get(user, -1) > position[node]:
                    user.replace_input_with(node.args[0], q)
    student.recompile()
    student.requires_grad_(True)
    return student.eval()


def act_quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


def set_observing(model: nn.Module, observing: bool) -> None:
    """Track activation ranges (the first `range_epochs`) or freeze them."""
    for m in act_quantizers(model):
        m.observing = observing


def quantized_output(student: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node whose value the student's later layers read for `node`: its ActQuant if it is a site."""
    modules = dict(student.named_modules())
    users = [u for u in node.users if u.op == "call_module" and isinstance(modules.get(u.target), ActQuant)]
    return users[0] if users else node


@torch.no_grad()
def calibrate_on_noise(student: nn.Module, shape, batches: int = 4, batch_size: int = 64,
                       generator: torch.Generator | None = None, device="cpu") -> None:
    """Naive data-free baseline: observe activation ranges on N(0, 1) noise images, then freeze."""
    set_observing(student, True)
    for _ in range(batches):
        student(torch.randn((batch_size, *shape), generator=generator).to(device))
    set_observing(student, False)


__all__ = ["ActQuant", "WeightQuant", "QuantSummary", "quantize_model", "summary", "set_observing",
           "act_quantizers", "calibrate_on_noise", "check_bits"]
