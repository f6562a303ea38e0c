"""Multi-process ACQ (python/acqtrain/distributed.py): 2 gloo ranks on localhost == 1 process on the
concatenated global batch; the global-BNS gradient; consistent non-finite handling; the stop message."""
from __future__ import annotations

import dataclasses
import os
import json
import socket
import sys
import time

import pytest
import torch


import acq_kernels
from acqtrain.config import make_config
from acqtrain.errors import AcqError
from acqtrain.models import INPUT_SHAPE, build_model
from acqtrain.data import evaluate
from acqtrain.quant import ActQuant, calibrate_on_noise
from acqtrain.trainer import Trainer

WORLD = 2
STEPS = 3
TIMEOUT_S = 150


def _cfg(**kw):
    # L_PAIR pairs within a rank and L_CONS uses per-rank batch statistics: off here, so that the
    # 2-rank run is exactly one process on the concatenated batch (see distributed.py's doc).
    base = dict(model="digits_net", dataset="digits", batch_size=8, latent_dim=16, gen_width=16, warmup_epochs=0,
                range_epochs=1, lambda_pair=0.0, lambda_cons=0.0, lambda_acm=1.0, beta_bns=1.0, lr_g=1e-3,
                lr_q=1e-2, progress=False, backend="reference", seed=7, iters_per_epoch=STEPS, epochs=1)
    base.update(kw)
    return make_config(**base)


def _teacher():
    torch.manual_seed(123)
    t = build_model("digits_net", 10)
    for m in t.modules():  # non-trivial running statistics for L_BNS
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return t


def _calibrate(trainer):
    # the same frozen activation ranges on every rank and in the reference
    c, size = INPUT_SHAPE["digits_net"]
    calibrate_on_noise(trainer.student, (c, size, size), batch_size=16,
                       generator=torch.Generator().manual_seed(5))
    trainer.epoch = trainer.cfg.range_epochs  # main phase: the ranges stay frozen


def _snapshot(trainer):
    out = {}
    for tag, mod in (("g", trainer.generator), ("q", trainer.student)):
        for n, p in mod.named_parameters():
            out[f"{tag}.{n}"] = p.detach().clone()
            if p.grad is not None:
                out[f"{tag}.{n}.grad"] = p.grad.detach().clone()
    return out


def _bn_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1,
            torch.randn(5, 6, generator=g, dtype=torch.float64) - 3]


def _bn_layers():
    g = torch.Generator().manual_seed(99)
    layers = [torch.nn.BatchNorm2d(3).double(), torch.nn.BatchNorm1d(6).double()]
    for m in layers:
        m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
        m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return layers


def _range_batch(rank, i):
    g = torch.Generator().manual_seed(100 * rank + i)
    return torch.randn(6, 3, generator=g) * (rank + 1) + i - rank


