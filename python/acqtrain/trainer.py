"""The ACQ / GDFQ training loop: generator step, student step, schedule, logging, checkpoints."""
from __future__ import annotations

import json
import os
import random
import time
import warnings

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import graph
from . import ops
from .config import Config
from .data import evaluate
from .console import bars_enabled, say
from .errors import AcqError
from .export import state_sha256
from .generator import build_generator
from .losses import (FeatureTap, acm_loss, attention_of, batch_stat_bn, kd_loss, pair_loss,
                     stacked_sq_distance)
from .quant import WEIGHT_TYPES, quantize_model, quantized_output, set_observing

LOSS_KEYS_G = ("g_ce", "g_bns", "g_acm", "g_pair", "g_cons", "g_total")
LOSS_KEYS_Q = ("q_kd", "q_ce", "q_at", "q_total")
GRAPH_WARMUP_STEPS = 3  # eager main-phase steps before a CUDA graph is captured


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: only input gradients flow back to the generator."""
    return teacher.eval().requires_grad_(False)


class Trainer:
    """The ACQ / GDFQ data-free quantization loop for one configuration.

    cfg: the validated run configuration (acqtrain.make_config): bits, schedule, loss weights, device.
    teacher: the full-precision classifier (nn.Module taking [N, C, H, W] float images of the geometry
        of cfg.model and returning [N, classes] logits); frozen in place (eval mode, no gradients).
        The student is a fake-quantized deep copy (acqtrain.quantize_model); a generator of [N, C, H, W]
        images is trained against the teacher.
    eval_data: optional iterable of (images [N, C, H, W], labels [N] int64) batches; evaluated at the
        end of every epoch (the "acc" of the epoch record).
    out_dir: where metrics.jsonl and checkpoints/ go (created at the first write); None: nothing is written.

    fit() runs the remaining epochs and returns {"final_acc", "best", "epochs", "iterations"};
    resume(path) continues from a checkpoint of the same configuration and teacher.
    """

    def __init__(self, cfg: Config, teacher: nn.Module, eval_data=None, out_dir: str | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.eval_data = eval_data
        self.out_dir = out_dir
        seed_everything(cfg.seed)
        self.mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.beta_bns > 0 and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules()):
            raise AcqError(f"the teacher ({type(teacher).__name__}) has no BatchNorm layer for L_BNS; "
                           "set beta_bns to 0")
        self.teacher = freeze_teacher(teacher).to(self.device, memory_format=self.mf)
        self.teacher_sha256 = state_sha256(self.teacher)  # checked on resume: the same teacher, wherever its file
        self.student = quantize_model(self.teacher, cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.ste,
                                      cfg.act_momentum, cfg.weight_range).to(self.device, memory_format=self.mf)
        channels, size = cfg.input_shape
        self.tap_t, self.tap_q = self._attention_taps(channels, size)
        self.generator = build_generator(cfg.classes, size, channels, cfg.latent_dim, cfg.gen_width,
                                         use_center=cfg.lambda_acm > 0, kind=cfg.generator).to(self.device).train()
        # capturable: Adam keeps its step counts on the device, so a CUDA graph can replay its update
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999),
                                      capturable=cfg.cuda_graphs)
        self.opt_q = torch.optim.SGD(self.student.parameters(), lr=cfg.lr_q, momentum=0.9, nesterov=True,
                                     weight_decay=cfg.weight_decay)
        # GDFQ: both learning rates x0.1 at the same absolute epochs (stepped every epoch, warm-up included)
        self.sched_q = torch.optim.lr_scheduler.MultiStepLR(self.opt_q, milestones=list(cfg.q_milestones),
                                                            gamma=0.1)
        self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, milestones=list(cfg.q_milestones),
                                                            gamma=0.1)
        self.epoch = 0           # next epoch to run
        self.iteration = 0       # global iterations done
        self.history: list[dict] = []
        self.best = None
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        # --- distributed/resilience hooks (python/acqtrain/distributed.py swaps in DDP wrappers) ---
        self.g_forward = self.generator   # what the step calls; the raw modules own the state dicts
        self.q_forward = self.student
        self.skipped_steps = 0            # non-finite steps skipped (cfg.skip_nonfinite)
        # On the device, updated in place (a CUDA graph replays the updates): iterations done, and per
        # loss the first iteration whose value was non-finite since the last check (-1: none).
        self._iter_t = torch.zeros((), dtype=torch.long, device=self.device)
        self._first_bad = {k: torch.full((), -1, dtype=torch.long, device=self.device)
                           for k in ("g_total", "q_total")}
        self.last_checkpoint: str | None = None
        self._graph = None                # cfg.cuda_graphs: see _graphed_step
        self._graph_lrs: tuple = ()
        self._graph_losses: dict = {}
        self._graph_warmup_left = GRAPH_WARMUP_STEPS

    def _attention_taps(self, channels: int, size: int):
        """(teacher tap, student tap or None). The teacher is traced (sharing its modules) and run once
        on zeros to check the input geometry; the layers in S get tap points in the traced teacher
        (self.t_forward; self.teacher stays the user's module, no hook on it) and, for attention
        transfer, after the matching quantizers in the student. No tap when no loss term reads
        attention maps."""
        cfg = self.cfg
        traced = graph.trace(self.teacher)
        graph.propagate_shapes(traced, (1, channels, size, size), self.device)
        self.attention_nodes: list[str] = []  # graph nodes of S (teacher and student graphs share names)
        self.t_forward = self.teacher     # what the step calls: the traced teacher with tap points, if any
        if not cfg.needs_attention:
            return None, None
        names = (graph.named_outputs(traced, cfg.attention_layers) if cfg.attention_layers
                 else graph.stage_outputs(traced, WEIGHT_TYPES))
        self.attention_nodes = names
        tap_t = FeatureTap(graph.insert_taps(traced, names))
        self.t_forward = traced
        tap_q = None
        if cfg.lambda_at > 0:
            tap_q = FeatureTap(graph.insert_taps(self.student, names,
                                                 after=lambda n: quantized_output(self.student, n)))
        return tap_t, tap_q

    def autocast(self):
        """The forward passes' precision context (backward and optimizer steps run outside it)."""
        # no autocast cache under CUDA graphs: cached casts would be pool memory of the capture
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16",
                              cache_enabled=not self.cfg.cuda_graphs)

    # ------------------------------------------------------------------ sampling
    def sample(self):
        """(z, y, c) for one batch; with L_PAIR each (y, c) appears twice: [first draws; second draws]."""
        cfg, dev, b = self.cfg, self.device, self.cfg.batch_size
        m = b // 2 if cfg.lambda_pair > 0 else b
        y = torch.randint(0, cfg.classes, (m,), device=dev)
        c = (torch.rand(m, 2, device=dev) * 2 - 1) * cfg.center_range
        if cfg.lambda_pair > 0:
            y, c = torch.cat([y, y]), torch.cat([c, c])
        z = torch.randn(b, cfg.latent_dim, device=dev)
        return z, y, c

    # ------------------------------------------------------------------ steps
    def generator_step(self):
        cfg = self.cfg
        z, y, c = self.sample()
        with self.autocast():
            x, y, t_logits, feats_eval, losses = self._generator_losses(z, y, c)
        self._optimize(losses["g_total"], self.opt_g, "g_total")
        return x.detach(), y, t_logits.detach(), [f.detach() for f in feats_eval], losses

    def _generator_losses(self, z, y, c):
        cfg = self.cfg
        x = self.g_forward(z, y, c).contiguous(memory_format=self.mf)
        zero = x.new_zeros((), dtype=torch.float32)  # losses are fp32 under autocast too
        with self._tapped(self.tap_t) as tap, ops.bn_stat_collector(self.teacher) as bns:
            t_logits = self.t_forward(x)
        feats_eval = tap.feats
        losses = {"g_ce": F.cross_entropy(t_logits, y) if cfg.lambda_ce > 0 else zero,
                  "g_bns": self._bns_loss(bns) if cfg.beta_bns > 0 else zero,
                  "g_acm": zero, "g_pair": zero, "g_cons": zero}
        if cfg.acq_terms_on:
            n = x.shape[0]
            if cfg.lambda_cons > 0:
                # Same batch with batch-statistics BN (running stats untouched); stack eval/train
                # features so each layer's attention is one launch.
                with batch_stat_bn(self.teacher), self.tap_t.capture() as tap2:
                    self.t_forward(x)
                att = attention_of([torch.cat([fe, ft]) for fe, ft in zip(feats_eval, tap2.feats)],
                                   cfg.attention_p)
                losses["g_cons"] = stacked_sq_distance([a[1] for a in att])
                anorms = [a[1][:n] for a in att]
                centers = [a[2][:n] for a in att]
            else:
                att = attention_of(feats_eval, cfg.attention_p)
                anorms = [a[1] for a in att]
                centers = [a[2] for a in att]
            if cfg.lambda_acm > 0:
                losses["g_acm"] = acm_loss(centers, c)
            if cfg.lambda_pair > 0:
                losses["g_pair"] = pair_loss(anorms, cfg.pair_margin)
        total = (cfg.lambda_ce * losses["g_ce"] + cfg.beta_bns * losses["g_bns"] + cfg.lambda_acm * losses["g_acm"]
                 + cfg.lambda_pair * losses["g_pair"] + cfg.lambda_cons * losses["g_cons"])
        losses["g_total"] = total
        return x, y, t_logits, feats_eval, losses

    @staticmethod
    def _tapped(tap):
        return tap.capture() if tap is not None else FeatureTap.nothing()

    def student_step(self, x, y, t_logits, t_feats):
        with self.autocast():
            losses = self._student_losses(x, y, t_logits, t_feats)
        self._optimize(losses["q_total"], self.opt_q, "q_total")
        return losses

    def _student_losses(self, x, y, t_logits, t_feats):
        cfg = self.cfg
        if self.tap_q is not None:
            with self.tap_q.capture() as tap:
                q_logits = self.q_forward(x)
            q_feats = tap.feats
        else:
            q_logits = self.q_forward(x)
        zero = q_logits.new_zeros((), dtype=torch.float32)
        losses = {"q_kd": kd_loss(q_logits, t_logits, cfg.kd_temperature, cfg.kd_reduction),
                  "q_ce": F.cross_entropy(q_logits, y), "q_at": zero}
        if self.tap_q is not None:
            att = attention_of([torch.cat([ft, fq]) for ft, fq in zip(t_feats, q_feats)], cfg.attention_p)
            losses["q_at"] = stacked_sq_distance([a[1] for a in att])
        total = cfg.lambda_kd * losses["q_kd"] + cfg.lambda_ce_q * losses["q_ce"] + cfg.lambda_at * losses["q_at"]
        losses["q_total"] = total
        return losses

    def step(self) -> dict:
        """One iteration at the current epoch's phase; returns the losses as (unsynchronised) tensors.
        With cfg.cuda_graphs the main phase replays a captured graph and the returned tensors are
        overwritten by the next step (read or accumulate them before calling step again)."""
        observing = self.epoch < self.cfg.range_epochs
        set_observing(self.student, observing)
        if self.cfg.cuda_graphs and not observing and self.epoch >= self.cfg.warmup_epochs:
            return self._graphed_step()
        return self._eager_step(observing)

    def _eager_step(self, observing: bool) -> dict:
        x, y, t_logits, t_feats, losses = self.generator_step()
        if self.epoch >= self.cfg.warmup_epochs:
            losses.update(self.student_step(x, y, t_logits, t_feats))
        elif observing:
            with torch.no_grad(), self.autocast():  # warm-up: only G trains, but the ranges follow its images
                self.q_forward(x)
        if observing:
            self._after_observe()
        self._iter_t.add_(1)
        self.iteration += 1
        return losses

    def _graphed_step(self) -> dict:
        """The main-phase step (G and Q train, ranges frozen) as one CUDA graph: after a few eager
        warm-up steps on a side stream (workspaces, optimizer state), the whole step — sampling,
        every forward, both backwards, both optimizer updates — is captured once and replayed, so
        the CPU launches one graph per step. Learning rates are baked into the captured kernels:
        an LR milestone re-captures."""
        lrs = tuple(g["lr"] for opt in (self.opt_g, self.opt_q) for g in opt.param_groups)
        if self._graph is not None and lrs != self._graph_lrs:
            self._graph = None
        if self._graph is None:
            if self._graph_warmup_left > 0:
                self._graph_warmup_left -= 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    losses = self._eager_step(False)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return losses
            self._capture(lrs)
        self._graph.replay()
        self.iteration += 1
        return self._graph_losses

    def _capture(self, lrs: tuple) -> None:
        self.opt_g.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's pool
        self.opt_q.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records only: the first replay runs this step
                x, y, t_logits, t_feats, losses = self.generator_step()
                losses.update(self.student_step(x, y, t_logits, t_feats))
                self._iter_t.add_(1)
        except RuntimeError as exc:
            raise AcqError(f"capturing the training step as a CUDA graph failed ({exc}); "
                           "run without --cuda-graphs") from exc
        self._graph, self._graph_lrs, self._graph_losses = graph, lrs, losses

    # ------------------------------------------------------------------ loop
    def _log(self, record: dict) -> None:
        if self.metrics_path:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_epoch(self, progress: bool | None = None) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        show = bars_enabled(cfg.progress if progress is None else progress)
        bar = tqdm(range(cfg.iters_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not show,
                   leave=False, dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        for i in bar:
            losses = self.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
            if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.iters_per_epoch:
                # the only host syncs of the loop: every log_every iterations
                self._check_nonfinite()
                running = {k: round(float(v) / (i + 1), 5) for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.3g}" for k, v in running.items() if k.endswith("total")
                                 or k in ("g_ce", "g_bns", "q_kd")})
                self._log({"kind": "step", "epoch": self.epoch, "iteration": self.iteration, **running})
        bar.close()
        summary = {"kind": "epoch", "epoch": self.epoch, "iteration": self.iteration,
                   "seconds": round(time.perf_counter() - t0, 3),
                   "lr_g": self.opt_g.param_groups[0]["lr"], "lr_q": self.opt_q.param_groups[0]["lr"],
                   "skipped_steps": self.skipped_steps,
                   **{k: round(float(v) / cfg.iters_per_epoch, 5) for k, v in sums.items()}}
        with warnings.catch_warnings():  # in warm-up Q has not stepped yet: its LR still follows the epochs
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.sched_q.step()
        self.sched_g.step()
        if self.eval_data is not None:
            set_observing(self.student, False)
            summary["acc"] = self._evaluate()
            if self.best is None or summary["acc"] > self.best["acc"]:
                self.best = {"epoch": self.epoch, "acc": summary["acc"]}
        self._log(summary)
        self.history.append(summary)
        self.epoch += 1
        if self.out_dir:
            self.save()
        return summary

    def fit(self, epoch_lines: bool = True) -> dict:
        """Run the remaining epochs; one summary line per epoch on stdout unless epoch_lines=False
        (cfg.progress only switches the progress bars)."""
        while self.epoch < self.cfg.epochs:
            s = self.run_epoch()
            if epoch_lines and getattr(self, "rank", 0) == 0:  # under torchrun: rank 0 alone
                acc = f", acc {s['acc']:.2f}%" if "acc" in s else ""
                phase = " (warm-up: student not trained)" if s["epoch"] < self.cfg.warmup_epochs else ""
                say(f"epoch {s['epoch'] + 1}/{self.cfg.epochs}: g_total {s['g_total']:.4f}"
                    + (f", q_total {s['q_total']:.4f}" if "q_total" in s else "") + acc
                    + f" ({s['seconds']:.1f}s){phase}")
        result = {"final_acc": self.history[-1].get("acc") if self.history else None, "best": self.best,
                  "epochs": self.cfg.epochs, "iterations": self.iteration}
        return result

    # ------------------------------------------------------------------ hooks (overridden for torch.distributed)
    def _bns_loss(self, bns):
        return bns.loss()[0]

    def _all_finite(self, total: torch.Tensor) -> bool:
        return bool(torch.isfinite(total.detach()))

    def _after_observe(self) -> None:
        """After a step that updated the activation ranges (distributed: keep ranks in sync)."""

    def _evaluate(self) -> float:
        return evaluate(self.student, self.eval_data, self.device, self.cfg.channels_last)

    # Checked before each update (one host sync per step) when steps must be skipped or when ranks
    # must agree; otherwise the first non-finite step is noted on the device and reported at the
    # next log point (the loop's existing sync), which always precedes the epoch's checkpoint.
    immediate_finite_check = False

    def _nonfinite_error(self, name: str, epoch: int, iteration: int):
        return AcqError(f"non-finite {name} at epoch {epoch + 1}, iteration {iteration}; "
                        f"last good checkpoint: {self.last_checkpoint or 'none (nothing saved yet)'}")

    def _optimize(self, total: torch.Tensor, opt, name: str) -> None:
        """zero_grad / backward / step; a non-finite loss stops the run (AcqError naming the step and
        the last good checkpoint) or, with cfg.skip_nonfinite, skips this update and counts it."""
        skip = self.cfg.skip_nonfinite
        if skip or self.immediate_finite_check:
            if not self._all_finite(total):
                if not skip:
                    raise self._nonfinite_error(name, self.epoch, self.iteration + 1)
                self.skipped_steps += 1
                opt.zero_grad(set_to_none=True)
                return
        else:
            prev = self._first_bad[name]
            bad = (prev < 0) & ~torch.isfinite(total.detach())
            prev.copy_(torch.where(bad, self._iter_t + 1, prev))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    def _check_nonfinite(self) -> None:
        """Raise for the first non-finite loss noted since the last check (host sync)."""
        firsts = torch.stack(list(self._first_bad.values())).tolist()
        found = [(v, k) for v, k in zip(firsts, self._first_bad) if v >= 0]
        for v in self._first_bad.values():
            v.fill_(-1)
        if found:
            it, name = min(found)
            raise self._nonfinite_error(name, self.epoch, it)

    def close(self) -> None:
        """Remove the feature hooks (they sit on this trainer's traced copies, not on the user's teacher)."""
        for tap in (self.tap_t, self.tap_q):
            if tap is not None:
                tap.remove()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "identity": self.cfg.identity(), "epoch": self.epoch,
                "iteration": self.iteration, "generator": self.generator.state_dict(),
                "student": self.student.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_q": self.opt_q.state_dict(), "sched_q": self.sched_q.state_dict(),
                "sched_g": self.sched_g.state_dict(),
                "history": self.history, "best": self.best, "rng": ckpt.rng_state(),
                "skipped_steps": self.skipped_steps, "teacher_sha256": self.teacher_sha256}

    def save(self) -> str:
        self.last_checkpoint = ckpt.save_checkpoint(os.path.join(self.out_dir, "checkpoints"), self.epoch,
                                                    self.state_dict(), keep=self.cfg.keep_checkpoints)
        return self.last_checkpoint

    def resume(self, path: str) -> str:
        state, file = ckpt.load_checkpoint(path)
        ckpt.check_config_matches(state["identity"], self.cfg.identity(), file)
        ckpt.check_teacher(state, self.teacher_sha256, self.cfg.teacher_weights or f"({self.cfg.model})", file)
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_q.load_state_dict(state["opt_q"])
        self.sched_q.load_state_dict(state["sched_q"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self._iter_t.fill_(self.iteration)
        self._graph = None  # captured against the state before loading
        self.history, self.best = state["history"], state["best"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.last_checkpoint = file
        ckpt.set_rng_state(state["rng"])
        self._drop_metrics_after(self.iteration)
        return file

    def _drop_metrics_after(self, iteration: int) -> None:
        """A run killed mid-epoch logged steps past its last checkpoint; the resumed run logs them
        again, so drop those records (atomically) to keep metrics.jsonl one line per step."""
        if not self.metrics_path or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except ValueError:  # a line cut short by the kill
                pass
        if len(keep) != len(lines):
            ckpt.atomic_write_text(self.metrics_path, "".join(keep))
