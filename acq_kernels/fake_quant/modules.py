"""Fake-quantization modules: drop-in replacements for torch.ao's FakeQuantize and
_LearnableFakeQuantize that run on acq_kernels' fused, backend-dispatched ops.

Both subclass the torch.ao classes, so constructors, buffers (names, dtypes, shapes), state
dicts, QConfig/with_args use, prepare_qat/convert and calculate_qparams are torch's own; only
forward changes. On CPU fp32 with torch's default observers the results are bitwise equal to
torch's modules.
"""
from __future__ import annotations

import torch
from torch.ao.quantization.fake_quantize import FakeQuantize
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torch.ao.quantization.observer import MovingAverageMinMaxObserver

import acq_kernels as _ak  # partially initialised at import time; ops are looked up per call
from .. import _validation as V

__all__ = ["FakeQuant", "LearnableFakeQuant"]

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


def _flag(buf: torch.Tensor, mirror: bool) -> bool:
    """An enabled flag: the buffer itself on CPU (a cheap read that also sees direct writes),
    the Python mirror elsewhere (reading a CUDA buffer would sync the host every forward)."""
    if buf.device.type == "cpu":
        return bool(buf[0])
    return mirror


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


class FakeQuant(FakeQuantize):
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

    With the observer enabled and a per-tensor MovingAverageMinMaxObserver (affine or
    symmetric, no reduce_range, static) the observer update, qparams and fake quant are one
    fused op that updates the observer's min_val/max_val and the scale/zero_point buffers in
    place without a host sync. Any other observer runs exactly as in FakeQuantize.forward,
    followed by acq_kernels.fake_quantize. "minmax" mode is one fused fake_quantize_minmax call,
    except where the fused zero-point rule is not the observer's (symmetric quint8 without a
    customised range: torch picks 128), where the observer's own formula is applied to the
    batch range. per_channel_affine_float_qparams (float zero points, embeddings) quantizes
    with torch's op, since the kernels take integer zero points.

    Enabled flags: use enable_*/disable_* (or torch.ao.quantization.enable_observer etc.) or
    load_state_dict. On CUDA the forward reads Python mirrors of the flags kept in step by
    those, so writing the buffers directly is only seen on CPU.
    """

    def __init__(self, observer=MovingAverageMinMaxObserver, quant_min=None, quant_max=None,
                 is_dynamic=False, *, ste: str = "clipped", range_mode: str = "observer",
                 **observer_kwargs):
        # Validate our options before torch builds anything.
        ste = _check_choice("ste", ste, STE_MODES)
        range_mode = _check_choice("range_mode", range_mode, RANGE_MODES)
        super().__init__(observer, quant_min, quant_max, is_dynamic, **observer_kwargs)
        if self.qscheme == torch.per_channel_affine_float_qparams and ste != "clipped":
            raise ValueError("ste must be 'clipped' for qscheme per_channel_affine_float_qparams "
                             f"(float zero points run on torch's op), got {ste!r}")
        self.ste = ste
        self.range_mode = range_mode
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self.observer_enabled[0])
        self._refresh_eps()
        self.register_load_state_dict_post_hook(FakeQuant._after_load)

    # ----------------------------------------------------------------- flags and state
    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._fake_quant_on = bool(enabled)

    def enable_observer(self, enabled: bool = True) -> None:
        super().enable_observer(enabled)
        self._observer_on = bool(enabled)

    def _refresh_eps(self) -> None:
        # The fused op takes eps as a number; the observer keeps it as a (CPU at build) buffer.
        eps = getattr(self.activation_post_process, "eps", None)
        self._eps = float(eps) if eps is not None else torch.finfo(torch.float32).eps

    @staticmethod
    def _after_load(module: "FakeQuant", incompatible_keys) -> None:
        # Runs after the children (the observer's eps) are loaded too; one-off host reads.
        module._fake_quant_on = bool(module.fake_quant_enabled[0])
        module._observer_on = bool(module.observer_enabled[0])
        module._refresh_eps()

    # ----------------------------------------------------------------- qparams
    @property
    def _axis(self):
        return self.ch_axis if self.is_per_channel else None

    def _fused_qparams_ok(self) -> bool:
        """Whether the fused ops' qparams formula is the observer's for this scheme."""
        obs = self.activation_post_process
        if self.qscheme in _SYMMETRIC:
            return _symmetric_zero_point(obs) == _fused_symmetric_zero_point(
                obs.quant_min, obs.quant_max)
        return self.qscheme in (torch.per_tensor_affine, torch.per_channel_affine)

    def _fused_moving_average_ok(self) -> bool:
        """Whether the fused op reproduces the observer exactly for this configuration."""
        obs = self.activation_post_process
        if type(obs) is not MovingAverageMinMaxObserver:  # subclasses may change forward
            return False
        if obs.reduce_range or obs.is_dynamic or obs.min_val.dtype != torch.float32:
            return False
        return self.qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric) \
            and self._fused_qparams_ok()

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
        if self.range_mode == "minmax":
            # The per-step range lives in the buffers; the observer never sees it.
            return self.scale.detach().clone(), self.zero_point.detach().clone()
        return self.activation_post_process.calculate_qparams()

    def _store_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        # As FakeQuantize.forward: per-channel buffers start with one element and grow.
        scale = scale.to(self.scale.device)
        zero_point = zero_point.to(self.zero_point.device)
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    # ----------------------------------------------------------------- forward
    def forward(self, X):
        # Checked first: torch's observers would update their state before our op rejects X.
        V.check_float_tensor("FakeQuant", "x", X)
        observe = _flag(self.observer_enabled, self._observer_on)
        quantize = _flag(self.fake_quant_enabled, self._fake_quant_on)
        obs = self.activation_post_process
        qmin, qmax = obs.quant_min, obs.quant_max

        if observe and self.range_mode == "minmax":
            if quantize and self._fused_qparams_ok():
                out, scale, zero_point = _ak.fake_quantize_minmax(
                    X, qmin, qmax, axis=self._axis, symmetric=self.qscheme in _SYMMETRIC,
                    eps=self._eps, ste=self.ste)
                with torch.no_grad():
                    self._store_qparams(scale, zero_point)
                return out
            # Only the range is needed, or the fused op's qparams rule is not the observer's:
            # this batch's range through the observer's own formula (same values where both apply).
            with torch.no_grad():
                self._store_qparams(*self._batch_qparams(X.detach()))
            observe = False  # the buffers now hold this step's qparams

        # numel() == 0 goes through the observer, which leaves its range untouched.
        if observe and X.numel() > 0 and self._fused_moving_average_ok():
            src = X if quantize else X.detach()
            out = _ak.fake_quantize_moving_average(
                src, obs.min_val, obs.max_val, self.scale, self.zero_point, qmin, qmax,
                averaging_constant=obs.averaging_constant,
                symmetric=self.qscheme == torch.per_tensor_symmetric,
                eps=self._eps, observe=True, ste=self.ste)
            return out if quantize else X

        if observe:
            obs(X.detach())
            with torch.no_grad():
                self._store_qparams(*obs.calculate_qparams())
        if quantize:
            if self.qscheme == torch.per_channel_affine_float_qparams:
                # Float zero points (embeddings) add before rounding; our kernels take integer
                # zero points, so this scheme stays on torch's op (clipped STE only).
                return torch.fake_quantize_per_channel_affine(X, self.scale, self.zero_point,
                                                              self.ch_axis, qmin, qmax)
            X = _ak.fake_quantize(X, self.scale, self.zero_point, qmin, qmax,
                                  axis=self._axis, ste=self.ste)
        return X

    def extra_repr(self):
        return (f"{super().extra_repr()}, ste={self.ste!r}, range_mode={self.range_mode!r}, "
                f"backend={_ak.get_backend()!r}")


class LearnableFakeQuant(_LearnableFakeQuantize):
    r"""LSQ fake quantization (learnable scale and zero point) on acq_kernels' kernels.

    Mirrors torch.ao.quantization._learnable_fake_quantize._LearnableFakeQuantize: the same
    constructor (observer, quant_min, quant_max, scale, zero_point, channel_len,
    use_grad_scaling, observer kwargs), scale/zero_point as nn.Parameters, the
    fake_quant_enabled/static_enabled/learning_enabled/eps buffers and the
    enable_param_learning/enable_static_estimate/enable_static_observation switches. With
    use_grad_scaling the scale/zero-point gradients are multiplied by
    1/sqrt(numel * quant_max) (LSQ's g). Forward runs acq_kernels.fake_quantize_learnable.

    As FakeQuant, the forward reads CPU flag buffers directly and Python mirrors on CUDA
    (kept in step by the toggle_* methods and load_state_dict).
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
        module._fake_quant_on = bool(module.fake_quant_enabled[0])
        module._static_on = bool(module.static_enabled[0])

    def toggle_observer_update(self, enabled=True):
        super().toggle_observer_update(enabled)
        self._static_on = bool(enabled)
        return self

    def toggle_fake_quant(self, enabled=True):
        super().toggle_fake_quant(enabled)
        self._fake_quant_on = bool(enabled)
        return self

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.toggle_fake_quant(enabled)

    def forward(self, X):
        V.check_float_tensor("LearnableFakeQuant", "x", X)  # before the observer sees X
        if _flag(self.static_enabled, self._static_on):
            self.activation_post_process(X.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
            self.scale.data.copy_(scale.to(self.scale.device))
            self.zero_point.data.copy_(zero_point.to(self.zero_point.device))
        else:
            # A tensor bound: same values as torch's clamp_(min=eps.item()), no host sync.
            torch.clamp_min_(self.scale.data, self.eps)

        if _flag(self.fake_quant_enabled, self._fake_quant_on):
            if self.qscheme in _SYMMETRIC:
                self.zero_point.data.zero_()
            grad_factor = (1.0 / (X.numel() * self.quant_max) ** 0.5
                           if self.use_grad_scaling else 1.0)
            axis = self.ch_axis if self.qscheme in _PER_CHANNEL else None
            X = _ak.fake_quantize_learnable(X, self.scale, self.zero_point, self.quant_min,
                                            self.quant_max, axis=axis, grad_factor=grad_factor)
        return X

    def extra_repr(self):
        return (f"fake_quant_enabled={self.fake_quant_enabled}, "
                f"static_enabled={self.static_enabled}, learning_enabled={self.learning_enabled}, "
                f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
                f"ch_axis={self.ch_axis}, use_grad_scaling={self.use_grad_scaling}, "
                f"backend={_ak.get_backend()!r}")
