"""The whole ACQ training iteration (generator step + student step, W4A4, ranges frozen: the
main phase of the schedule) as benchmark cases. The baseline is acq's own trainer on
acq_kernels' reference backend (the end-to-end pure-PyTorch baseline); the contenders are the
same trainer on the fused backends. Teachers have random weights: speed does not depend on them.
"""
from __future__ import annotations

from bench.cases import Case, Config, Unavailable, Workload


def _acq():
    try:
        import acq.config
        import acq.models
        import acq.trainer
    except ImportError as exc:
        raise Unavailable(f"the acq package is not importable ({exc})") from None
    return acq


def _make(model: str, dataset: str, full_batch: int, quick_batch: int, demo: bool = False):
    def make(cfg: Config) -> Workload:
        acq = _acq()
        if cfg.dtype != __import__("torch").float32:
            raise Unavailable("the training step runs in float32")
        settings = acq.config.demo_defaults() if demo else dict(model=model, dataset=dataset)
        settings.update(batch_size=cfg.batch(full_batch, quick_batch), device=str(cfg.device), progress=False,
                        w_bits=4, a_bits=4, epochs=10**6)
        try:
            acfg = acq.config.make_config(**settings)
            teacher = acq.models.build_model(acfg.model, acfg.classes)
        except Exception as exc:  # e.g. torchvision missing for ResNet-18
            raise Unavailable(f"cannot build {model}: {exc}") from None
        trainer = acq.trainer.Trainer(acfg, teacher)
        trainer.epoch = 0
        trainer.step()  # an observing step sets the activation ranges
        trainer.epoch = max(acfg.warmup_epochs, acfg.range_epochs)  # main phase: G and Q train
        return Workload(dict(trainer=trainer), [], [], f"{acfg.model} B={acfg.batch_size} W4A4 "
                        f"({'ACQ' if acfg.acq_terms_on else 'GDFQ'} losses)")
    return make


def _step_reference(trainer):
    from bench.harness import backend_in_force
    with backend_in_force("reference"):
        return trainer.step()


def _step(trainer):
    return trainer.step()


CASES = [
    Case("acq_step", f"{name}_b{b}", make=_make(model, dataset, b, qb, demo=(name == "embedded")),
         baseline=_step_reference, acq=_step, modes=("step",), heavy=heavy, compile_ok=False)
    for name, model, dataset, b, qb, heavy in [
        ("embedded", "digits_net", "digits", 64, 64, False),
        ("resnet20", "resnet20", "cifar10", 200, 50, True),
        ("resnet18", "resnet18", "imagenet", 16, 2, True),
        ("resnet18", "resnet18", "imagenet", 32, 2, True),
    ]
]
