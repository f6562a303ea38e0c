"""Fake-quantization modules: drop-in replacements for torch.ao's FakeQuantize and
_LearnableFakeQuantize that run on acq_kernels' fused, backend-dispatched ops.

Both subclass the torch.ao classes, so constructors, buffers (names, dtypes, shapes), state
dicts, QConfig/with_args use, prepare_qat/convert and calculate_qparams are torch's own; only
forward changes. On CPU fp32 with torch's default observers the results are bitwise equal to
torch's modules.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# The base classes and observers: torch.ao's, or torchao's where torch.ao.quantization is gone.
from ._ao_compat import (FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver,
                         MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver,
                         TorchaoCompatible, _LearnableFakeQuantize)

import acq_kernels as _ak  # partially initialised at import time; ops are looked up per call
from .. import _validation as V
from . import ops as _ops
from .functional import _dense

__all__ = ["FakeQuant", "LearnableFakeQuant"]


def _register_traceable_observer_hooks() -> None:
    """torch.ao's eager prepare/prepare_qat call the fake-quant module from forward hooks
    defined in torch.ao.quantization.quantize, a file dynamo skips (one graph break per
    hook). Registering these identical bodies as their in-graph substitutes lets
    torch.compile / torch._dynamo trace such a model whole; eager behaviour is unchanged."""
    import importlib

    try:
        quantize = importlib.import_module("torch.ao.quantization.quantize")
    except ImportError:  # torch without torch.ao.quantization: no eager prepare_qat hooks
        return
    substitute = getattr(getattr(torch, "compiler", None), "substitute_in_graph", None)
    pairs = (("_observer_forward_hook", lambda self, input, output:
              self.activation_post_process(output)),
             ("_observer_forward_pre_hook", lambda self, input:
              self.activation_post_process(input[0])))
    for name, body in pairs:
        original = getattr(quantize, name, None)
        if substitute is None or original is None:
            continue
        try:
            substitute(original)(body)
        except (TypeError, ValueError, RuntimeError):  # already registered, or an older torch
            pass


_register_traceable_observer_hooks()

STE_MODES = ("clipped", "pure")
RANGE_MODES = ("observer", "minmax")

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def _check_choice(name: str, value, choices: tuple) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_quant_range(quant_min, quant_max, observer, observer_kwargs: dict) -> None:
    """The range checks torch.ao's FakeQuantize makes with AssertionError, as a TypeError /
    ValueError naming the argument, before anything is built. Without both bounds torch takes
    the range from the dtype and so do we."""
    if quant_min is None or quant_max is None:
        return
    qmin = V.check_int("FakeQuant", "quant_min", quant_min)
    qmax = V.check_int("FakeQuant", "quant_max", quant_max)
    if qmin > qmax:
        raise ValueError(f"FakeQuant: quant_min ({qmin}) must be <= quant_max ({qmax})")
    dtype = observer_kwargs.get("dtype", torch.quint8)
    dtype = getattr(getattr(observer, "p", None), "keywords", {}).get("dtype", dtype)  # with_args
    info = torch.iinfo(dtype)
    if qmin < info.min or qmax > info.max:
        raise ValueError(f"FakeQuant: quant_min/quant_max ({qmin}, {qmax}) must lie in {dtype}'s "
                         f"range [{info.min}, {info.max}]")


# Observers whose forward the fused op reproduces exactly -> whether it is a moving average.
# Exact types only: a subclass may change forward.
_FUSABLE_OBSERVERS = {
    MovingAverageMinMaxObserver: True,
    MovingAveragePerChannelMinMaxObserver: True,
    MinMaxObserver: False,
    PerChannelMinMaxObserver: False,
}
_FUSABLE_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric,
                     torch.per_channel_affine, torch.per_channel_symmetric)


def _fusable_observer(obs, qscheme, ch_axis):
    """(fusable, moving_average): whether fake_quant_observe reproduces obs's forward."""
    moving = _FUSABLE_OBSERVERS.get(type(obs))
    fusable = (moving is not None and not obs.is_dynamic and obs.min_val.dtype == torch.float32
               and qscheme in _FUSABLE_QSCHEMES
               and getattr(obs, "ch_axis", ch_axis) == ch_axis)
    return fusable, bool(moving)


