"""torch.library custom ops of the fake-quant family, their autograd, and backend dispatch.

Each op runs one backend per call, chosen by `_backend.select`: the reference (pure PyTorch),
the Triton kernels, or the extension's `torch.ops.acq_kernels_C` operators (cpu/cuda) when the
extension provides them. All backends follow the same contract (see reference.py), including
the bit-packed mask, so the saved state of a forward can be consumed by any backward.

Arguments are validated by functional.py before they get here.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from .. import _backend, _extension
from . import reference


@functools.lru_cache(maxsize=None)
def _ext_has(name: str) -> bool:
    """Whether the compiled extension registers acq_kernels_C::<name> (it may be older)."""
    if _extension.load() is None:
        return False
    try:
        getattr(_extension.ops(), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _supported(x: Tensor, name: str) -> tuple:
    names = ["reference"]
    if x.dtype != torch.float64:  # Triton kernels cover fp32/fp16/bf16
        names.append("triton")
    if _ext_has(name):
        names += ["cuda", "cpu"]
    return tuple(names)


def _impl(x: Tensor, name: str):
    """The function implementing contract op `name` for x's device on the selected backend."""
    backend = _backend.select(x.device, supported=_supported(x, name), op=f"fake_quant.{name}",
                              numel=x.numel())
    if backend == "reference":
        return getattr(reference, name)
    if backend == "triton":
        from . import triton_launch
        return getattr(triton_launch, name)
    return getattr(_extension.ops(), name)


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).reshape(-1).contiguous()


# custom_op takes tags in the torch versions we test except 2.7, whose ops keep the default
# layout constraint (fixed stride order: correct, with the copies _custom_op avoids).
_FLEXIBLE = ({"tags": (torch.Tag.flexible_layout,)}
             if "tags" in inspect.signature(torch.library.custom_op).parameters else {})


def _custom_op(name: str, mutates_args=(), flexible: bool = True):
    """torch.library.custom_op, tagged flexible_layout: the kernels take a tensor in any dense
    layout and lay their outputs out like it, so inductor feeds the layout it chose (the
    channels-last conv outputs of a CPU conv net) instead of copying to the traced strides and
    back (measured: two transposing copies per call, forward and backward). Without the tag
    inductor also saves more bool masks (ReLU6's, the STE's) by transposing stores: MobileNetV2's
    compiled QAT step took 1641 ms untagged (compiled with caches off) vs 847-911 ms tagged
    (2026-12-03, 2-core CPU). Compare with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1: the FX graph
    cache ignores the tag, so a warm cache reruns the other variant's code."""
    return torch.library.custom_op(name, mutates_args=mutates_args,
                                   **(_FLEXIBLE if flexible else {}))


def _dense(x: Tensor) -> Tensor:
    """x, or, for a view with gaps (flexible_layout lets inductor pass any strides), a dense copy
    laid out as torch.empty_like(x), which is what the fake kernels promise."""
    return x if reference.is_dense(x) else torch.empty_like(x).copy_(x)


def _tracing(t: Tensor) -> bool:
    """Whether autograd runs on traced tensors (torch.compile/export: FakeTensor, functional
    wrappers), where inductor may change the layout it traced."""
    return type(t) is not torch.Tensor or not _no_python_modes()


def _like(grad: Tensor, like: Tensor) -> Tensor:
    """grad with like's strides (the kernels pair elements of grad and like in memory
    order)."""
    if grad.stride() == like.stride():
        return grad
    return torch.empty_like(like).copy_(grad)


def _restride(grad: Tensor, shape, stride) -> Tensor:
    """grad laid out like the forward's output (the mask numbers elements in memory order)."""
    if tuple(grad.stride()) == tuple(stride) or grad.numel() <= 1:
        return grad
    g = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device)
    g.copy_(grad)
    return g


