"""The benchmark cases, shared by the pytest-benchmark suite (bench/test_bench_*.py), the report
command (`python -m bench.report`) and the smoke test (tests/test_bench_smoke.py).

A case is declarative: a family, a name, a function that builds the inputs at a given size, and
the forward of each contender, all taking the same keyword arguments:
  baseline  the eager pure-PyTorch composition (bench.baselines) every ratio divides by
  native    torch's own fused op, where one exists
  acq       the acq_kernels public API (run once per usable backend: reference, cpu, triton, cuda)
torch.compile of the baseline and a plain copy of the same bytes are added by the harness.
Adding a case = appending one `Case(...)` to a family list below.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import acq_kernels
from bench import baselines
from bench.shapes import BN_INVENTORIES, RESNET18_STAGES, RESNET20_STAGES, resnet18_conv_weights

MODES = ("fwd", "bwd", "fwdbwd")
SIZES = ("full", "quick", "tiny")
EPS = torch.finfo(torch.float32).eps


class Unavailable(Exception):
    """A case or contender that cannot run here (op not landed yet, backend not usable, ...)."""


@dataclasses.dataclass(frozen=True)
class Config:
    device: torch.device
    dtype: torch.dtype = torch.float32
    size: str = "full"  # "full": the issues' sizes; "quick": smaller batches; "tiny": smoke test

    def batch(self, full: int, quick: int | None = None) -> int:
        if self.size == "tiny":
            return 2
        if self.size == "quick":
            return quick if quick is not None else max(1, full // 4)
        return full

    def randn(self, *shape, requires_grad=False, channels_last=False):
        t = torch.randn(*shape, device=self.device, dtype=self.dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)


@dataclasses.dataclass
class Workload:
    kwargs: dict                      # the keyword arguments of every contender's forward
    leaves: list                      # tensors the backward differentiates with respect to
    data: list                        # the main tensors: what the copy yardstick copies
    label: str = ""                   # concrete shape description for the report

    def data_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data)

    def io_bytes(self, mode: str) -> int:
        """Minimal DRAM traffic of an elementwise-or-reduction op over `data`: read + write
        (or read + tiny write) per pass; one pass forward, one backward. This is also what
        the copy yardstick moves, so GB/s are comparable to it."""
        return 2 * self.data_bytes() * (2 if mode == "fwdbwd" else 1)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    name: str
    make: Callable[[Config], Workload]
    baseline: Callable
    acq: Callable | None = None
    acq_needs: tuple = ()             # acq_kernels attributes the acq contender calls
    native: Callable | None = None
    heavy: bool = False               # too big for a full CPU run (runs on GPUs, or with --heavy)
    modes: tuple = MODES
    compile_ok: bool = True           # torch.compile of the baseline is meaningful here
    quick_compile: bool = False       # also compile in --quick runs (compiling costs ~15 s a case on CPU)
    compiled: Callable | None = None  # the compiled contender when it is not torch.compile(baseline)
    ladder: tuple = ()                # (name, fn): extra contenders on the default backend (acq_step's rungs)

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"

    def acq_available(self) -> bool:
        return self.acq is not None and all(hasattr(acq_kernels, n) for n in self.acq_needs)


def _shape(*dims) -> str:
    return "x".join(str(d) for d in dims)


# --------------------------------------------------------------------------------------------
# Fake quantization: a 64x64x56x56 activation (per tensor, EMA observer, LSQ) and the
# ResNet-18 conv weights (per output channel, range from the weight itself)
# --------------------------------------------------------------------------------------------
QMIN, QMAX = 0, 15          # A4 activations
WQMIN, WQMAX = -8, 7        # W4 weights


def _activation(cfg: Config, channels_last=False) -> Workload:
    shape = (cfg.batch(64, 16), 64, 56, 56) if cfg.size != "tiny" else (2, 3, 17, 19)
    x = cfg.randn(*shape, requires_grad=True, channels_last=channels_last)
    scale = torch.tensor(0.02, device=cfg.device)  # range [-0.1, 0.2]: most of N(0, 1) clips (STE mask matters)
    zp = torch.tensor(5, device=cfg.device, dtype=torch.int32)
    return Workload(dict(x=x, scale=scale, zero_point=zp), [x], [x], _shape(*shape))


def _activation_ema(cfg: Config) -> Workload:
    wl = _activation(cfg)
    dev = cfg.device
    wl.kwargs.update(min_val=torch.tensor([-1.0], device=dev), max_val=torch.tensor([1.0], device=dev),
                     scale=torch.tensor([0.1], device=dev),
                     zero_point=torch.tensor([8], device=dev, dtype=torch.int32))
    return wl


def _activation_lsq(cfg: Config) -> Workload:
    wl = _activation(cfg)
    scale = torch.tensor([0.02], device=cfg.device, requires_grad=True)
    zp = torch.tensor([5.0], device=cfg.device, requires_grad=True)
    wl.kwargs.update(scale=scale, zero_point=zp)
    wl.leaves += [scale, zp]
    return wl


def _weights(cfg: Config) -> Workload:
    shapes = resnet18_conv_weights() if cfg.size != "tiny" else [(8, 3, 3, 3), (5, 8, 1, 1)]
    ws = [cfg.randn(*s).mul_(0.05).requires_grad_(True) for s in shapes]
    n = sum(w.numel() for w in ws)
    return Workload(dict(weights=ws), ws, ws, f"{len(ws)} convs, {n / 1e6:.1f} M params")


def _native_fq_per_tensor(x, scale, zero_point):
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, QMIN, QMAX)


def _native_ema(x, min_val, max_val, scale, zero_point):
    on = torch.ones(1, dtype=torch.long, device=x.device)
    return torch.fused_moving_avg_obs_fake_quant(x, on, on, min_val, max_val, scale, zero_point,
                                                 0.01, QMIN, QMAX, 0, False, False)


def _native_lsq(x, scale, zero_point):
    return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, QMIN, QMAX, 1.0)


def _native_weights(weights):
    outs = []
    for w in weights:
        with torch.no_grad():
            mn, mx = torch.aminmax(w.detach().reshape(w.shape[0], -1), dim=1)
            scale, zp = baselines.minmax_qparams(mn, mx, WQMIN, WQMAX)
        outs.append(torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, WQMIN, WQMAX))
    return outs


def _per_tensor_case(name: str, make, **kw) -> Case:
    """Per-tensor fake quant of one activation layout: baseline, torch's native op, acq."""
    return Case("fake_quant", name, make=make,
                baseline=lambda x, scale, zero_point: baselines.fake_quantize(x, scale, zero_point, QMIN, QMAX),
                native=_native_fq_per_tensor,
                acq=lambda x, scale, zero_point: acq_kernels.fake_quantize(x, scale, zero_point, QMIN, QMAX),
                acq_needs=("fake_quantize",), **kw)


