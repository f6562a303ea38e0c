"""acqtrain: the ACQ training loop (the `acq` command) - data-free quantization with ACQ (attention correction) on top of GDFQ, using acq_kernels ops.

Entry points: the `acq` command (acqtrain.cli:main; `python -m acqtrain demo`), or in Python:
    import acqtrain
    cfg = acqtrain.make_config(model="digits_net", w_bits=3, a_bits=3)
    trainer = acqtrain.Trainer(cfg, teacher, eval_data=...); trainer.fit()
    acqtrain.export_student(trainer.student, "export_dir", input_shape=(1, 16, 16))  # safetensors, ONNX, torch-only
"""
__version__ = "0.1.0"

from .config import Config, make_config  # noqa: E402,F401
from .errors import AcqError  # noqa: E402,F401
from .export import export_student  # noqa: E402,F401
from .generator import Generator, GeneratorImageNet, build_generator  # noqa: E402,F401
from .models import build_model, load_teacher_weights  # noqa: E402,F401
from .quant import (ActQuant, QuantConv2d, QuantLinear, WeightQuant, quantize_model, set_observing,  # noqa: E402,F401
                    summary)
from .trainer import Trainer, freeze_teacher  # noqa: E402,F401