def conv_weight_channels_last(x: Tensor, axis: int) -> bool:
    """Whether a fake quant of x should lay its outputs out channels-last: when torch.compile
    traces a contiguous 4-D CPU tensor quantized per output channel (a conv weight) for
    inductor, which runs CPU convs channels-last (layout optimization with mkldnn). Laid out
    like the NCHW parameter, the op's output and its saved bool mask would each go through one
    of inductor's transposing copies after the op, every step; the op relays x once instead
    (aten's copy), and its kernels write both outputs in that layout. Measured on ResNet-18's
    compiled QAT step (B=16, 112 px, 2-core CPU, caches off): 568-594 ms -> 444 ms, float
    357-382 ms (2026-12-03). Min/max and every element's result do not depend on the layout,
    so this changes no value. (torch.export traces it too: torch.compiler.is_exporting() is True
    under any dynamo trace in torch 2.11, so it cannot tell the two apart.)"""
    if (axis != 0 or x.dim() != 4 or x.device.type != "cpu"
            or not torch.compiler.is_compiling()
            or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    import torch._inductor.config as inductor_config  # (imported by torch.compile already)
    return bool(inductor_config.layout_optimization and torch._C._has_mkldnn)


def _laid_out(x: Tensor, channels_last: bool) -> Tensor:
    """The op's input as its kernels read it: channels-last when asked, else dense."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else _dense(x)


def _fake_out(x: Tensor, channels_last: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last if channels_last
                            else torch.preserve_format)


def _mask_numel(n, save_mask: bool):
    return (n + 7) // 8 if save_mask else 0


def byte_mask(x: Tensor, save_mask: bool) -> bool:
    """Whether a forward op should return its STE mask as one bool per element laid out like
    its output, instead of packed bits: when traced (torch.compile, export). Inductor may then
    give the output another layout than the traced one (flexible_layout), or hand its backward
    a relaid copy, which a memory-order bit mask cannot follow; a bool tensor is relaid with
    it, and the backward's grad * mask becomes a pointwise op inductor fuses into its
    neighbours (torch's own fake-quant ops save a bool mask too)."""
    return save_mask and _tracing(x)


def _mask_out(out: Tensor, mask: Tensor, byte_mask: bool) -> Tensor:
    """The op's mask output: the kernels' packed bits, or those bits one bool per element
    laid out like out."""
    if not byte_mask:
        return mask
    if out.device.type == "cpu" and _ext_has("fq_unpack_mask"):
        return _extension.ops().fq_unpack_mask(mask, out)  # one pass, 8 bools per store
    return reference.unpack_mask(mask, out)


def _fake_mask(x: Tensor, save_mask: bool, byte_mask: bool) -> Tensor:
    if save_mask and byte_mask:
        return torch.empty_like(x, dtype=torch.bool)
    return x.new_empty(_mask_numel(x.numel(), save_mask), dtype=torch.uint8)


# --- fake quant with fixed qparams ---------------------------------------------------------

@_custom_op("acq_kernels::fake_quant")
def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
               axis: int, save_mask: bool, byte_mask: bool = False,
               channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """(out, mask: packed bits, or bools when byte_mask); scale float32 [1]/[C], zero_point
    int32 [1]/[C], axis -1 = per-tensor; outputs channels-last when channels_last (see
    conv_weight_channels_last)."""
    x = _laid_out(x, channels_last)
    out, mask = _impl(x, "fq_forward")(x, scale, zero_point, quant_min, quant_max, axis,
                                       save_mask)
    return out, _mask_out(out, mask, save_mask and byte_mask)


@fake_quant.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, save_mask, byte_mask=False,
      channels_last=False):
    x = _fake_out(x, channels_last)
    return torch.empty_like(x), _fake_mask(x, save_mask, byte_mask)


# Not flexible: the packed mask numbers the forward output's elements in memory order, so grad
# must come laid out as that output was (traced graphs use byte masks instead, see _mask_grad).
@_custom_op("acq_kernels::fake_quant_mask_backward", flexible=False)
def fake_quant_mask_backward(grad: Tensor, mask: Tensor) -> Tensor:
    """grad * mask bit (grad laid out like the forward's output)."""
    return _impl(grad, "fq_mask_backward")(grad, mask)


@fake_quant_mask_backward.register_fake
def _(grad, mask):
    return torch.empty_like(grad)


def _mask_setup(ctx, out: Tensor, mask: Tensor, save_mask: bool):
    ctx.save_mask = save_mask
    ctx.shape, ctx.stride = tuple(out.shape), tuple(out.stride())
    if save_mask:
        ctx.save_for_backward(mask)  # 1 bit per element: the only full-size state kept


def _mask_grad(ctx, grad: Tensor):
    if grad is None:
        return None
    if not ctx.save_mask:  # pure STE: identity
        return grad
    (mask,) = ctx.saved_tensors
    if mask.dtype == torch.bool:  # byte_mask: as torch's cachemask backward, dY * mask
        return grad * mask
    return fake_quant_mask_backward(_restride(grad, ctx.shape, ctx.stride), mask)


def _fq_setup(ctx, inputs, output):
    _mask_setup(ctx, output[0], output[1], inputs[6])


def _fq_backward(ctx, grad_out, grad_mask):
    return (_mask_grad(ctx, grad_out),) + (None,) * 8


fake_quant.register_autograd(_fq_backward, setup_context=_fq_setup)


# --- learnable (LSQ) ---------------------------------------------------------------------

def _forward_zero_point(zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """torch's learnable forward: round half-even, clamp, int32 (no host sync)."""
    return torch.clamp(torch.round(zero_point.detach().to(torch.float32)), quant_min,
                       quant_max).to(torch.int32).reshape(-1).contiguous()


@_custom_op("acq_kernels::fake_quant_learnable")
def fake_quant_learnable(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                         quant_max: int, axis: int, grad_factor: float) -> Tensor:
    x = _dense(x)
    fwd = _impl(x, "fq_forward")
    if fwd is reference.fq_forward and scale.dtype == torch.float64:
        s = scale.reshape(-1)  # all-double reference path (gradcheck)
    else:
        s = _f32(scale)
    zp = _forward_zero_point(zero_point, quant_min, quant_max)
    return fwd(x, s, zp, quant_min, quant_max, axis, False)[0]


@fake_quant_learnable.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    return torch.empty_like(x)


@_custom_op("acq_kernels::fake_quant_learnable_backward")
def fake_quant_learnable_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor,
                                  quant_min: int, quant_max: int, axis: int,
                                  grad_factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzero_point), dx laid out like x, dscale/dzero_point shaped [1]/[C] in
    scale's dtype."""
    x = _dense(x)
    grad = _like(grad, x)
    bwd = _impl(x, "fq_learnable_backward")
    if bwd is reference.fq_learnable_backward:
        s, zp = scale.reshape(-1), zero_point.reshape(-1)
    else:
        s, zp = _f32(scale), _f32(zero_point)
    dx, ds, dz = bwd(grad, x, s, zp, quant_min, quant_max, axis, grad_factor)
    return dx, ds.to(scale.dtype).reshape(-1), dz.to(scale.dtype).reshape(-1)


@fake_quant_learnable_backward.register_fake
def _(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    n = scale.numel()
    return (torch.empty_like(x), scale.new_empty(n), scale.new_empty(n))


def _lsq_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, grad_factor = inputs
    ctx.args = (quant_min, quant_max, axis, grad_factor)
    ctx.scale_shape, ctx.zp_shape = tuple(scale.shape), tuple(zero_point.shape)
    ctx.zp_dtype = zero_point.dtype
    ctx.save_for_backward(x, scale, zero_point)


def _lsq_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    # (the op lays grad out like x: traced, x's strides at run time are inductor's choice)
    dx, ds, dz = fake_quant_learnable_backward(grad, x, scale, zero_point, *ctx.args)
    return (dx, ds.reshape(ctx.scale_shape), dz.reshape(ctx.zp_shape).to(ctx.zp_dtype),
            None, None, None, None)


fake_quant_learnable.register_autograd(_lsq_backward, setup_context=_lsq_setup)


# --- fused min/max observer + fake quant ---------------------------------------------------

@_custom_op("acq_kernels::fake_quant_minmax")
def fake_quant_minmax(x: Tensor, axis: int, quant_min: int, quant_max: int, symmetric: bool,
                      eps: float, save_mask: bool,
                      byte_mask: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mask, scale float32 [C]/[1], zero_point int32 [C]/[1])."""
    x = _dense(x)
    out, mask, scale, zero_point = _impl(x, "fq_minmax_forward")(
        x, axis, quant_min, quant_max, symmetric, eps, save_mask)
    return out, _mask_out(out, mask, save_mask and byte_mask), scale, zero_point


@fake_quant_minmax.register_fake
def _(x, axis, quant_min, quant_max, symmetric, eps, save_mask, byte_mask=False):
    c = 1 if axis < 0 else x.size(axis)
    return (torch.empty_like(x), _fake_mask(x, save_mask, byte_mask),
            x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.int32))


def _minmax_setup(ctx, inputs, output):
    _mask_setup(ctx, output[0], output[1], inputs[6])


def _minmax_backward(ctx, grad_out, grad_mask, grad_scale, grad_zp):
    return _mask_grad(ctx, grad_out), None, None, None, None, None, None, None


fake_quant_minmax.register_autograd(_minmax_backward, setup_context=_minmax_setup)


# --- moving-average observer + fake quant (mutates the observer buffers) --------------------

@_custom_op("acq_kernels::fake_quant_moving_average",
            mutates_args=("min_val", "max_val", "scale", "zero_point"))
def fake_quant_moving_average(x: Tensor, min_val: Tensor, max_val: Tensor, scale: Tensor,
                              zero_point: Tensor, averaging_constant: float, quant_min: int,
                              quant_max: int, symmetric: bool, eps: float, observe: bool,
                              save_mask: bool, byte_mask: bool = False) -> tuple[Tensor, Tensor]:
    x = _dense(x)
    out, mask = _impl(x, "fq_moving_average_forward")(x, min_val, max_val, scale, zero_point,
                                                      averaging_constant, quant_min, quant_max,
                                                      symmetric, eps, observe, save_mask)
    return out, _mask_out(out, mask, save_mask and byte_mask)


@fake_quant_moving_average.register_fake
def _(x, min_val, max_val, scale, zero_point, averaging_constant, quant_min, quant_max,
      symmetric, eps, observe, save_mask, byte_mask=False):
    return torch.empty_like(x), _fake_mask(x, save_mask, byte_mask)


class MovingAverageFakeQuant(torch.autograd.Function):
    """Autograd for the mutating op (torch.library allows autograd formulas only on functional
    ops); dynamo traces this Function, so torch.compile(fullgraph=True) still sees one op."""

    @staticmethod
    def forward(ctx, x, min_val, max_val, scale, zero_point, averaging_constant, quant_min,
                quant_max, symmetric, eps, observe, save_mask):
        out, mask = fake_quant_moving_average(x, min_val, max_val, scale, zero_point,
                                              averaging_constant, quant_min, quant_max,
                                              symmetric, eps, observe, save_mask,
                                              byte_mask(x, save_mask))
        _mask_setup(ctx, out, mask, save_mask)
        ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, grad_out, grad_mask):
        return (_mask_grad(ctx, grad_out),) + (None,) * 11


# --- any min/max observer (per-tensor or per-channel) + qparams + fake quant ----------------

@functools.lru_cache(maxsize=None)
def _ext_has_cuda_observe() -> bool:
    """Whether the loaded extension registers a CUDA kernel for fq_observe_forward (builds
    before it had the CPU one only)."""
    return _ext_has("fq_observe_forward") and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{_extension.OPS_NAMESPACE}::fq_observe_forward", "CUDA")


def _observe_impl(x: Tensor):
    """fq_observe_forward for x's device. The extension implements it on CPU (one call) and on
    CUDA (one kernel launch: observer step, qparams and fake quant; "auto" prefers it there,
    see _backend._AUTO_ORDER_BY_OP); the Triton backend runs the reference observer step
    (device-side torch ops, no host read) and then its fq_forward kernel."""
    names = ["reference"]
    if x.dtype != torch.float64:  # Triton kernels cover fp32/fp16/bf16
        names.append("triton")
    if x.device.type == "cpu" and _ext_has("fq_observe_forward"):
        names.append("cpu")
    if x.device.type == "cuda" and _ext_has_cuda_observe():
        names.append("cuda")
    backend = _backend.select(x.device, supported=tuple(names), op="fake_quant.fq_observe_forward",
                              numel=x.numel())
    if backend in ("cpu", "cuda"):
        return _extension.ops().fq_observe_forward
    if backend == "triton":
        from . import triton_launch
        return functools.partial(reference.fq_observe_forward,
                                 fq_forward_impl=triton_launch.fq_forward)
    return reference.fq_observe_forward


# --- eager training calls with their autograd in C++ --------------------------------------

def _no_python_modes() -> bool:
    """Plain eager execution: no tracing and no Python dispatch/function mode (FakeTensor,
    FlopCounter, ...). The extension's C++ autograd ops have no fake kernels, so compile,
    export and such modes go through the torch.library custom ops instead."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()  # (ONNX export)
                or torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.Python)
                or torch._C._is_torch_function_mode_enabled())