FAKE_QUANT = [
    _per_tensor_case("per_tensor", _activation, quick_compile=True),
    _per_tensor_case("per_tensor_channels_last", lambda cfg: _activation(cfg, channels_last=True)),
    Case("fake_quant", "moving_average",
         make=_activation_ema,
         baseline=lambda x, min_val, max_val, scale, zero_point: baselines.fake_quantize_moving_average(
             x, min_val, max_val, scale, zero_point, QMIN, QMAX, 0.01),
         native=_native_ema,
         acq=lambda x, min_val, max_val, scale, zero_point: acq_kernels.fake_quantize_moving_average(
             x, min_val, max_val, scale, zero_point, QMIN, QMAX, averaging_constant=0.01),
         acq_needs=("fake_quantize_moving_average",)),
    Case("fake_quant", "learnable_lsq",
         make=_activation_lsq,
         baseline=lambda x, scale, zero_point: baselines.fake_quantize_learnable(x, scale, zero_point, QMIN, QMAX),
         native=_native_lsq,
         acq=lambda x, scale, zero_point: acq_kernels.fake_quantize_learnable(x, scale, zero_point, QMIN, QMAX),
         acq_needs=("fake_quantize_learnable",)),
    Case("fake_quant", "per_channel_weights_resnet18",
         make=_weights,
         baseline=lambda weights: [baselines.fake_quantize_minmax(w, WQMIN, WQMAX, axis=0) for w in weights],
         native=_native_weights,
         acq=lambda weights: [acq_kernels.fake_quantize_minmax(w, WQMIN, WQMAX, axis=0)[0] for w in weights],
         acq_needs=("fake_quantize_minmax",)),
]


