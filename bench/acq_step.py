"""The whole ACQ training iteration (generator step + student step, W4A4, ranges frozen: the
main phase of the schedule) as benchmark cases, with a ladder that measures each speed-up alone.

baseline       the eager pure-PyTorch loop as GDFQ-family research code writes it (e.g. the
               GDFQ-derived KMDFQ trainer: the teacher is only put in eval mode, so its weight
               gradients are computed and thrown away; losses and accuracies are read on the
               host every iteration): acq_kernels' reference backend, NCHW, fp32.
+kernels       the same loop on the fused kernels (the default backend)
+frozen_teacher  ... and the teacher's parameters need no gradients (only input gradients flow to G)
+no_step_sync  ... and losses stay on the device (acq's trainer syncs every `log_every` steps)
+channels_last ... and every model runs channels-last
+bf16_autocast ... and the forward passes run under bf16 autocast
acq:<backend>  the full fast step: all of the above plus, on CUDA, the main-phase step replayed
               as one CUDA graph (acq's `--channels-last --precision bf16 --cuda-graphs`), once
               per usable backend, so acq:reference is the fast loop without the fused kernels.
               On a CPU there are no graphs: the full step is the +bf16_autocast rung.
compiled       the baseline loop with its three models torch.compile'd (default mode; the loop,
               its hooks and optimizers stay eager, as a user would compile it)

Each rung has its own trainer (memory format and gradient flags are per model), built from the
same seed. Teachers have random weights: speed does not depend on them. Models: the embedded
digits net, ResNet-20, torchvision's ResNet-18 and MobileNetV2 (32px on a CPU, 224px on a GPU).
"""
from __future__ import annotations

import dataclasses

import torch

from bench.cases import Case, Config, Unavailable, Workload


@dataclasses.dataclass(frozen=True)
class Loop:
    """How the training loop runs, apart from the kernels' backend."""
    teacher_grads: bool = False
    sync_each_step: bool = False
    channels_last: bool = True
    precision: str = "bf16"
    cuda_graphs: bool = True          # where the device is CUDA


BASELINE_LOOP = Loop(teacher_grads=True, sync_each_step=True, channels_last=False, precision="fp32",
                     cuda_graphs=False)
FAST_LOOP = Loop()
# (contender name, loop): each rung adds one change to the rung before it; acq:<backend> runs FAST_LOOP.
LADDER = (
    ("+kernels", BASELINE_LOOP),
    ("+frozen_teacher", dataclasses.replace(BASELINE_LOOP, teacher_grads=False)),
    ("+no_step_sync", dataclasses.replace(BASELINE_LOOP, teacher_grads=False, sync_each_step=False)),
    ("+channels_last", dataclasses.replace(FAST_LOOP, precision="fp32", cuda_graphs=False)),
    ("+bf16_autocast", dataclasses.replace(FAST_LOOP, cuda_graphs=False)),
)
LADDER_NAMES = tuple(name for name, _ in LADDER)


def _acq():
    try:
        import acqtrain.config
        import acqtrain.models
        import acqtrain.trainer
    except ImportError as exc:
        raise Unavailable(f"the acqtrain package is not importable ({exc})") from None
    return acqtrain