def _observer_eps(obs) -> float:
    # The fused op takes eps as a number; the observer keeps it as a (CPU at build) buffer.
    eps = getattr(obs, "eps", None)
    return float(eps) if eps is not None else torch.finfo(torch.float32).eps


def _observe_args(obs, channels: int, scale, zero_point, p) -> tuple:
    """fake_quant_observe's state and constant arguments; per-channel state takes the channel
    count on the first call, per-tensor (0-d) state is passed as [1] views."""
    if p.axis >= 0:
        if obs.min_val.numel() != channels or obs.max_val.numel() != channels:
            _set_buffer(obs, "min_val", (channels,), float("inf"))
            _set_buffer(obs, "max_val", (channels,), float("-inf"))
    return (obs.min_val.view(channels), obs.max_val.view(channels), scale, zero_point, p.axis,
            p.averaging_constant, p.moving_average, p.quant_min, p.quant_max, p.symmetric,
            p.symmetric_zero_point, p.eps)


class _Plan(NamedTuple):
    """What FakeQuant.forward does, resolved once per configuration (not per call)."""
    observe_fused: bool        # observer step + qparams + fake quant in fake_quant_observe
    minmax_fused: bool         # range_mode "minmax" in one fake_quant_minmax call
    moving_average: bool
    averaging_constant: float
    axis: int                  # channel axis, -1 per-tensor
    quant_min: int
    quant_max: int
    symmetric: bool
    symmetric_zero_point: int  # the observer's zero point for a symmetric scheme
    eps: float
    clipped: bool              # ste == "clipped"


def _make_plan(obs, qscheme, ch_axis: int, per_channel: bool, minmax_fused: bool,
               clipped: bool) -> "_Plan":
    fusable, moving = _fusable_observer(obs, qscheme, ch_axis)
    return _Plan(observe_fused=fusable, minmax_fused=minmax_fused, moving_average=moving,
                 averaging_constant=float(getattr(obs, "averaging_constant", 1.0)),
                 axis=ch_axis if per_channel else -1, quant_min=obs.quant_min,
                 quant_max=obs.quant_max, symmetric=qscheme in _SYMMETRIC,
                 symmetric_zero_point=_symmetric_zero_point(obs), eps=_observer_eps(obs),
                 clipped=clipped)


def _set_buffer(owner: torch.nn.Module, name: str, shape, fill) -> None:
    """Resize buffer `name` of `owner` to `shape` filled with `fill` (per-channel state starts
    with one or no element and takes the channel count on the first call). In place in eager
    mode (as torch's observers, keeping aliases valid); a new tensor under torch.compile, which
    traces a buffer assignment but not resize_."""
    buf = getattr(owner, name)
    if torch.compiler.is_compiling():
        setattr(owner, name, torch.full(shape, fill, dtype=buf.dtype, device=buf.device))
    else:
        with torch.no_grad():
            buf.resize_(shape).fill_(fill)


def _symmetric_zero_point(obs) -> int:
    """The zero point torch.ao's _calculate_qparams picks for a symmetric scheme."""
    if obs.dtype in (torch.quint8, torch.uint8):
        return (obs.quant_min + obs.quant_max) // 2 if obs.has_customized_qrange else 128
    if obs.dtype == torch.uint16:
        return 2 ** 15
    return 0


def _fused_symmetric_zero_point(quant_min: int, quant_max: int) -> int:
    """The zero point the fused ops (minmax, moving average) use for symmetric ranges: 0 on a
    signed range, else the down-rounded midpoint (torch.ao's rule for a customised range)."""
    return 0 if quant_min < 0 else (quant_min + quant_max) // 2