def observe_train_op(x: Tensor):
    """acq_kernels_C::fq_observe_train (fake_quant_observe + the clipped STE's autograd in one
    C++ call, the module's eager hot path) when the extension runs this call, else None."""
    if not _no_python_modes() or _observe_impl(x) is not _extension_op("fq_observe_forward"):
        return None
    return _extension_op("fq_observe_train")


def fixed_train_op(x: Tensor):
    """acq_kernels_C::fq_forward_train (fake_quant with its autograd in C++) when the
    extension runs this call, else None."""
    if not _no_python_modes() or _impl(x, "fq_forward") is not _extension_op("fq_forward"):
        return None
    return _extension_op("fq_forward_train")


# the eager C++ autograd ops and the backend kernel each one runs
_TRAIN_OPS = {"fq_observe_train": "fq_observe_forward", "fq_forward_train": "fq_forward"}


@functools.lru_cache(maxsize=None)
def _extension_op(name: str):
    """The extension's op `name`, or None where the extension lacks it (a train op counts as
    present only with its forward kernel)."""
    if not _ext_has(name) or not _ext_has(_TRAIN_OPS.get(name, name)):
        return None
    return getattr(_extension.ops(), name)


@_custom_op("acq_kernels::fake_quant_observe",
            mutates_args=("min_val", "max_val", "scale", "zero_point"))
