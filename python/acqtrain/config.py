"""Run configuration: defaults, a JSON/TOML file, then command-line overrides; validated up front."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .data import CHANNELS, DATASETS, NUM_CLASSES
from .errors import AcqError
from .generator import GENERATORS
from .models import INPUT_SHAPE, check_model_name, default_input_shape
from .quant import STE_MODES, WEIGHT_RANGES, check_bits

KD_REDUCTIONS = ("batchmean", "mean")
BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
PRECISIONS = ("fp32", "bf16")  # fp16 would need a GradScaler; bf16 keeps fp32's range


@dataclass
class Config:
    # what to quantize
    model: str = "digits_net"
    dataset: str = "digits"             # evaluation data (and the class count)
    num_classes: int | None = None      # None: the dataset's
    teacher_weights: str | None = None
    data_dir: str | None = None
    image_size: int | None = None       # None: the model's / dataset's (built-ins, CIFAR 32, else 224)
    in_channels: int | None = None      # None: the model's (digits_net 1, else 3)
    # quantization
    w_bits: int = 4
    a_bits: int = 4
    first_last_bits: int | None = None  # None: same as w_bits
    ste: str = "pure"                   # GDFQ passes gradients straight through
    act_momentum: float = 0.9           # EMA momentum of activation ranges (averaging constant 0.1)
    weight_range: str = "zero"          # "zero": torch.ao's rule (range includes 0); "raw": GDFQ's [min, max]
    # schedule (GDFQ protocol)
    epochs: int = 400
    iters_per_epoch: int = 200
    batch_size: int = 200
    warmup_epochs: int = 4
    range_epochs: int = 4
    lr_g: float = 1e-3
    lr_q: float = 1e-4
    q_milestones: list = field(default_factory=lambda: [100, 200, 300])  # absolute epochs; G's LR too
    weight_decay: float = 1e-4
    # generator
    generator: str = "auto"             # "auto": GDFQ's ImageNet generator from 128 px, its CIFAR one below
    latent_dim: int = 100
    gen_width: int = 128
    center_range: float = 0.5           # c ~ U[-r, r]^2 (deep attention centers rarely reach the border)
    # generator losses
    lambda_ce: float = 1.0
    beta_bns: float = 0.1
    lambda_acm: float = 1.0
    lambda_pair: float = 0.1
    lambda_cons: float = 1.0
    pair_margin: float = 1.0
    attention_p: float = 2.0
    attention_layers: list | None = None  # module names for S; None: each stage's output, from the graph
    # student losses
    kd_temperature: float = 20.0
    kd_reduction: str = "batchmean"     # "mean" reproduces GDFQ's code (divides KD by the class count)
    lambda_kd: float = 1.0
    lambda_ce_q: float = 1.0
    lambda_at: float = 0.0
    # runtime
    device: str = "cpu"
    seed: int = 0
    backend: str = "auto"
    channels_last: bool = False
    precision: str = "fp32"             # "bf16": forward passes under bf16 autocast (weights, grads, optimizers fp32)
    cuda_graphs: bool = False           # replay the main-phase step as one CUDA graph (CUDA, single process)
    work_dir: str = "runs/acq"
    keep_checkpoints: int = 3
    log_every: int = 10
    progress: bool = True
    # multi-process (torchrun) and resilience: BNS on the global or per-rank batch statistics;
    # skip (and count) a step whose loss is non-finite instead of stopping the run
    bns_stats: str = "global"
    skip_nonfinite: bool = False

    # fields that may differ between a checkpoint and the run resuming it
    RESUMABLE_CHANGES = ("epochs", "device", "backend", "work_dir", "keep_checkpoints", "log_every", "progress",
                         "data_dir", "channels_last", "precision", "cuda_graphs", "bns_stats",
                         "skip_nonfinite")

    @property
    def classes(self) -> int:
        return self.num_classes if self.num_classes is not None else NUM_CLASSES[self.dataset]

    @property
    def input_shape(self) -> tuple[int, int]:
        """(channels, image size) of the teacher's input (and of the generator's output)."""
        c, size = default_input_shape(self.model, self.dataset)
        return (self.in_channels or c, self.image_size or size)

    @property
    def needs_attention(self) -> bool:
        """Whether any loss term reads attention maps (else no feature tap is built)."""
        return self.acq_terms_on or self.lambda_at > 0

    @property
    def acq_terms_on(self) -> bool:
        return any(v > 0 for v in (self.lambda_acm, self.lambda_pair, self.lambda_cons))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What a checkpoint must agree on to be resumed by this configuration (the teacher is checked by
        the hash of its weights instead of its path)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RESUMABLE_CHANGES + ("teacher_weights",)}

    def warnings(self) -> list[str]:
        """Settings that are valid but do not do what a user probably expects."""
        out = []
        if self.epochs <= self.warmup_epochs:
            out.append(f"epochs ({self.epochs}) <= warmup_epochs ({self.warmup_epochs}): only the generator warms "
                       "up, the quantized student is never trained (its accuracy is that of the untrained copy)")
        return out

    def validate(self) -> "Config":
        check_model_name(self.model)
        if self.dataset not in DATASETS:
            raise AcqError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits)
        if self.first_last_bits is not None:
            check_bits("first_last_bits", self.first_last_bits)
        if self.ste not in STE_MODES:
            raise AcqError(f"ste must be one of {STE_MODES}, got {self.ste!r}")
        if self.kd_reduction not in KD_REDUCTIONS:
            raise AcqError(f"kd_reduction must be one of {KD_REDUCTIONS}, got {self.kd_reduction!r}")
        if self.bns_stats not in ("global", "local"):
            raise AcqError(f"bns_stats must be 'global' or 'local', got {self.bns_stats!r}")
        if self.precision not in PRECISIONS:
            raise AcqError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise AcqError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("epochs", "iters_per_epoch", "batch_size", "latent_dim", "gen_width", "keep_checkpoints",
                     "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise AcqError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise AcqError(f"warmup_epochs must be a non-negative integer, got {self.warmup_epochs!r}")
        if not isinstance(self.range_epochs, int) or self.range_epochs < 1:
            # zero epochs of observation would quantize with the initial scale 1 / zero point 0
            raise AcqError(f"range_epochs must be an integer >= 1, got {self.range_epochs!r}")
        for name in ("image_size", "in_channels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise AcqError(f"{name} must be a positive integer, got {v!r}")
        if self.input_shape[1] % 4:
            raise AcqError(f"image_size must be a multiple of 4 (the generator upsamples x4), got {self.input_shape[1]}")
        if self.weight_range not in WEIGHT_RANGES:
            raise AcqError(f"weight_range must be one of {WEIGHT_RANGES}, got {self.weight_range!r}")
        if self.generator not in GENERATORS:
            raise AcqError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.attention_layers is not None and (
                not isinstance(self.attention_layers, (list, tuple)) or not self.attention_layers
                or not all(isinstance(n, str) and n for n in self.attention_layers)):
            raise AcqError(f"attention_layers must be a non-empty list of module names, got {self.attention_layers!r}")
        if not isinstance(self.q_milestones, (list, tuple)) or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.q_milestones):
            raise AcqError(f"q_milestones must be a list of positive epoch numbers, got {self.q_milestones!r}")
        if self.num_classes is not None and self.num_classes < 2:
            raise AcqError(f"num_classes must be >= 2, got {self.num_classes}")
        for name in ("lambda_ce", "beta_bns", "lambda_acm", "lambda_pair", "lambda_cons", "lambda_kd",
                     "lambda_ce_q", "lambda_at", "lr_g", "lr_q", "weight_decay", "pair_margin"):
            if getattr(self, name) < 0:
                raise AcqError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_pair > 0 and self.batch_size % 2:
            raise AcqError(f"batch_size must be even when lambda_pair > 0 (pairs), got {self.batch_size}")
        if not 0.0 <= self.act_momentum < 1.0:
            raise AcqError(f"act_momentum must be in [0, 1), got {self.act_momentum}")
        if not 0.0 < self.center_range <= 1.0:
            raise AcqError(f"center_range must be in (0, 1], got {self.center_range}")
        if self.kd_temperature <= 0 or self.attention_p <= 0:
            raise AcqError("kd_temperature and attention_p must be > 0")
        if not self.device.startswith(("cpu", "cuda")):
            raise AcqError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise AcqError(f"device {self.device!r} requested but CUDA is not available")
        if self.backend != "auto":
            import torch
            from acq_kernels._backend import backend_usable, usable_backends
            if not backend_usable(self.backend, torch.device(self.device)):
                raise AcqError(f"backend {self.backend!r} cannot run on device {self.device!r} here "
                               f"(usable: auto, {', '.join(usable_backends(torch.device(self.device)))})")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise AcqError(f"cuda_graphs needs a CUDA device, got device={self.device!r}")
        if self.cuda_graphs and self.skip_nonfinite:
            raise AcqError("cuda_graphs and skip_nonfinite cannot be combined: skipping a step needs a "
                           "host sync inside it, which a captured graph cannot do")
        if self.teacher_weights is not None and not os.path.isfile(self.teacher_weights):
            raise AcqError(f"teacher weights file not found: {self.teacher_weights}")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise AcqError(f"data dir not found: {self.data_dir}")
        return self

    def check_dataset_fit(self) -> "Config":
        """The model must fit the dataset it is trained for and evaluated on (the CLI checks this; the
        Python API may train any teacher without evaluation data)."""
        if self.num_classes is not None and self.num_classes != NUM_CLASSES[self.dataset]:
            raise AcqError(f"num_classes is {self.num_classes} but dataset {self.dataset!r} has "
                           f"{NUM_CLASSES[self.dataset]} classes")
        if self.model in INPUT_SHAPE and INPUT_SHAPE[self.model][0] != CHANNELS[self.dataset]:
            raise AcqError(f"model {self.model!r} takes {INPUT_SHAPE[self.model][0]}-channel images but dataset "
                           f"{self.dataset!r} has {CHANNELS[self.dataset]} channels (pass a matching --dataset)")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def read_config_file(path: str) -> dict:
    """A JSON (.json) or TOML (.toml) file of Config fields (flat, or under a [train] table)."""
    if not os.path.isfile(path):
        raise AcqError(f"config file not found: {path}")
    try:
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except Exception as exc:
        raise AcqError(f"could not parse config file {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise AcqError(f"config file {path} must hold a table/object of settings")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise AcqError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def make_config(file: str | None = None, **overrides) -> Config:
    """Defaults < config file < overrides (None overrides are ignored); validated."""
    values = read_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise AcqError(f"unknown setting(s) {', '.join(unknown)}")
    cfg = Config(**values)
    return cfg.validate()


def demo_defaults(**kw) -> dict:
    """Settings of the embedded default (digits) — calibrated to fit the demo's time budget."""
    d = dict(model="digits_net", dataset="digits", batch_size=64, epochs=8, iters_per_epoch=100,
             warmup_epochs=1, range_epochs=2, lr_q=1e-4, q_milestones=[7], gen_width=64, latent_dim=64,
             first_last_bits=None)
    d.update(kw)
    return d
