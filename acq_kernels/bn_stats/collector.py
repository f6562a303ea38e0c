"""BNStatCollector: the drop-in for GDFQ's per-layer BN forward hooks."""
from __future__ import annotations

import torch
from torch import nn

from .functional import bns_loss

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


class BNStatCollector:
    """Hooks every BatchNorm1d/2d/SyncBatchNorm of `model` (that tracks running statistics)
    with a forward pre-hook that keeps a reference to the layer's input (no copy).

        with BNStatCollector(teacher) as bns:
            logits = teacher(x)
            loss, per_layer = bns.loss()

    Hooks are removed on exit; entering again starts with an empty list. Outside a `with`,
    use attach() / detach() and clear() between forwards. A layer run twice in one forward
    contributes twice (in call order)."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.modules = [m for m in model.modules()
                        if isinstance(m, _BN_TYPES) and m.track_running_stats
                        and m.running_mean is not None]
        self.tensors: list[torch.Tensor] = []
        self.layers: list[nn.Module] = []
        self._handles = []

    def _hook(self, module, args):
        self.tensors.append(args[0])
        self.layers.append(module)

    def attach(self) -> "BNStatCollector":
        if not self._handles:
            self._handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self.tensors = []
        self.layers = []

    def __enter__(self):
        self.clear()
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
        return False

    def loss(self):
        """bns_loss over every hooked call: (loss, per_layer)."""
        if not self.tensors:
            raise ValueError("BNStatCollector.tensors is empty: run a forward inside the "
                             "collector before calling loss()")
        return bns_loss(self.tensors, [m.running_mean for m in self.layers],
                        [m.running_var for m in self.layers])
