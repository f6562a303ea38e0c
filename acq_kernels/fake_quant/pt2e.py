"""torchao PT2E QAT on acq_kernels' fake quantizers.

FakeQuant / LearnableFakeQuant (or their ``with_args``) go straight into a torchao
``QuantizationSpec`` as ``observer_or_fake_quant_ctr`` (see _ao_compat for what makes torchao
accept them). :func:`with_acq_fake_quant` rebuilds a whole quantizer config -- e.g.
``get_symmetric_quantization_config(is_qat=True)`` of XNNPACKQuantizer or
``get_default_x86_inductor_quantization_config(is_qat=True)`` -- on FakeQuant.
"""
from __future__ import annotations

import dataclasses

from .modules import FakeQuant

__all__ = ["with_acq_fake_quant"]


def _swap(spec, fake_quant):
    """spec with a torchao FakeQuantize-family constructor replaced by `fake_quant` taking the
    same observer and arguments; any other spec (observer, fixed or derived qparams) as is."""
    from torchao.quantization.pt2e import FakeQuantize as TorchaoFakeQuantize
    from torchao.quantization.pt2e import MovingAverageMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    if not isinstance(spec, QuantizationSpec):
        return spec
    ctr = spec.observer_or_fake_quant_ctr
    cls, kwargs = (ctr.p.func, dict(ctr.p.keywords)) if hasattr(ctr, "p") else (ctr, {})
    if not (isinstance(cls, type) and issubclass(cls, TorchaoFakeQuantize)):
        return spec
    kwargs.setdefault("observer", MovingAverageMinMaxObserver)  # torchao FakeQuantize's default
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=fake_quant.with_args(**kwargs))


def with_acq_fake_quant(config, fake_quant=FakeQuant):
    """A torchao QuantizationConfig whose fake quantizers (torchao's FakeQuantize and
    FusedMovingAvgObsFakeQuantize) are `fake_quant` with the same observers and arguments."""
    # Quantizers define their own QuantizationConfig dataclasses (XNNPACK's, X86's): duck-typed.
    fields = ("input_activation", "output_activation", "weight", "bias")
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)
            and all(hasattr(config, f) for f in fields)):
        raise TypeError(f"with_acq_fake_quant: config must be a torchao QuantizationConfig "
                        f"(a dataclass with fields {fields}), got {type(config).__name__}")
    if not callable(getattr(fake_quant, "with_args", None)):
        raise TypeError(f"with_acq_fake_quant: fake_quant must be a fake-quant class with "
                        f"with_args (e.g. acq_kernels.FakeQuant), got {fake_quant!r}")
    return dataclasses.replace(config, **{f: _swap(getattr(config, f), fake_quant)
                                          for f in fields})