class Trainers:
    """One trainer per loop configuration, built (with one range-observing step) on first use,
    which the harness does outside the timed region."""

    def __init__(self, settings: dict):
        self.settings = settings
        self._built: dict[tuple, object] = {}

    def get(self, loop: Loop, compiled: bool = False):
        key = (loop, compiled)
        if key not in self._built:
            acqtrain = _acq()
            graphs = loop.cuda_graphs and self.settings["device"].startswith("cuda")
            cfg = acqtrain.config.make_config(**self.settings, channels_last=loop.channels_last,
                                         precision=loop.precision, cuda_graphs=graphs)
            torch.manual_seed(cfg.seed)
            tr = acqtrain.trainer.Trainer(cfg, acqtrain.models.build_model(cfg.model, cfg.classes))
            if loop.teacher_grads:
                tr.teacher.requires_grad_(True)
            tr.epoch = 0
            tr.step()  # an observing step sets the activation ranges
            tr.epoch = max(cfg.warmup_epochs, cfg.range_epochs)  # main phase: G and Q train
            if compiled:
                for m in (tr.t_forward, tr.student, tr.generator):  # t_forward: the teacher the step calls
                    m.compile()
            # untimed main-phase steps: compile every variant (eval / batch-stat teacher, backward
            # graphs), or run the CUDA graph's eager warm-up and capture
            warm = 3 if compiled else acqtrain.trainer.GRAPH_WARMUP_STEPS + 1 if graphs else 0
            for _ in range(warm):
                tr.step()
            self._built[key] = tr
        return self._built[key]

    def step(self, loop: Loop, compiled: bool = False) -> dict:
        losses = self.get(loop, compiled).step()
        if loop.sync_each_step:
            return {k: v.item() for k, v in losses.items()}
        return losses


def _make(model: str, dataset: str, full_batch: int, quick_batch: int, demo: bool = False,
          image_size: int | None = None, cuda_only: bool = False):
    def make(cfg: Config) -> Workload:
        acqtrain = _acq()
        if cfg.dtype != torch.float32:
            raise Unavailable("the step's dtypes are set by its loop (fp32 weights, bf16 autocast)")
        if cuda_only and cfg.device.type != "cuda":
            raise Unavailable(f"{model} at {image_size}px is a GPU case (its CPU case runs at 32px)")
        settings = acqtrain.config.demo_defaults() if demo else dict(model=model, dataset=dataset)
        if image_size is not None:
            settings.update(image_size=image_size, in_channels=3)
        settings.update(batch_size=cfg.batch(full_batch, quick_batch), device=str(cfg.device), progress=False,
                        w_bits=4, a_bits=4, epochs=10**6)
        try:
            acfg = acqtrain.config.make_config(**settings)
            acqtrain.models.build_model(acfg.model, acfg.classes)
        except Exception as exc:  # e.g. torchvision missing for ResNet-18
            raise Unavailable(f"cannot build {model}: {exc}") from None
        return Workload(dict(trainers=Trainers(settings)), [], [], f"{acfg.model} {acfg.input_shape[1]}px "
                        f"B={acfg.batch_size} W4A4 "
                        f"({'ACQ' if acfg.acq_terms_on else 'GDFQ'} losses)")
    return make


def _step_baseline(trainers):
    from bench.harness import backend_in_force
    with backend_in_force("reference"):
        return trainers.step(BASELINE_LOOP)


def _step_compiled(trainers):
    from bench.harness import backend_in_force
    with backend_in_force("reference"):
        return trainers.step(BASELINE_LOOP, compiled=True)


def _rung(loop: Loop):
    def step(trainers):
        return trainers.step(loop)
    return step


CASES = [
    Case("acq_step", f"{name}_b{b}", make=_make(model, dataset, b, qb, demo=(name == "embedded"), image_size=size,
                                                cuda_only=(size or 0) >= 128),
         baseline=_step_baseline, acq=_rung(FAST_LOOP), modes=("step",), heavy=heavy, compiled=_step_compiled,
         # the compile pass starts with the quick_compile cases: the step-vs-compile target first
         quick_compile=(name == "resnet18" and b == 32),
         ladder=tuple((rung, _rung(loop)) for rung, loop in LADDER))
    for name, model, dataset, b, qb, heavy, size in [
        ("embedded", "digits_net", "digits", 64, 64, False, None),
        ("resnet20", "resnet20", "cifar10", 200, 50, True, None),
        ("resnet18", "resnet18", "imagenet", 16, 2, True, None),
        ("resnet18", "resnet18", "imagenet", 32, 2, True, None),
        # torchvision's MobileNetV2 (depthwise convs, 35 ReLU6 sites): 32px on a CPU, 224px on a GPU
        ("mobilenet_v2_32px", "mobilenet_v2", "cifar10", 64, 8, True, 32),
        ("mobilenet_v2_224px", "mobilenet_v2", "imagenet", 32, 2, True, 224),
    ]
]
