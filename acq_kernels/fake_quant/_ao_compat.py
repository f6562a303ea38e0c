"""The quantization classes acq_kernels' modules build on, and their torchao PT2E hookup.

Base classes: torch.ao.quantization's while it exists; torchao.quantization.pt2e's where it is
gone (upstream deprecates it). `SOURCE` says which.

PT2E: torchao's prepare_pt2e / convert_pt2e recognise fake quantizers by isinstance checks
against *torchao's* FakeQuantizeBase (quantization/pt2e/observer.py
`_is_activation_post_process`) and recognise a ``with_args`` constructor only when it is
torchao's PartialWrapper (prepare.py reads ``ctr.__name__`` otherwise). torch.ao-based classes
pass neither: prepare fails on torch.ao's _PartialWrapper and convert leaves the modules in the
graph. :class:`TorchaoCompatible` fixes both on our side: its ``with_args`` returns a
PartialWrapper that also answers ``__name__``, and registers the class as a virtual subclass of
torchao's FakeQuantizeBase (an ABC) -- without importing torchao (5 s), only once it is loaded,
which it is whenever its prepare calls ``with_args``.
"""
from __future__ import annotations

import functools
import sys

try:
    from torch.ao.quantization.fake_quantize import FakeQuantize
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import (MinMaxObserver, MovingAverageMinMaxObserver,
                                                MovingAveragePerChannelMinMaxObserver,
                                                PerChannelMinMaxObserver)
    from torch.ao.quantization.observer import _PartialWrapper as _PartialWrapperBase
    SOURCE = "torch.ao"
except ImportError:  # torch without torch.ao.quantization
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize  # noqa: F401
    from torchao.quantization.pt2e.observer import (  # noqa: F401
        MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver)
    from torchao.quantization.pt2e.observer import PartialWrapper as _PartialWrapperBase
    from ._learnable_base import LearnableFakeQuantizeBase as _LearnableFakeQuantize  # noqa: F401
    SOURCE = "torchao"

__all__ = ["FakeQuantize", "MinMaxObserver", "MovingAverageMinMaxObserver",
           "MovingAveragePerChannelMinMaxObserver", "PerChannelMinMaxObserver", "SOURCE", "TorchaoCompatible",
           "_LearnableFakeQuantize", "register_with_torchao"]

_TORCHAO_FQ = "torchao.quantization.pt2e.fake_quantize"


def register_with_torchao(cls: type) -> None:
    """Make torchao's PT2E treat `cls` as one of its fake quantizers (if torchao is loaded)."""
    mod = sys.modules.get(_TORCHAO_FQ)
    base = getattr(mod, "FakeQuantizeBase", None)
    if base is not None and not issubclass(cls, base):
        base.register(cls)


class _PartialWrapper(_PartialWrapperBase):
    """The base's PartialWrapper, plus the wrapped class's ``__name__`` (torchao's prepare
    checks it for "PerChannel", as it does for its own wrapper's class)."""

    @property
    def __name__(self) -> str:
        return self.p.func.__name__

    def with_args(self, **kwargs):
        return _with_args(self, **kwargs)

    def with_callable_args(self, **kwargs):
        result = _PartialWrapper(self.p)
        result.callable_args = {**self.callable_args, **kwargs}
        return result

    def __call__(self, *args, **kwargs):
        register_with_torchao(_class_of(self))
        return super().__call__(*args, **kwargs)


def _class_of(cls_or_wrapper) -> type:
    while isinstance(cls_or_wrapper, _PartialWrapperBase):  # with_args(...).with_args(...)
        cls_or_wrapper = cls_or_wrapper.p.func
    return cls_or_wrapper


def _with_args(cls_or_self, **kwargs):
    register_with_torchao(_class_of(cls_or_self))
    return _PartialWrapper(functools.partial(cls_or_self, **kwargs))


def _with_callable_args(cls_or_self, **kwargs):
    register_with_torchao(_class_of(cls_or_self))
    return _PartialWrapper(functools.partial(cls_or_self)).with_callable_args(**kwargs)


class TorchaoCompatible:
    """Mixin (first base) for fake-quant modules: with_args/with_callable_args that work in
    torch.ao's QConfig and in torchao's QuantizationSpec alike."""

    with_args = classmethod(_with_args)
    with_callable_args = classmethod(_with_callable_args)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_with_torchao(cls)  # torchao already loaded: recognised from the start
