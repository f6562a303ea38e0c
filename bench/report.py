"""`python -m bench.report [--quick] [--families ...] [--out bench/results/]`

Runs the benchmark cases (the same ones the pytest-benchmark suite runs), prints a table of
ratios against the pure-PyTorch baseline (medians and spread), writes
<out>/<machine>-<date>[-quick].json (machine, versions, git commit, raw timings) and a PNG chart
beside it, then regenerates the README's results section from every JSON under bench/results/.
`--readme-only` just regenerates the README section.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

import torch

import acq_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    if os.environ.get("ACQ_GIT_COMMIT"):
        return os.environ["ACQ_GIT_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else None
    except Exception:
        return None


def machine_info(device: torch.device) -> dict:
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}", cuda_driver=_driver())
    else:
        info["gpu"] = None
    try:
        from acq_kernels import _extension
        info["extension"] = {k: v for k, v in _extension.build_info().items() if isinstance(v, (str, int, bool))}
    except Exception as exc:
        info["extension"] = {"error": str(exc)}
    return info


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except Exception:
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(info: dict) -> str:
    if info.get("gpu"):
        return slug(info["gpu"])
    return f"{slug(info['cpu'])}-{info['cores']}c"


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pair_with_baseline(rows: list[dict]) -> list[dict]:
    """Compile-pass rows: the compiled contender's rows carry the baseline timed alongside it
    (paired_baseline_*); the re-timed baseline rows themselves are dropped."""
    base = {r["mode"]: r for r in rows if r["impl"] == "baseline" and r.get("median_s")}
    out = []
    for r in rows:
        if r["impl"] == "baseline":
            continue
        b = base.get(r["mode"])
        if b is not None:
            r.update(paired_baseline_s=b["median_s"], paired_baseline_iqr_s=b["iqr_s"],
                     paired_baseline_times_s=b["times_s"])
        out.append(r)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller batches, shorter timing (CPU: ~3 min)")
    p.add_argument("--families", nargs="+", default=None,
                   help="fake_quant attention bn_stats acq_step (default: all); qat_step (opt-in: "
                        "the QAT-step benchmark of bench/qat_step.py, its own JSON and README section)")
    p.add_argument("--cases", default=None, help="regex on case names")
    p.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON and PNG")
    p.add_argument("--tag", default=None,
                   help="appended to the file name (e.g. a partial run: --cases resnet20 --tag resnet20)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtypes", default=None,
                   help="comma list (default: float32 on CPU, float32,bfloat16 on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile of the baseline (slow to compile on CPU)")
    p.add_argument("--heavy", action="store_true", help="include the cases marked heavy on CPU")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 11, quick 5)")
    p.add_argument("--block", type=float, default=None,
                   help="seconds per timed block (default 0.05 on CPU, 0.02 quick / GPU)")
    p.add_argument("--case-budget", type=float, default=None,
                   help="seconds of timing rounds per case, after the first 3 rounds (CPU 40, quick 12; GPU 4)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; contenders not started by then are recorded as skipped")
    p.add_argument("--readme-only", action="store_true", help="only regenerate the README section")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--no-readme", dest="update_readme", action="store_false")
    return p.parse_args(argv)


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, keep what was measured."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def run(args, on_progress=None) -> dict:
    """Measures the chosen cases; `on_progress(result)` is called after each case with the
    results so far, so that a killed run still leaves its measurements behind."""
    from bench import cases as C
    from bench import harness as H

    # Every contender runs under the same allocator; without this, glibc page-faults each large
    # fresh tensor and allocation, not compute, dominates every CPU timing.
    record_allocator = acq_kernels.tune_cpu_allocator()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [getattr(torch, d) for d in (args.dtypes.split(",") if args.dtypes else
                                           (["float32", "bfloat16"] if device.type == "cuda" else ["float32"]))]
    size = "quick" if args.quick else "full"
    # Interleaved rounds of ~block_s blocks per (contender, mode); GPU kernels take ~0.1-1 ms.
    rounds = args.rounds or (5 if args.quick else 11)
    block_s = args.block or (0.02 if args.quick or device.type == "cuda" else 0.05)
    case_budget = args.case_budget or (4.0 if device.type == "cuda" else 12.0 if args.quick else 40.0)
    chosen = [c for c in C.all_cases(args.families)
              if (args.cases is None or re.search(args.cases, c.name))
              and (device.type == "cuda" or args.heavy or not c.heavy)]
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    info = machine_info(device)
    start = _dt.datetime.now(_dt.timezone.utc)
    rows: list[dict] = []
    result = {"schema": 1, "machine": info, "device": device.type, "size": size, "tag": args.tag,
              "date": start.isoformat(timespec="seconds"), "git_commit": _git_commit(),
              "compile": args.compile, "rounds": rounds, "block_s": block_s, "case_budget_s": case_budget,
              "load_average_before": _loadavg(), "d2d_copy_GBps": None,
              "cpu_allocator_tuned": record_allocator, "results": rows}
    print(f"bench.report: {len(chosen)} cases on {device} ({info.get('gpu') or info['cpu']}), size={size}, "
          f"dtypes={[str(d).replace('torch.', '') for d in dtypes]}, compile={args.compile}, "
          f"load average {result['load_average_before']}")

    def finish(interrupted: bool) -> dict:
        result.update(load_average_after=_loadavg(), interrupted=interrupted,
                      wall_s=round((_dt.datetime.now(_dt.timezone.utc) - start).total_seconds(), 1))
        return result

    def budget_spent(case, cfg, impls) -> bool:
        if deadline is None or time.monotonic() < deadline:
            return False
        rows.extend(dict(family=case.family, case=case.name, dtype=str(cfg.dtype).replace("torch.", ""),
                         device=device.type, impl=i.name, mode=m, skipped="time budget spent")
                    for i in impls for m in case.modes)
        return True

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # The copy yardstick of the GPU first: every later GB/s is read against it.
        result["d2d_copy_GBps"] = H.d2d_copy_bandwidth(device)
        # Pass 1: every contender but torch.compile. Pass 2 (float32): torch.compile of the
        # baseline, interleaved with the baseline again, so a time budget is spent on the kernels
        # first and compiled-vs-baseline ratios still come from one interleaved measurement.
        for dtype in dtypes:  # every case in float32 first: a time budget cuts bf16, not cases
            for case in chosen:
                if dtype != torch.float32 and case.family == "acq_step":
                    continue
                cfg = C.Config(device, dtype, size)
                impls = H.implementations(case, device, compile=False)
                if budget_spent(case, cfg, impls):
                    continue
                print(f"- {case.id} [{cfg.dtype}]")
                rows += H.run_case(case, cfg, impls, modes=case.modes, rounds=rounds, block_s=block_s,
                                   deadline=deadline, case_budget_s=case_budget)
                if on_progress:
                    on_progress(finish(True))
        if args.compile:
            for case in sorted(chosen, key=lambda c: not c.quick_compile):
                if not case.compile_ok or (args.quick and not case.quick_compile):
                    continue
                cfg = C.Config(device, torch.float32, size)
                impls = [i for i in H.implementations(case, device, compile=True)
                         if i.name in ("baseline", "compiled")]
                if budget_spent(case, cfg, impls[1:]):
                    continue
                print(f"- {case.id} [{cfg.dtype}] torch.compile")
                rows += pair_with_baseline(H.run_case(case, cfg, impls, modes=case.modes, rounds=rounds,
                                                      block_s=block_s, deadline=deadline,
                                                      case_budget_s=case_budget))
                if on_progress:
                    on_progress(finish(True))
    except (_Terminated, KeyboardInterrupt) as exc:
        rows += getattr(exc, "rows", [])  # the case in flight, with the rounds it completed
        print("bench.report: interrupted; keeping the measurements made so far")
        return finish(True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return finish(False)


def write(result: dict, out_dir: str, chart: bool = True) -> tuple[str, str | None]:
    os.makedirs(out_dir, exist_ok=True)
    stem = (f"{machine_slug(result['machine'])}-{result['date'][:10]}" + ("-quick" if result["size"] == "quick" else "")
            + (f"-{slug(result['tag'])}" if result.get("tag") else ""))
    path = os.path.join(out_dir, stem + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)  # a kill mid-write never leaves a broken file
    png = None
    if not chart:
        return path, None
    try:
        from bench.chart import draw
        png = draw(result, os.path.join(out_dir, stem + ".png"))
    except Exception as exc:  # a chart failure must not lose the JSON
        print(f"chart not drawn: {exc}")
    return path, png


def _run_qat_step(args) -> None:
    """The QAT-step benchmark (bench/qat_step.py) with this run's size, compile and device."""
    from bench import qat_step
    argv = (["--quick"] if args.quick else []) + ([] if args.compile else ["--no-compile"])
    argv += (["--device", args.device] if args.device else []) + ["--out", args.out, "--no-readme"]
    if args.rounds:
        argv += ["--rounds", str(args.rounds)]
    qargs = qat_step.parse_args(argv)
    result = qat_step.run(qargs)
    path = qat_step.write(result, args.out)
    print()
    print(qat_step.table(result))
    print(f"\nwrote {os.path.relpath(path, ROOT)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench import readme, tables
    qat = bool(args.families) and "qat_step" in args.families
    if qat:
        args.families = [f for f in args.families if f != "qat_step"] or None
        if not args.readme_only:
            _run_qat_step(args)
        if args.families is None and not args.cases:  # only the QAT step was asked for
            args.readme_only = True
    if not args.readme_only:
        result = run(args, on_progress=lambda partial: write(partial, args.out, chart=False))
        path, png = write(result, args.out)
        print()
        print(tables.text_table(result))
        print(f"\nwrote {os.path.relpath(path, ROOT)}" + (f" and {os.path.relpath(png, ROOT)}" if png else ""))
    if args.update_readme:
        readme.update(args.readme, RESULTS_DIR)
        print(f"regenerated the results section of {os.path.relpath(args.readme, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