def _eval_batches():
    # 5 batches of uneven sizes: 3 go to rank 0, 2 to rank 1; none twice
    g = torch.Generator().manual_seed(11)
    c, size = INPUT_SHAPE["digits_net"]
    return [(torch.randn(n, c, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in (7, 5, 6, 3, 4)]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from acqtrain import distributed as D

    acq_kernels.set_backend("reference")
    assert D.init_from_env("cpu") == "cpu"
    try:
        res = {}
        # 1) global L_BNS of float64 inputs and its gradient
        xs = [x.requires_grad_() for x in _bn_inputs(rank)]
        layers = _bn_layers()
        loss = D.global_bns_loss(xs, layers, WORLD)
        loss.backward()
        res["bns"] = (loss.detach(), [x.grad for x in xs])
        # 2) activation ranges merged after each observing step; sharded evaluation
        aq = torch.nn.Sequential(ActQuant(4, 0.1))
        for i in range(2):
            aq(_range_batch(rank, i))
            D.sync_activation_ranges(aq)
        res["ranges"] = {k: v.clone() for k, v in aq.state_dict().items()}
        # 3) a few generator + student steps
        tr = D.DistributedTrainer(_cfg(), _teacher())
        _calibrate(tr)
        res["losses"] = [{k: float(v.detach()) for k, v in tr.step().items()} for _ in range(STEPS)]
        res["state"] = _snapshot(tr)
        res["rank_seeds"] = tr.rank_seeds
        data = _eval_batches()
        res["acc"] = (D.evaluate_sharded(tr.student, data, "cpu"), evaluate(tr.student, data))
        # 4) a non-finite loss on rank 1 only: both ranks skip the same updates
        tr.cfg = dataclasses.replace(tr.cfg, skip_nonfinite=True, bns_stats="local")
        before = _snapshot(tr)
        if rank == 1:
            orig = tr.sample
            tr.sample = lambda: tuple(t.fill_(float("nan")) if i == 0 else t for i, t in enumerate(orig()))
        tr.step()
        after = _snapshot(tr)
        res["skipped"] = tr.skipped_steps
        res["unchanged"] = all(torch.equal(before[k], after[k]) for k in before if not k.endswith(".grad"))
        tr.close()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"2-rank gloo run did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only our own children
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


class _GlobalBatchTrainer(Trainer):
    """One process on the concatenation of the ranks' batches: rank r's (z, y, c) come from its own
    RNG stream (seed + r), the generator's BatchNorm normalises each rank's part on its own."""

    def __init__(self, cfg, teacher):
        super().__init__(cfg, teacher)
        self._states = []
        for r in range(WORLD):
            torch.manual_seed(cfg.seed + r)
            self._states.append(torch.get_rng_state())
        gen = self.generator
        self.g_forward = lambda z, y, c: torch.cat([gen(*t) for t in zip(z.chunk(WORLD), y.chunk(WORLD),
                                                                         c.chunk(WORLD))])

    def sample(self):
        full, parts = self.cfg, []
        self.cfg = dataclasses.replace(full, batch_size=full.batch_size // WORLD)  # one rank's batch
        try:
            for r in range(WORLD):
                torch.set_rng_state(self._states[r])
                parts.append(super().sample())
                self._states[r] = torch.get_rng_state()
        finally:
            self.cfg = full
        return tuple(torch.cat(t) for t in zip(*parts))


@pytest.fixture(scope="module")
def reference():
    prev = acq_kernels.get_backend()
    acq_kernels.set_backend("reference")
    try:
        cfg = _cfg(batch_size=8 * WORLD)
        tr = _GlobalBatchTrainer(cfg, _teacher())
        _calibrate(tr)
        losses = [{k: float(v.detach()) for k, v in tr.step().items()} for _ in range(STEPS)]
        state = _snapshot(tr)
        tr.close()
    finally:
        acq_kernels.set_backend(prev)
    return losses, state


def test_two_ranks_match_one_process_on_global_batch(two_ranks, reference):
    ref_losses, ref_state = reference
    assert [r["rank_seeds"] for r in two_ranks] == [[7, 8], [7, 8]]
    for step in range(STEPS):
        for k, v in ref_losses[step].items():
            # per-rank means of equal-sized batches average to the global mean; g_bns is global
            got = sum(r["losses"][step][k] for r in two_ranks) / WORLD
            assert got == pytest.approx(v, rel=1e-4, abs=1e-5), (step, k)
        assert two_ranks[0]["losses"][step]["g_bns"] == pytest.approx(two_ranks[1]["losses"][step]["g_bns"],
                                                                      rel=1e-6)
    s0, s1 = two_ranks[0]["state"], two_ranks[1]["state"]
    assert set(s0) == set(ref_state)
    assert any(k.endswith(".grad") and k.startswith("g.") for k in s0)
    assert any(k.endswith(".grad") and k.startswith("q.") for k in s0)
    gscale = {t: max(v.abs().max().item() for k, v in ref_state.items() if k.startswith(t) and k.endswith(".grad"))
              for t in ("g.", "q.")}
    for k, ref in ref_state.items():
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"ranks disagree on {k}: {m}")
        if k.endswith(".grad"):
            torch.testing.assert_close(s0[k], ref, rtol=1e-3, atol=1e-4 * gscale[k[:2]],
                                       msg=lambda m: f"{k} differs from 1 process: {m}")
        elif ref_state[k + ".grad"].abs().max() > 1e-5 * gscale[k[:2]]:
            # (a bias right before a BatchNorm has an exact gradient of 0: Adam turns its round-off
            # into +-lr steps, so only its gradient, compared above, is meaningful)
            torch.testing.assert_close(s0[k], ref, rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"{k} differs from 1 process: {m}")


def test_global_bns_gradient_matches_single_process(two_ranks):
    layers = _bn_layers()
    xs = [torch.cat(t).requires_grad_() for t in zip(_bn_inputs(0), _bn_inputs(1))]
    loss, _ = acq_kernels.bns_loss(xs, [m.running_mean for m in layers], [m.running_var for m in layers])
    loss.backward()
    for r, res in enumerate(two_ranks):
        got_loss, grads = res["bns"]
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-6, atol=1e-9)
        for g, x in zip(grads, xs):
            # each rank's gradient is world_size * dL/dx_r (DDP then averages over ranks)
            torch.testing.assert_close(g / WORLD, x.grad.chunk(WORLD)[r], rtol=1e-5, atol=1e-9)


def test_activation_ranges_follow_the_global_batch(two_ranks):
    prev = acq_kernels.get_backend()
    acq_kernels.set_backend("reference")
    try:
        aq = torch.nn.Sequential(ActQuant(4, 0.1))
        for i in range(2):
            aq(torch.cat([_range_batch(r, i) for r in range(WORLD)]))
    finally:
        acq_kernels.set_backend(prev)
    for res in two_ranks:
        for k, v in aq.state_dict().items():
            torch.testing.assert_close(res["ranges"][k], v, rtol=1e-6, atol=0, msg=lambda m: f"{k}: {m}")


def test_sharded_evaluation_equals_full_evaluation(two_ranks):
    for res in two_ranks:
        sharded, full = res["acc"]
        assert sharded == pytest.approx(full, abs=1e-9)
    assert two_ranks[0]["acc"][0] == two_ranks[1]["acc"][0]


def test_nonfinite_on_one_rank_is_skipped_on_all(two_ranks):
    for res in two_ranks:
        assert res["skipped"] == 2  # the generator and the student update
        assert res["unchanged"]


def _poison(teacher):
    bn = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(float("nan"))  # NaN L_BNS and NaN teacher logits


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path):
    prev = acq_kernels.get_backend()
    acq_kernels.set_backend("reference")
    try:
        tr = Trainer(_cfg(epochs=3), _teacher(), out_dir=str(tmp_path))
        tr.run_epoch()  # writes the checkpoint of epoch 1
        path = tr.last_checkpoint
        assert path is not None and os.path.isfile(path)
        _poison(tr.teacher)
        msg = (r"non-finite g_total at epoch 2, iteration {}; last good checkpoint: "
               + path.replace("\\", "\\\\").replace(".", r"\."))
        # default: noted on the device, raised at the next log point, before any checkpoint
        with pytest.raises(AcqError, match=msg.format(STEPS + 1)):
            tr.run_epoch()
        assert [os.path.basename(p) for p in os.listdir(tmp_path / "checkpoints")] == ["ckpt-epoch0001.pt"]
        # checked before the update (as the distributed trainer always does)
        tr.immediate_finite_check = True
        with pytest.raises(AcqError, match=msg.format(tr.iteration + 1)):
            tr.step()
        tr.close()
        # skip mode (fresh trainer: the stopped one already applied the NaN updates it reported)
        tr = Trainer(_cfg(skip_nonfinite=True), _teacher())
        tr.step()
        _poison(tr.teacher)
        params = list(tr.generator.parameters()) + list(tr.student.parameters())
        before = [p.detach().clone() for p in params]
        it = tr.iteration
        tr.step()
        assert tr.skipped_steps == 2  # NaN teacher logits: the generator AND the student update skipped
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert tr.iteration == it + 1 == 2
        tr.close()
    finally:
        acq_kernels.set_backend(prev)


@pytest.mark.slow
def test_torchrun_cli_two_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 -m acqtrain train` on gloo: one set of files (rank 0), per-rank seeds
    recorded, a checkpoint that resumes, evaluation over the whole test set."""
    import subprocess

    work = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", "-m", "acqtrain", "train", "--epochs", "1", "--iters", "2",
            "--batch-size", "8", "--warmup-epochs", "0", "--range-epochs", "1", "--backend", "reference",
            "--work-dir", str(work), "--no-progress", "--seed", "3"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", HOME=os.path.expanduser("~"))
    for extra in ([], ["--epochs", "2", "--resume"]):
        proc = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=150,
                              cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(work / "checkpoints")) == ["ckpt-epoch0001.pt", "ckpt-epoch0002.pt"]
    assert proc.stdout.count("final accuracy") == 1  # rank 0 alone reports
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]  # one writer: no duplicated records
    assert all(r["world_size"] == 2 and r["rank_seeds"] == [3, 4] for r in records)
    assert 0.0 <= epochs[-1]["acc"] <= 100.0
    state = torch.load(work / "checkpoints" / "ckpt-epoch0002.pt", weights_only=False)
    assert state["rank_seeds"] == [3, 4] and len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