def fake_quant_observe(x: Tensor, min_val: Tensor, max_val: Tensor, scale: Tensor,
                       zero_point: Tensor, axis: int, averaging_constant: float,
                       moving_average: bool, quant_min: int, quant_max: int, symmetric: bool,
                       symmetric_zero_point: int, eps: float, quantize: bool,
                       save_mask: bool, byte_mask: bool = False,
                       channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """(out, mask); the observer state and qparams are updated in place (see
    reference.fq_observe_forward). out and mask are empty when not quantize, channels-last
    when channels_last (see conv_weight_channels_last)."""
    x = _laid_out(x, channels_last and quantize)
    out, mask = _observe_impl(x)(x, min_val, max_val, scale, zero_point, axis,
                                 averaging_constant, moving_average, quant_min, quant_max,
                                 symmetric, symmetric_zero_point, eps, quantize, save_mask)
    return out, _mask_out(out, mask, quantize and save_mask and byte_mask)


@fake_quant_observe.register_fake
def _(x, min_val, max_val, scale, zero_point, axis, averaging_constant, moving_average,
      quant_min, quant_max, symmetric, symmetric_zero_point, eps, quantize, save_mask,
      byte_mask=False, channels_last=False):
    if not quantize:
        return x.new_empty(0), x.new_empty(0, dtype=torch.uint8)
    x = _fake_out(x, channels_last)
    return torch.empty_like(x), _fake_mask(x, save_mask, byte_mask)


class ObserveFakeQuant(torch.autograd.Function):
    """Autograd of fake_quant_observe (mutating ops take no torch.library autograd formula):
    the clipped STE's mask, or identity. Called only with quantize=True."""

    @staticmethod
    def forward(ctx, x, min_val, max_val, scale, zero_point, axis, averaging_constant,
                moving_average, quant_min, quant_max, symmetric, symmetric_zero_point, eps,
                save_mask):
        out, mask = fake_quant_observe(x, min_val, max_val, scale, zero_point, axis,
                                       averaging_constant, moving_average, quant_min,
                                       quant_max, symmetric, symmetric_zero_point, eps, True,
                                       save_mask, byte_mask(x, save_mask),
                                       conv_weight_channels_last(x, axis))
        _mask_setup(ctx, out, mask, save_mask)
        ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, grad_out, grad_mask):
        return (_mask_grad(ctx, grad_out),) + (None,) * 13