# --------------------------------------------------------------------------------------------
# Attention maps on the residual-stage outputs
# --------------------------------------------------------------------------------------------
def _stages(stages, full_batch, quick_batch):
    def make(cfg: Config) -> Workload:
        b = cfg.batch(full_batch, quick_batch)
        shapes = stages if cfg.size != "tiny" else [(3, 5, 7), (4, 3, 3)]
        feats = [cfg.randn(b, *s, requires_grad=True) for s in shapes]
        return Workload(dict(feats=feats), feats, feats, f"B={b}: " + ", ".join(_shape(*s) for s in shapes))
    return make


ATTENTION = [
    Case("attention", f"spatial_attention_{model}_b{b}",
         make=_stages(stages, b, qb),
         baseline=lambda feats: [baselines.spatial_attention(f) for f in feats],
         acq=lambda feats: [acq_kernels.spatial_attention(f) for f in feats],
         acq_needs=("spatial_attention",), quick_compile=(model == "resnet20"))
    for model, stages, b, qb in [("resnet18", RESNET18_STAGES, 32, 8), ("resnet20", RESNET20_STAGES, 200, 50)]
]


# --------------------------------------------------------------------------------------------
# BN statistics: the BN-input inventories of whole models, and the BNS loss over them
# --------------------------------------------------------------------------------------------
def _bn_inventory(model, full_batch, quick_batch):
    def make(cfg: Config) -> Workload:
        b = cfg.batch(full_batch, quick_batch)
        shapes = BN_INVENTORIES[model]() if cfg.size != "tiny" else [(4, 5, 7), (6, 3, 3)]
        xs = [cfg.randn(b, *s, requires_grad=True) for s in shapes]
        rms = [torch.randn(s[0], device=cfg.device) * 0.1 for s in shapes]
        rvs = [torch.rand(s[0], device=cfg.device) + 0.5 for s in shapes]
        n = sum(x.numel() for x in xs)
        return Workload(dict(tensors=xs, running_means=rms, running_vars=rvs), xs, xs,
                        f"{len(xs)} BN inputs, B={b}, {n / 1e6:.1f} M elements")
    return make


def _bn_stats_baseline(tensors, running_means, running_vars):
    return baselines.bn_stats(tensors)


def _bn_stats_acq(tensors, running_means, running_vars):
    return acq_kernels.bn_stats(tensors)


BN_STATS = []
for _model, _b, _qb, _heavy in [("resnet20", 200, 50, False), ("resnet18", 16, 4, False),
                                ("resnet18", 32, 8, True), ("resnet50", 16, 2, True),
                                ("resnet50", 32, 4, True)]:
    BN_STATS.append(Case("bn_stats", f"bns_loss_{_model}_b{_b}", make=_bn_inventory(_model, _b, _qb),
                         baseline=baselines.bns_loss, acq=lambda **kw: acq_kernels.bns_loss(**kw),
                         acq_needs=("bns_loss",), heavy=_heavy, quick_compile=(_model == "resnet20")))
BN_STATS.insert(1, Case("bn_stats", "bn_stats_resnet20_b200", make=_bn_inventory("resnet20", 200, 50),
                        baseline=_bn_stats_baseline, acq=_bn_stats_acq, acq_needs=("bn_stats",)))


FAMILIES: dict[str, list[Case]] = {
    "fake_quant": FAKE_QUANT,
    "attention": ATTENTION,
    "bn_stats": BN_STATS,
}


def all_cases(families=None) -> list[Case]:
    from bench import acq_step  # the training-step cases live beside the trainer they drive
    fams = dict(FAMILIES, acq_step=acq_step.CASES)
    chosen = families or list(fams)
    unknown = [f for f in chosen if f not in fams]
    if unknown:
        raise ValueError(f"families: unknown {unknown}; known {list(fams)}")
    return [c for f in chosen for c in fams[f]]
