"""`--backend reference` runs the identical loop: same losses as the default backend on the same seed."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import acq_kernels
from acqtrain.config import make_config
from acqtrain.models import digits_net
from acqtrain.trainer import Trainer
from conftest import cpu_backends


def _losses(backend, teacher_state, **kw):
    cfg = make_config(epochs=3, iters_per_epoch=2, batch_size=8, warmup_epochs=1, range_epochs=2, gen_width=16,
                      latent_dim=16, progress=False, backend=backend, seed=3, lambda_at=0.5, **kw)
    teacher = digits_net()
    teacher.load_state_dict(teacher_state)
    with acq_kernels.set_backend(backend):
        t = Trainer(cfg, teacher)
        out = []
        for epoch in range(3):  # warm-up, range tracking, frozen ranges
            t.epoch = epoch
            out += [{k: v.detach().clone() for k, v in t.step().items()} for _ in range(2)]
    return out


@pytest.mark.parametrize("ste", ["clipped"])
def test_reference_and_default_backend_give_the_same_losses(ste):
    state = digits_net().state_dict()
    ref = _losses("reference", state, ste=ste)
    auto = _losses("auto", state, ste=ste)
    assert len(ref) == 6 and "q_total" in ref[-1]
    for step, (a, b) in enumerate(zip(ref, auto)):
        assert a.keys() == b.keys()
        # Kernels differ from the reference by fp32 summation order only (ulps). Fake quantization
        # is discontinuous, so once the student has taken an SGD step on ulp-different gradients a
        # weight or activation can round the other way and the student's losses legitimately
        # diverge. Hence: every loss over the warm-up epoch and the first student step (steps
        # 0-2), and the generator's losses, which are smooth in its parameters, over all steps.
        keys = a if step <= 2 else [k for k in a if k.startswith("g_")]
        for k in keys:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4,
                                       msg=lambda m, step=step, k=k: f"step {step}, {k}: {m}")


def test_channels_last_loop_matches_contiguous():
    """The channels-last option (a GPU speed switch) changes memory layout only, not the losses."""
    state = digits_net().state_dict()
    out = []
    for cl in (False, True):
        cfg = make_config(epochs=2, iters_per_epoch=1, batch_size=8, warmup_epochs=0, range_epochs=1, gen_width=16,
                          latent_dim=16, progress=False, seed=5, channels_last=cl)
        teacher = digits_net()
        teacher.load_state_dict(state)
        t = Trainer(cfg, teacher)
        assert t.teacher.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last) == cl
        out.append(t.step())
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=1e-3, atol=1e-4)


def test_bf16_autocast_loop_tracks_fp32_and_keeps_fp32_state():
    """--precision bf16 runs the forward passes in bf16 (the images the student sees are bf16) while
    parameters, gradients and optimizer state stay fp32; the first step's losses follow fp32's."""
    state = digits_net().state_dict()
    losses, trainers = [], []
    for precision in ("fp32", "bf16"):
        cfg = make_config(epochs=2, iters_per_epoch=1, batch_size=8, warmup_epochs=0, range_epochs=1, gen_width=16,
                          latent_dim=16, progress=False, seed=5, precision=precision, channels_last=True)
        teacher = digits_net()
        teacher.load_state_dict(state)
        t = Trainer(cfg, teacher)
        z, y, c = t.sample()
        with t.autocast():
            x = t.generator(z, y, c)
        assert x.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        losses.append(t.step())
        trainers.append(t)
    for k, v in losses[1].items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        # bf16 keeps 8 mantissa bits: a few percent on losses that sum over layers
        torch.testing.assert_close(v, losses[0][k], rtol=0.1, atol=0.05, msg=lambda m, k=k: f"{k}: {m}")
    t = trainers[1]
    for model in (t.generator, t.student):
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32, name
            assert p.grad is None or p.grad.dtype == torch.float32, name
    assert all(s["exp_avg"].dtype == torch.float32 for s in t.opt_g.state.values())


def test_loop_speed_switches_are_validated():
    from acqtrain.errors import AcqError
    with pytest.raises(AcqError, match="precision"):
        make_config(precision="fp16")
    with pytest.raises(AcqError, match="cuda_graphs needs a CUDA device"):
        make_config(cuda_graphs=True, device="cpu")
    if torch.cuda.is_available():
        with pytest.raises(AcqError, match="skip_nonfinite"):
            make_config(cuda_graphs=True, device="cuda", skip_nonfinite=True)


class HostSyncs(TorchDispatchMode):
    """Records every op that makes the host wait for the device: reading a tensor's value back
    (item/bool/float, nonzero, masked_select), repeat_interleave without output_size (it sums the
    repeats on the host) and, with copies=True, lift_fresh, i.e. torch.tensor(host data): a
    blocking copy from pageable memory on CUDA (fine once per shape set, not every step).
    torch.optim's host-side step counters are allowed."""

    def __init__(self, copies=True):
        super().__init__()
        aten = torch.ops.aten
        self.reads = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
        if copies:
            self.reads.add(aten.lift_fresh.default)
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in self.reads or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            frames = traceback.format_stack()[:-1]
            if "torch/optim/" not in "".join(frames).replace("\\", "/"):
                self.found.append(f"{func}\n" + "".join(frames[-8:]))
        return func(*args, **kwargs)


def test_step_reads_nothing_back_to_the_host(monkeypatch):
    """No host sync inside a training step (observing and main phase): no op that reads a tensor's
    value back or copies host data in runs, apart from torch.optim's host-side step counters. The
    CPU-only value checks of acq_kernels' arguments are switched off, as they are for CUDA
    tensors."""
    from acq_kernels import _validation
    from acqtrain.config import demo_defaults

    monkeypatch.setattr(_validation, "_can_read_values", lambda t: False)
    cfg = make_config(**demo_defaults(batch_size=8, progress=False, gen_width=16, latent_dim=16, lambda_at=0.5))
    t = Trainer(cfg, digits_net())
    for epoch in (0, cfg.range_epochs):  # observing ranges; then G and Q train on frozen ranges
        t.epoch = epoch
        # The first step builds (and uploads) plans and per-shape vectors once; the next copies nothing.
        for copies in (False, True):
            with HostSyncs(copies=copies) as probe:
                t.step()
            assert not probe.found, probe.found[0]


def test_multi_process_bn_loss_syncs_nothing(monkeypatch):
    """The multi-process BN loss (flat statistics -> all_reduce -> bns_loss_from_flat), forward and
    backward, makes no host sync once its per-shape vectors exist: it runs every step."""
    from acqtrain import distributed
    from acq_kernels import _validation

    monkeypatch.setattr(_validation, "_can_read_values", lambda t: False)
    bns = [torch.nn.BatchNorm2d(c) for c in (8, 16, 5)]
    for m in bns:
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 1.5)
    for backend in cpu_backends():
        xs = [torch.randn(4, m.num_features, 5, 5, requires_grad=True) for m in bns]
        with acq_kernels.set_backend(backend):
            for copies in (False, True):  # the first call builds the per-shape vectors
                with HostSyncs(copies=copies) as probe:
                    loss = distributed.global_bns_loss(xs, bns, world_size=2)
                    torch.autograd.grad(loss, xs)
                assert not probe.found, f"{backend}: {probe.found[0]}"
