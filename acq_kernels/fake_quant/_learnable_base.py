"""torch.ao's _LearnableFakeQuantize interface on torchao's FakeQuantizeBase, for a torch
without torch.ao.quantization (see _ao_compat).

torchao's own LearnableFakeQuantize has another interface (lazily created parameters, no
static_enabled), so LearnableFakeQuant keeps torch.ao's: the constructor, the scale /
zero_point parameters, the flag buffers, the toggles and calculate_qparams below follow
torch/ao/quantization/_learnable_fake_quantize.py. Forward is LearnableFakeQuant's.
"""
from __future__ import annotations

import math

import torch
from torch.nn.parameter import Parameter
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase


class LearnableFakeQuantizeBase(FakeQuantizeBase):
    def __init__(self, observer, quant_min=0, quant_max=255, scale=1.0, zero_point=0.0,
                 channel_len=-1, use_grad_scaling=False, **observer_kwargs):
        super().__init__()
        if quant_min >= quant_max:
            raise ValueError("quant_min must be strictly less than quant_max.")
        self.quant_min, self.quant_max = quant_min, quant_max
        observer_kwargs["quant_min"], observer_kwargs["quant_max"] = quant_min, quant_max
        self.use_grad_scaling = use_grad_scaling
        n = 1 if channel_len == -1 else channel_len
        self.scale = Parameter(torch.tensor([scale] * n))
        self.zero_point = Parameter(torch.tensor([zero_point] * n))
        self.activation_post_process = observer(**observer_kwargs)
        info = torch.iinfo(self.activation_post_process.dtype)
        if not info.min <= quant_min <= quant_max <= info.max:
            raise ValueError(f"[quant_min, quant_max] = [{quant_min}, {quant_max}] is out of "
                             f"{self.activation_post_process.dtype}'s bounds")
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self.bitwidth = int(math.log2(quant_max - quant_min + 1))
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))

    def enable_param_learning(self):
        return self.toggle_qparam_learning(True).toggle_fake_quant(True) \
            .toggle_observer_update(False)

    def enable_static_estimate(self):
        self.toggle_qparam_learning(False).toggle_fake_quant(True).toggle_observer_update(True)

    def enable_static_observation(self):
        self.toggle_qparam_learning(False).toggle_fake_quant(False).toggle_observer_update(True)

    def toggle_observer_update(self, enabled=True):
        self.static_enabled[0] = int(enabled)
        return self

    def enable_observer(self, enabled=True):
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled=True):
        self.learning_enabled[0] = int(enabled)
        self.scale.requires_grad = enabled
        self.zero_point.requires_grad = enabled
        return self

    def toggle_fake_quant(self, enabled=True):
        self.fake_quant_enabled[0] = int(enabled)
        return self

    def calculate_qparams(self):
        self.scale.data.clamp_(min=self.eps.item())
        zero_point = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max)
        return self.scale.detach(), zero_point.long()
