"""Runs one case: builds its contenders, times forward / backward / forward+backward with
torch.utils.benchmark, and measures memory (bytes saved for backward; peak CUDA memory).

Timing rules: every contender of a case runs on the same inputs in the same process; warm-up
(and torch.compile's compilation, timed separately) is excluded; medians and IQRs come from
interleaved rounds of `Timer.timeit` blocks (see run_case).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import torch
from torch.utils.benchmark import Timer

import acq_kernels
from acq_kernels import _backend
from bench.cases import MODES, Case, Config, Unavailable, Workload


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str                 # baseline | native | compiled | acq:<backend> | copy | a ladder rung
    fn: Callable | None
    backend: str | None = None
    compiled: bool = False
    wrap: bool = True         # compiled: torch.compile(fn) (False: fn compiles what it needs itself)


def implementations(case: Case, device: torch.device, compile: bool = True,
                    backends: tuple | None = None) -> list[Impl]:
    step = "step" in case.modes
    impls = [Impl("baseline", case.baseline)] + [Impl(name, fn) for name, fn in case.ladder]
    if case.native is not None:
        impls.append(Impl("native", case.native))
    if compile and case.compile_ok:
        impls.append(Impl("compiled", case.compiled or case.baseline, compiled=True, wrap=case.compiled is None))
    if case.acq is not None:
        names = backends or ("reference",) + tuple(
            b for b in ("cpu", "triton", "cuda") if _backend.backend_usable(b, device))
        impls += [Impl(f"acq:{b}", case.acq, backend=b) for b in names]
    if not step:  # a training step has no "same bytes" to copy
        impls.append(Impl("copy", None))
    return impls


def flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flat_tensors(o)]
    return []


@contextlib.contextmanager
def backend_in_force(name: str | None):
    """Process-wide, not thread-scoped: autograd runs CUDA backwards on its own threads."""
    if name is None:
        yield
        return
    before = _backend._global_choice
    acq_kernels.set_backend(name)
    try:
        yield
    finally:
        _backend._global_choice = before


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The "bwd" timing re-runs one graph's backward (retain_graph), which AOTAutograd's donated
# buffers forbid; donation only lets a compiled backward reuse saved memory, so it is switched
# off for this process (it is part of the compile cache key: patching it per call recompiles).
try:
    import torch._functorch.config as _functorch_config
    _functorch_config.donated_buffer = False
except (ImportError, AttributeError):  # older torch: no donation, nothing to switch off
    pass


class Runner:
    """The three timed callables of one contender on one workload."""

    def __init__(self, impl: Impl, wl: Workload, device: torch.device):
        self.impl, self.wl, self.device = impl, wl, device
        self.compile_s = None
        if impl.name == "copy":
            self._copy_setup()
            return
        if impl.compiled:
            torch._dynamo.reset()  # fresh cache per case: no recompile limit, no stale graphs
            fn = torch.compile(impl.fn, dynamic=False) if impl.wrap else impl.fn
        else:
            fn = impl.fn
        self.fwd_fn = lambda: fn(**wl.kwargs)
        t0 = time.perf_counter()
        self._first_call(impl, wl, device, t0)

    def _first_call(self, impl, wl, device, t0):
        """One forward (+ backward): compiles the compiled contender, makes the output grads."""
        if not wl.leaves:  # a whole training step: one callable, nothing to differentiate here
            self.fwd_fn()
            _sync(device)
            if impl.compiled:
                self.compile_s = time.perf_counter() - t0
            return
        outs = self._diff_outputs(self.fwd_fn())
        if not outs:
            raise Unavailable("no differentiable output")
        gen = torch.Generator(device=device).manual_seed(0)
        self.grads = [torch.randn(o.shape, generator=gen, device=device, dtype=o.dtype) for o in outs]
        torch.autograd.grad(outs, wl.leaves, self.grads, allow_unused=True)  # compiles the backward
        _sync(device)
        if impl.compiled:
            self.compile_s = time.perf_counter() - t0

    @staticmethod
    def _diff_outputs(out):
        return [t for t in flat_tensors(out) if t.requires_grad]

    def _copy_setup(self):
        src = self.wl.data
        dst = [torch.empty_like(t) for t in src]
        grads = [torch.randn_like(t) for t in src]
        gdst = [torch.empty_like(t) for t in src]

        def fwd():
            for d, s in zip(dst, src):
                d.copy_(s.detach())

        def bwd():
            for d, g in zip(gdst, grads):
                d.copy_(g)

        self.fwd_fn = fwd
        self._copy = {"fwd": fwd, "bwd": bwd, "fwdbwd": lambda: (fwd(), bwd())}

    def callable(self, mode: str) -> Callable[[], object]:
        if self.impl.name == "copy":
            return self._copy[mode]
        if mode == "step":
            return self.fwd_fn
        leaves, grads = self.wl.leaves, self.grads
        if mode == "fwd":
            return self.fwd_fn
        if mode == "fwdbwd":
            def fwdbwd():
                outs = self._diff_outputs(self.fwd_fn())
                return torch.autograd.grad(outs, leaves, grads, allow_unused=True)
            return fwdbwd
        if mode == "bwd":
            # One graph, differentiated repeatedly; autograd.grad (not .backward) so no
            # gradient accumulation kernel is timed.
            outs = self._diff_outputs(self.fwd_fn())
            return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def saved_bytes(self) -> tuple[int, int] | tuple[None, None]:
        """Bytes of tensors saved for backward by one forward (unique storages), and the part of
        them that is not an input (i.e. extra memory the graph keeps alive)."""
        if self.impl.name == "copy" or not self.wl.leaves:
            return None, None
        seen: dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except Exception:  # e.g. tensor subclasses without storage
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.fwd_fn()
        del out
        inputs = {t.untyped_storage().data_ptr() for t in flat_tensors(self.wl.kwargs)}
        total = sum(seen.values())
        extra = sum(n for p, n in seen.items() if p not in inputs)
        return total, extra

    def peak_bytes(self) -> int | None:
        """Peak CUDA memory of one forward+backward above what was allocated before it."""
        if self.device.type != "cuda":
            return None
        fn = self.callable("fwdbwd" if self.wl.leaves else "step")
        _sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        _sync(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base


def measure(fn: Callable, min_run_time: float, min_samples: int = 3) -> dict:
    """Median/IQR of per-call seconds. The block count is forced to >= min_samples even when
    one call outlasts min_run_time (blocked_autorange alone would stop after one block)."""
    fn()  # warm-up (caches, allocator, autotuning)
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    one = time.perf_counter() - t0
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=max(min_run_time, min_samples * one * 1.05))
    return {"median_s": m.median, "iqr_s": m.iqr, "times_s": [float(t) for t in m.times],
            "number_per_run": m.number_per_run, "samples": len(m.times)}


def _err(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class _Timed:
    """One (contender, mode) being timed: blocks of `number` calls, one block per round."""

    def __init__(self, impl: Impl, mode: str, fn: Callable, row: dict):
        self.impl, self.mode, self.row = impl, mode, row
        self.timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        self.number = 1
        self.samples: list[float] = []
        self.blocks: list[int] = []  # calls per block, per sample

    def block(self, number: int) -> float:
        before = _backend._global_choice
        if self.impl.backend is not None:
            _backend._global_choice = self.impl.backend
        try:
            return self.timer.timeit(number).median  # seconds per call (synchronised on GPUs)
        finally:
            _backend._global_choice = before


def _quantiles(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[1]), float(q[2] - q[0])


def run_case(case: Case, cfg: Config, impls: list[Impl], modes=MODES, rounds: int = 7,
             block_s: float = 0.02, log=print, deadline: float | None = None,
             case_budget_s: float | None = None) -> list[dict]:
    """Rows {case, impl, mode, median_s, iqr_s, ...} for every contender x mode.

    All (contender, mode) pairs of the case are timed *interleaved*: each round runs one block of
    every pair (in alternating order), so load from other processes and clock drift hit all
    contenders alike and the ratios stay meaningful on a shared machine. A block repeats the call
    enough times to last ~block_s. After 3 rounds, timing stops early once the case has used
    case_budget_s seconds or the run's deadline has passed. Failures become rows with an `error`; the others still run."""
    base = {"family": case.family, "case": case.name, "dtype": str(cfg.dtype).replace("torch.", ""),
            "device": cfg.device.type}
    try:
        torch.manual_seed(0)
        wl = case.make(cfg)
    except Unavailable as exc:
        return [dict(base, impl=i.name, mode=m, skipped=str(exc)) for i in impls for m in modes]
    except Exception as exc:  # noqa: BLE001 - a broken case must not stop the run
        err = _err(exc)
        log(f"  {case.id}: building the inputs failed: {err}")
        return [dict(base, impl=i.name, mode=m, error=err) for i in impls for m in modes]
    base["shape"] = wl.label
    rows, timed = [], []
    for impl in impls:
        if impl.name.startswith("acq:") and not case.acq_available():
            missing = [n for n in case.acq_needs if not hasattr(acq_kernels, n)]
            rows += [dict(base, impl=impl.name, mode=m, skipped=f"acq_kernels lacks {missing}") for m in modes]
            continue
        if deadline is not None and time.monotonic() > deadline:
            rows += [dict(base, impl=impl.name, mode=m, skipped="time budget spent") for m in modes]
            continue
        with backend_in_force(impl.backend):
            try:
                runner = Runner(impl, wl, cfg.device)
                saved, saved_extra = runner.saved_bytes()
                peak = runner.peak_bytes()
            except Unavailable as exc:
                rows += [dict(base, impl=impl.name, mode=m, skipped=str(exc)) for m in modes]
                continue
            except Exception as exc:  # noqa: BLE001 - recorded, and the other contenders still run
                err = _err(exc)
                log(f"  {case.id} {impl.name}: {err}")
                rows += [dict(base, impl=impl.name, mode=m, error=err) for m in modes]
                continue
            for mode in modes:
                row = dict(base, impl=impl.name, mode=mode, bytes=wl.io_bytes(mode), saved_bytes=saved,
                           saved_extra_bytes=saved_extra, peak_bytes=peak, compile_s=runner.compile_s)
                rows.append(row)
                try:
                    fn = runner.callable(mode)
                    t = _Timed(impl, mode, fn, row)  # the calibration block below also warms up
                    t.number = max(1, round(block_s / max(t.block(1), 1e-7)))
                    timed.append(t)
                except Exception as exc:  # noqa: BLE001
                    row["error"] = _err(exc)
                    log(f"  {case.id} {impl.name} {mode}: {row['error']}")
    t_start = time.monotonic()
    try:
        _rounds(timed, rounds, block_s, t_start, deadline, case_budget_s)
    except BaseException as exc:  # interrupted (SIGTERM, Ctrl-C): keep the rounds already timed
        _finalize(timed, log)
        exc.rows = rows
        raise
    _finalize(timed, log)
    return rows