class FakeQuant(TorchaoCompatible, FakeQuantize):
    r"""torch.ao.quantization.FakeQuantize on acq_kernels' fused kernels.

    Takes FakeQuantize's arguments (observer, quant_min, quant_max, is_dynamic, observer
    kwargs such as dtype, qscheme, ch_axis, averaging_constant, reduce_range, eps) plus two
    keyword-only options:

    * ``ste``: ``"clipped"`` (PyTorch's STE: zero gradient outside the quantization range) or
      ``"pure"`` (GDFQ's: the gradient passes through unchanged everywhere).
    * ``range_mode``: ``"observer"`` (the observer tracks the range, as in torch) or
      ``"minmax"`` (GDFQ: the range is the current input's min/max, recomputed every forward
      with no running statistics, per channel for per-channel schemes). In "minmax" mode the
      scale/zero_point buffers hold the last step's qparams and calculate_qparams returns them,
      so convert() uses the range training ended with; disabling the observer freezes them.

    With the observer enabled and one of torch.ao's MinMaxObserver,
    MovingAverageMinMaxObserver, PerChannelMinMaxObserver or
    MovingAveragePerChannelMinMaxObserver (affine or symmetric, any range and reduce_range,
    static), the observer update, qparams and fake quant are one op (acq_kernels::
    fake_quant_observe) that updates the observer's min_val/max_val and the scale/zero_point
    buffers in place with no host read. Other observers (subclasses, HistogramObserver,
    float64 state, dynamic) run exactly as in FakeQuantize.forward, followed by the fake-quant
    op. "minmax" mode is one fused fake_quantize_minmax call where its zero-point rule is the
    observer's (else the observer's formula is applied to the batch range).
    per_channel_affine_float_qparams (float zero points, embeddings) quantizes with torch's op.

    Enabled flags are Python state (``observer_on`` / ``fake_quant_on``, set by
    enable_*/disable_*, torch.ao.quantization.enable_observer etc. and load_state_dict) and
    mirrored into torch.ao's buffers for state dicts; writing the buffers directly is not seen
    by forward. Under torch.compile a flag change recompiles. The plan of the forward (which
    fused op, its constants) is resolved when the module is built, a flag changes, a state
    dict is loaded or ``ste`` / ``range_mode`` are set; call ``refresh()`` after changing the
    observer's attributes (averaging_constant, eps, quant range) by hand.
    """

    def __init__(self, observer=MovingAverageMinMaxObserver, quant_min=None, quant_max=None,
                 is_dynamic=False, *, ste: str = "clipped", range_mode: str = "observer",
                 **observer_kwargs):
        # Validate our options before torch builds anything.
        ste = _check_choice("ste", ste, STE_MODES)
        range_mode = _check_choice("range_mode", range_mode, RANGE_MODES)
        _check_quant_range(quant_min, quant_max, observer, observer_kwargs)
        super().__init__(observer, quant_min, quant_max, is_dynamic, **observer_kwargs)
        if self.qscheme == torch.per_channel_affine_float_qparams and ste != "clipped":
            raise ValueError("ste must be 'clipped' for qscheme per_channel_affine_float_qparams "
                             f"(float zero points run on torch's op), got {ste!r}")
        self._ste = ste
        self._range_mode = range_mode
        self.observer_on = bool(self.observer_enabled[0])
        self.fake_quant_on = bool(self.fake_quant_enabled[0])
        self.refresh()
        self.register_load_state_dict_post_hook(FakeQuant._after_load)

    # ----------------------------------------------------------------- options and flags
    @property
    def ste(self) -> str:
        return self._ste

    @ste.setter
    def ste(self, value: str) -> None:
        self._ste = _check_choice("ste", value, STE_MODES)
        self.refresh()

    @property
    def range_mode(self) -> str:
        return self._range_mode

    @range_mode.setter
    def range_mode(self, value: str) -> None:
        self._range_mode = _check_choice("range_mode", value, RANGE_MODES)
        self.refresh()

    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self.fake_quant_on = bool(enabled)

    def enable_observer(self, enabled: bool = True) -> None:
        super().enable_observer(enabled)
        self.observer_on = bool(enabled)

    @staticmethod
    def _after_load(module: "FakeQuant", incompatible_keys) -> None:
        # Runs after the children (the observer's eps) are loaded too; one-off host reads.
        module.fake_quant_on = bool(module.fake_quant_enabled[0])
        module.observer_on = bool(module.observer_enabled[0])
        module.refresh()

    def refresh(self) -> None:
        """Re-resolve the forward's plan from the observer's current configuration."""
        self._plan = _make_plan(self.activation_post_process, self.qscheme, self.ch_axis,
                                self.is_per_channel, self._fused_qparams_ok(),
                                self._ste == "clipped")

    # ----------------------------------------------------------------- qparams
    @property
    def _axis(self):
        return self.ch_axis if self.is_per_channel else None

    def _fused_qparams_ok(self) -> bool:
        """Whether fake_quantize_minmax's qparams formula is the observer's for this scheme."""
        obs = self.activation_post_process
        if self.qscheme in _SYMMETRIC:
            return _symmetric_zero_point(obs) == _fused_symmetric_zero_point(
                obs.quant_min, obs.quant_max)
        return self.qscheme in (torch.per_tensor_affine, torch.per_channel_affine)

    def _batch_qparams(self, x: torch.Tensor):
        """qparams of x's own min/max by the observer's formula (its state is not touched)."""
        obs = self.activation_post_process
        if x.numel() == 0:  # no range yet: an unused observer's 1.0 / 0, one per channel
            n = x.size(self.ch_axis) if self.is_per_channel else 1
            return (torch.ones(n, device=x.device),
                    torch.zeros(n, dtype=torch.int32, device=x.device))
        x = x.float()
        if self.is_per_channel:
            flat = x.movedim(self.ch_axis, 0).reshape(x.size(self.ch_axis), -1)
            mn, mx = torch.aminmax(flat, dim=1)
        else:
            mn, mx = torch.aminmax(x)
        return obs._calculate_qparams(mn, mx)

    def calculate_qparams(self):
        if self._range_mode == "minmax":
            # The per-step range lives in the buffers; the observer never sees it.
            return self.scale.detach().clone(), self.zero_point.detach().clone()
        return self.activation_post_process.calculate_qparams()

    def _store_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        # As FakeQuantize.forward: per-channel buffers start with one element and grow.
        scale = scale.to(self.scale.device)
        zero_point = zero_point.to(self.zero_point.device)
        if self.scale.shape != scale.shape:
            _set_buffer(self, "scale", scale.shape, 1.0)
            _set_buffer(self, "zero_point", zero_point.shape, 0)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    # ----------------------------------------------------------------- forward
    def _observe_fused(self, X: torch.Tensor, quantize: bool) -> torch.Tensor:
        p = self._plan
        channels = 1 if p.axis < 0 else X.size(p.axis)
        if self.scale.numel() != channels:  # per-channel qparams grow on the first call
            _set_buffer(self, "scale", (channels,), 1.0)
            _set_buffer(self, "zero_point", (channels,), 0)
        args = _observe_args(self.activation_post_process, channels, self.scale,
                             self.zero_point, p)
        x = _dense(X)
        if not quantize:
            _ops.fake_quant_observe(x.detach(), *args, False, False)
            return X
        train_op = _ops.observe_train_op(x)
        if train_op is not None:  # eager: one C++ call, autograd included
            return train_op(x, *args, p.clipped)
        save_mask = p.clipped and x.requires_grad and torch.is_grad_enabled()
        return _ops.ObserveFakeQuant.apply(x, *args, save_mask)[0]

    def _quantize(self, X: torch.Tensor) -> torch.Tensor:
        p = self._plan
        if self.qscheme == torch.per_channel_affine_float_qparams:
            # Float zero points (embeddings) add before rounding; our kernels take integer
            # zero points, so this scheme stays on torch's op (clipped STE only).
            return torch.fake_quantize_per_channel_affine(X, self.scale, self.zero_point,
                                                          self.ch_axis, p.quant_min,
                                                          p.quant_max)
        channels = 1 if p.axis < 0 else X.size(p.axis)
        if self.scale.numel() != channels or self.zero_point.numel() != channels:
            raise ValueError(f"FakeQuant: scale/zero_point hold {self.scale.numel()} values but "
                             f"x has {channels} channels along ch_axis {p.axis}: enable the "
                             "observer for a step or load a state dict first")
        x = _dense(X)
        train_op = _ops.fixed_train_op(x)
        if train_op is not None:  # eager: one C++ call, autograd included
            return train_op(x, self.scale, self.zero_point, p.quant_min, p.quant_max, p.axis,
                            p.clipped)
        save_mask = p.clipped and x.requires_grad and torch.is_grad_enabled()
        return _ops.fake_quant(x, self.scale, self.zero_point, p.quant_min, p.quant_max,
                               p.axis, save_mask, _ops.byte_mask(x, save_mask),
                               _ops.conv_weight_channels_last(x, p.axis))[0]

    def forward(self, X):
        # Checked first: torch's observers would update their state before our op rejects X.
        V.check_float_tensor("FakeQuant", "x", X)
        p = self._plan
        if p.axis >= X.dim():
            raise ValueError(f"FakeQuant: x must have a dimension ch_axis={p.axis} for its "
                             f"per-channel scheme, got shape {tuple(X.shape)}")
        observe, quantize = self.observer_on, self.fake_quant_on
        if observe and self._range_mode == "minmax":
            if quantize and p.minmax_fused:
                out, scale, zero_point = _ak.fake_quantize_minmax(
                    X, p.quant_min, p.quant_max, axis=self._axis, symmetric=p.symmetric,
                    eps=p.eps, ste=self._ste)
                self._store_qparams(scale, zero_point)
                return out
            # Only the range is needed, or the fused op's qparams rule is not the observer's:
            # this batch's range through the observer's own formula (same values where both apply).
            with torch.no_grad():
                self._store_qparams(*self._batch_qparams(X.detach()))
            observe = False  # the buffers now hold this step's qparams

        # numel() == 0 goes through the observer, which leaves its range untouched.
        if observe and p.observe_fused and X.numel() > 0:
            return self._observe_fused(X, quantize)
        if observe:
            obs = self.activation_post_process
            obs(X.detach())
            with torch.no_grad():
                self._store_qparams(*obs.calculate_qparams())
        if quantize:
            X = self._quantize(X)
        return X

    def extra_repr(self):
        return (f"{super().extra_repr()}, ste={self._ste!r}, range_mode={self._range_mode!r}, "
                f"backend={_ak.get_backend()!r}")


