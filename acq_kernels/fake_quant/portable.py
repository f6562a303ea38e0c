"""Turn a model's acq_kernels fake-quant modules into torch's own fake-quant ops.

A model converted by :func:`to_torch_fake_quant` holds no acq_kernels module or op, so what
``torch.export`` (or torch.jit, or ONNX through torch's own symbolics) makes of it loads and
runs where acq_kernels is not installed. The conversion freezes each module at its current
qparams (the observers' ranges, LSQ's learned scale and zero point, "minmax" mode's last
range), as ``convert`` would: use it for inference and export, not for further training.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import FakeQuant, LearnableFakeQuant

__all__ = ["TorchFakeQuantize", "to_torch_fake_quant"]

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric,
                torch.per_channel_affine_float_qparams)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


class TorchFakeQuantize(nn.Module):
    """Fixed-qparams fake quantization on torch.fake_quantize_per_{tensor,channel}_affine."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                 quant_max: int, axis: int | None = None):
        super().__init__()
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(-1).clone())
        zp = zero_point.detach().reshape(-1).clone()
        self.register_buffer("zero_point", zp if zp.is_floating_point() else zp.to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point,
                                                         self.quant_min, self.quant_max)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                      self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        return f"quant_min={self.quant_min}, quant_max={self.quant_max}, axis={self.axis}"


def _frozen(module: nn.Module) -> nn.Module:
    """The torch-ops module computing what `module` computes in eval with observers off."""
    if not bool(module.fake_quant_enabled[0]):
        return nn.Identity()
    axis = module.ch_axis if module.qscheme in _PER_CHANNEL else None
    if isinstance(module, LearnableFakeQuant):
        # torch's learnable forward: scale clamped at eps, zero point rounded and clamped.
        scale = torch.clamp_min(module.scale.detach(), module.eps.to(module.scale.device))
        if module.qscheme in _SYMMETRIC:
            zero_point = torch.zeros_like(module.zero_point, dtype=torch.int32)
        else:
            zero_point = torch.clamp(torch.round(module.zero_point.detach()),
                                     module.quant_min, module.quant_max).to(torch.int32)
        return TorchFakeQuantize(scale, zero_point, module.quant_min, module.quant_max, axis)
    obs = module.activation_post_process
    return TorchFakeQuantize(module.scale, module.zero_point, obs.quant_min, obs.quant_max, axis)


def to_torch_fake_quant(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` with every FakeQuant / LearnableFakeQuant submodule replaced by a
    TorchFakeQuantize frozen at its current qparams (nn.Identity where fake quant is disabled).

    Works on eager prepare_qat models (their hooks look the fake-quant child up at call time)
    and torch.ao.nn.qat modules (``weight_fake_quant``). A FakeQuant passed as `model` itself
    is returned converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_torch_fake_quant: model must be a torch.nn.Module, "
                        f"got {type(model).__name__}")
    if isinstance(model, (FakeQuant, LearnableFakeQuant)):
        return _frozen(model)
    if not inplace:
        import copy
        model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, (FakeQuant, LearnableFakeQuant))]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _frozen(m))
    return model