def _rounds(timed, rounds, block_s, t_start, deadline, case_budget_s):
    for r in range(rounds):
        for t in (timed if r % 2 == 0 else reversed(timed)):
            if "error" in t.row:
                continue
            try:
                per_call = t.block(t.number)
                t.samples.append(per_call)
                t.blocks.append(t.number)
                # keep blocks near block_s as load changes (a calibration under load misleads)
                t.number = max(1, min(4 * t.number, round(block_s / max(per_call, 1e-7))))
            except Exception as exc:  # noqa: BLE001
                t.row["error"] = _err(exc)
        now = time.monotonic()
        if r >= 2 and ((deadline is not None and now > deadline)
                       or (case_budget_s is not None and now - t_start > case_budget_s)):
            break


def _finalize(timed, log):
    for t in timed:
        ok = [x for x in t.samples if x > 0]
        if "error" in t.row or not ok:
            continue
        med, iqr = _quantiles(ok)
        t.row.update(median_s=med, iqr_s=iqr, min_s=min(ok), times_s=ok, calls_per_block=t.blocks,
                     samples=len(ok))
        t.row["GBps"] = t.row["bytes"] / med / 1e9
        log(f"  {t.row['family'] + '/' + t.row['case']:50s} {t.impl.name:14s} {t.mode:7s} {med * 1e3:9.3f} ms "
            f"(IQR {iqr * 1e3:.3f}, {len(ok)} blocks)")


def d2d_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """GB/s of a large device-to-device copy (read + write counted), the GPU yardstick."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), min_run_time=0.5)
    return 2 * nbytes / m["median_s"] / 1e9
