"""Multi-process ACQ training on torch.distributed, launched with torchrun.

    torchrun --nproc_per_node=N -m acqtrain train ...      (NCCL on GPUs, gloo on CPU)

What changes against one process (everything else is the single-process Trainer):
- Every rank draws its own synthetic batch: the sampling RNG is seeded with seed + rank (recorded in
  the metrics and the checkpoint, together with every rank's RNG state).
- The generator and the student are wrapped in DistributedDataParallel (which averages gradients).
  The generator step is multi-pass only on the frozen teacher: DDP sees one generator forward and one
  backward per step, so it does not fight the step and no hand-written gradient all-reduce is needed.
- L_BNS is matched on the GLOBAL batch statistics by default (`bns_stats="global"`): each rank's
  flat (count, sum, M2) buffer of all teacher BN inputs (shifted by the running means, identical on
  all ranks) goes through ONE all_reduce per generator step; the gradient flows back to the local
  BN inputs. Every rank then holds the same global loss L, and rank r's backward yields exactly
  dL/dtheta through its own samples; the true gradient is the SUM over ranks, so the term is
  scaled by world_size in the backward only (its value stays L) to undo DDP's averaging.
  Per-rank mean losses (CE, ACM, KD, ...) need no scaling: the mean of equal-sized per-rank means
  is the global mean. `bns_stats="local"` matches each rank's own batch statistics instead.
- Activation ranges observed in the range epochs are merged after each step with one all_reduce
  (MIN of min, MAX of max): the EMA recursion on the global batch is reproduced exactly, and the
  ranks' quantizers never drift apart (each step's forward still quantizes with its local range).
- A non-finite loss is detected on all ranks together (one all_reduce of a flag), so that all stop,
  or all skip the same step (`skip_nonfinite`).
- Rank 0 alone writes checkpoints, metrics and progress bars; evaluation batches are split across
  ranks (batch i goes to rank i % world_size: no padding, no duplicates) and the counts are summed.

Not global (as in plain DDP without SyncBatchNorm): the generator's own BatchNorm layers and the
batch-statistics teacher pass of L_CONS normalise over each rank's batch; L_PAIR pairs within a rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import acq_kernels

from . import checkpoint as ckpt
from .errors import AcqError
from .quant import act_quantizers
from .trainer import LOSS_KEYS_G, LOSS_KEYS_Q, Trainer, seed_everything

_TIMEOUT = datetime.timedelta(minutes=30)


# ----------------------------------------------------------------------------- process group
def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None for a single process."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise AcqError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise AcqError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return None if world == 1 else (rank, world, local)


def init_from_env(device: str) -> str | None:
    """Join the process group torchrun describes: NCCL for cuda devices, gloo for cpu. Returns the
    device this rank uses (cuda:LOCAL_RANK on GPUs), or None when not launched multi-process."""
    world = env_world()
    if world is None:
        return None
    rank, size, local = world
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise AcqError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) visible")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kw = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size, timeout=_TIMEOUT,
                                **kw)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            # Leave together: a rank that tears its gloo pairs down while rank 0 is still writing
            # its last checkpoint can abort the peer ("terminate called without an active exception").
            dist.barrier()
        finally:
            dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0, and in a single-process run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. to fill a download/teacher cache), the others after it."""
    multi = dist.is_available() and dist.is_initialized()
    if multi and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if multi and is_main():
            dist.barrier()


# ----------------------------------------------------------------------------- collective pieces
def global_bns_loss(tensors, layers, world_size: int, group=None) -> torch.Tensor:
    """L_BNS of the union of all ranks' batches, from one all_reduce of the flat statistics buffer.

    Value: the global loss. Gradient: world_size * dL/dx_local, so that DDP's gradient AVERAGE
    over ranks equals the SUM of the per-rank contributions, i.e. the true gradient of L."""
    rms = [m.running_mean for m in layers]
    rvs = [m.running_var for m in layers]
    channels = [x.shape[1] for x in tensors]
    flat = acq_kernels.bn_stats_flat(tensors, shifts=rms)  # shifts: same on every rank -> additive
    flat = acq_kernels.all_reduce_flat(flat, group=group)
    loss, _ = acq_kernels.bns_loss_from_flat(flat, channels, rms, rvs, shifts=rms)
    return loss + (world_size - 1) * (loss - loss.detach())


@torch.no_grad()
def sync_activation_ranges(model: torch.nn.Module, group=None) -> None:
    """Merge the activation ranges of all ranks (MIN of min_val, MAX of max_val; one all_reduce)
    and recompute scale / zero_point from the merged range."""
    qs = act_quantizers(model)
    if not qs:
        return
    packed = torch.cat([torch.stack([q.min_val for q in qs]), -torch.stack([q.max_val for q in qs])])
    dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=group)
    n = len(qs)
    finite = torch.isfinite(packed).view(2, n).all(0).tolist()
    for i, q in enumerate(qs):
        q.min_val.copy_(packed[i])
        q.max_val.copy_(-packed[n + i])
        if finite[i]:
            # averaging_constant 0 leaves a finite range as is and recomputes the qparams the
            # same way the observing forward does
            acq_kernels.fake_quantize_moving_average(
                q.min_val.new_zeros(1), q.min_val, q.max_val, q.scale, q.zero_point, 0, 2 ** q.bits - 1,
                averaging_constant=0.0, observe=True, ste=q.ste)