def _untracked(param: torch.Tensor) -> torch.Tensor:
    """The parameter to update in place outside autograd. Eager: its .data, as torch's
    _LearnableFakeQuantize does, so a module called twice in one step (PT2E shares one per edge)
    does not invalidate the scale its first call saved for backward. Under torch.compile/export
    the parameter itself (in no_grad), which AOTAutograd functionalises; .data does not trace."""
    return param if torch.compiler.is_compiling() else param.data


class LearnableFakeQuant(TorchaoCompatible, _LearnableFakeQuantize):
    r"""LSQ fake quantization (learnable scale and zero point) on acq_kernels' kernels.

    Mirrors torch.ao.quantization._learnable_fake_quantize._LearnableFakeQuantize: the same
    constructor (observer, quant_min, quant_max, scale, zero_point, channel_len,
    use_grad_scaling, observer kwargs), scale/zero_point as nn.Parameters, the
    fake_quant_enabled/static_enabled/learning_enabled/eps buffers and the
    enable_param_learning/enable_static_estimate/enable_static_observation switches. With
    use_grad_scaling the scale/zero-point gradients are multiplied by
    1/sqrt(numel * quant_max) (LSQ's g). Forward runs acq_kernels.fake_quantize_learnable.

    As FakeQuant, the enabled flags are Python state (``fake_quant_on``, ``static_on``, set by
    the toggle_*/enable_* methods and load_state_dict) mirrored into torch's buffers, so the
    forward reads no tensor: torch.compile traces it without graph breaks (a flag change
    recompiles). With static estimation on, torch.ao's min/max observers (as listed for
    FakeQuant) run as the fused observer op (the same state and qparams); others run as in
    torch.
    """

    def __init__(self, observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                 scale=1.0, zero_point=0.0, channel_len=-1, use_grad_scaling=False,
                 **observer_kwargs):
        for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if quant_min >= quant_max:
            raise ValueError(f"quant_min ({quant_min}) must be less than quant_max ({quant_max})")
        if channel_len != -1 and (isinstance(channel_len, bool) or not isinstance(channel_len, int)
                                  or channel_len <= 0):
            raise ValueError(f"channel_len must be -1 or a positive int, got {channel_len!r}")
        super().__init__(observer, quant_min, quant_max, scale, zero_point, channel_len,
                         use_grad_scaling, **observer_kwargs)
        self._after_load(self, None)
        self.register_load_state_dict_post_hook(LearnableFakeQuant._after_load)

    @staticmethod
    def _after_load(module: "LearnableFakeQuant", incompatible_keys) -> None:
        module.fake_quant_on = bool(module.fake_quant_enabled[0])
        module.static_on = bool(module.static_enabled[0])
        module._axis = module.ch_axis if module.qscheme in _PER_CHANNEL else -1
        module._symmetric = module.qscheme in _SYMMETRIC
        module._plan = _make_plan(module.activation_post_process, module.qscheme,
                                  module.ch_axis, module._axis >= 0, False, True)

    def _static_estimate(self, X: torch.Tensor) -> None:
        """The observer step and its qparams copied into the scale/zero_point parameters."""
        p = self._plan
        if p.observe_fused and X.numel() > 0:
            # the fused observer op (no fake quant), as torch's observer + calculate_qparams
            channels = 1 if p.axis < 0 else X.size(p.axis)
            scale = X.new_empty(channels, dtype=torch.float32)
            zero_point = X.new_empty(channels, dtype=torch.int32)
            args = _observe_args(self.activation_post_process, channels, scale, zero_point, p)
            _ops.fake_quant_observe(_dense(X.detach()), *args, False, False)
        else:
            self.activation_post_process(X.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
        with torch.no_grad():
            _untracked(self.scale).copy_(scale.to(self.scale.device))
            _untracked(self.zero_point).copy_(zero_point.to(self.zero_point.device))

    def toggle_observer_update(self, enabled=True):
        super().toggle_observer_update(enabled)
        self.static_on = bool(enabled)
        return self

    def toggle_fake_quant(self, enabled=True):
        super().toggle_fake_quant(enabled)
        self.fake_quant_on = bool(enabled)
        return self

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.toggle_fake_quant(enabled)

    def forward(self, X):
        V.check_float_tensor("LearnableFakeQuant", "x", X)  # before the observer sees X
        if self.static_on:
            self._static_estimate(X)
        else:
            # A tensor bound: same values as torch's clamp_(min=eps.item()), no host read.
            with torch.no_grad():
                _untracked(self.scale).clamp_min_(self.eps)

        if self.fake_quant_on:
            if self._symmetric:
                with torch.no_grad():
                    _untracked(self.zero_point).zero_()
            grad_factor = (1.0 / (X.numel() * self.quant_max) ** 0.5
                           if self.use_grad_scaling else 1.0)
            X = _ops.fake_quant_learnable(_dense(X), self.scale, self.zero_point,
                                          self.quant_min, self.quant_max, self._axis,
                                          float(grad_factor))
        return X

    def extra_repr(self):
        return (f"fake_quant_enabled={self.fake_quant_enabled}, "
                f"static_enabled={self.static_enabled}, learning_enabled={self.learning_enabled}, "
                f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
                f"ch_axis={self.ch_axis}, use_grad_scaling={self.use_grad_scaling}, "
                f"backend={_ak.get_backend()!r}")