def shard(data, rank: int, world_size: int):
    """Batches i with i % world_size == rank (no padding, no duplicates)."""
    for i, batch in enumerate(data):
        if i % world_size == rank:
            yield batch


@torch.no_grad()
def evaluate_sharded(model, data, device, channels_last: bool = False, group=None) -> float:
    """Top-1 accuracy (%) over ALL of `data`, each rank evaluating its shard; counts summed."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in shard(data, dist.get_rank(group), dist.get_world_size(group)):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        counts[0] += (model(x).argmax(1) == y.to(device)).sum()
        counts[1] += len(y)
    model.train(was_training)
    dist.all_reduce(counts, group=group)
    correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1.0)


# ----------------------------------------------------------------------------- trainer
class DistributedTrainer(Trainer):
    """The ACQ Trainer for one rank of an initialised process group (see the module doc)."""

    immediate_finite_check = True  # all ranks must stop (or skip) at the same step

    def __init__(self, cfg, teacher, eval_data=None, out_dir: str | None = None, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise AcqError("DistributedTrainer needs an initialised process group (launch with torchrun)")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if cfg.cuda_graphs:
            raise AcqError("cuda_graphs is single-process only (DDP's all-reduces are not captured); "
                           "drop --cuda-graphs under torchrun")
        if self.rank != 0:
            cfg = dataclasses.replace(cfg, progress=False)
        super().__init__(cfg, teacher, eval_data=eval_data, out_dir=out_dir)  # same init on every rank
        self.rank_seeds = [cfg.seed + r for r in range(self.world_size)]
        seed_everything(self.rank_seeds[self.rank])  # from here on: this rank's own batches
        ids = [self.device.index] if self.device.type == "cuda" else None
        kw = dict(device_ids=ids, broadcast_buffers=False, process_group=group)
        with warnings.catch_warnings():
            # newer torch renames broadcast_buffers; the GPU boxes' torch 2.11 only knows this name.
            # No buffer broadcasts: activation ranges are merged by sync_activation_ranges and the
            # generator's BN running stats are never used (it always runs in train mode).
            warnings.simplefilter("ignore", FutureWarning)
            self.g_forward = DDP(self.generator, **kw)   # broadcasts rank 0's parameters
            self.q_forward = DDP(self.student, **kw)

    # ------------------------------------------------------------------ hooks
    def _bns_loss(self, bns):
        if self.cfg.bns_stats == "local":
            return super()._bns_loss(bns)
        return global_bns_loss(bns.tensors, bns.layers, self.world_size, self.group)

    def _all_finite(self, total):
        flag = torch.isfinite(total.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)  # every rank decides alike
        return bool(flag.item())

    def _after_observe(self):
        sync_activation_ranges(self.student, self.group)

    def _evaluate(self):
        return evaluate_sharded(self.student, self.eval_data, self.device, self.cfg.channels_last, self.group)

    def _log(self, record):
        # loss averages over all ranks (one all_reduce per logged record); rank 0 writes
        keys = [k for k in LOSS_KEYS_G + LOSS_KEYS_Q if k in record]
        if keys:
            vals = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(vals, group=self.group)
            for k, v in zip(keys, (vals / self.world_size).tolist()):
                record[k] = round(v, 5)
        record.setdefault("world_size", self.world_size)
        record.setdefault("rank_seeds", self.rank_seeds)
        if self.rank == 0:
            super()._log(record)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        state = super().state_dict()
        rngs = [None] * self.world_size
        dist.all_gather_object(rngs, ckpt.rng_state(), group=self.group)  # collective: all ranks call
        state.update(world_size=self.world_size, rank_seeds=self.rank_seeds, rng_per_rank=rngs)
        return state

    def save(self):
        state = self.state_dict()
        directory = os.path.join(self.out_dir, "checkpoints")
        if self.rank == 0:
            ckpt.save_checkpoint(directory, self.epoch, state, keep=self.cfg.keep_checkpoints)
        dist.barrier(group=self.group)  # nobody reports a checkpoint before it exists
        self.last_checkpoint = ckpt.checkpoint_path(directory, self.epoch)
        return self.last_checkpoint

    def _drop_metrics_after(self, iteration):
        if self.rank == 0:  # rank 0 alone owns the log
            super()._drop_metrics_after(iteration)

    def resume(self, path):
        file = super().resume(path)
        state, _ = ckpt.load_checkpoint(file)
        rngs = state.get("rng_per_rank")
        if rngs is not None and len(rngs) == self.world_size:
            ckpt.set_rng_state(rngs[self.rank])
        else:
            # another world size (or a single-process checkpoint): fresh, distinct per-rank streams
            seed_everything(self.rank_seeds[self.rank] + 1_000_003 * (state["iteration"] + 1))
        return file
