"""QAT training-step benchmark: forward + backward + SGD step of eager `prepare_qat` models, float
vs torch's FakeQuantize vs torch's FusedMovingAvgObsFakeQuantize vs acq_kernels.FakeQuant, eager
and under torch.compile, all in one run; each one's overhead over the float step.

    python -m bench.qat_step [--quick] [--no-compile] [--models resnet20 resnet18 mobilenet_v2]

W4A4 as in issue 11: 4-bit per-tensor MovingAverageMinMaxObserver activations (quint8 0..15),
4-bit per-channel symmetric MovingAveragePerChannelMinMaxObserver weights (qint8 -8..7).
Models (random weights; speed does not depend on them): CIFAR ResNet-20 B=128 at 32x32
(acqtrain.models.resnet20), torchvision ResNet-18 and MobileNetV2 B=16 at 112x112 (weights=None).
--quick quarters the batches and compiles ResNet-20 only. Eager variants are timed interleaved
(round r times every variant once), so machine load hits them alike; compiled ones each in its
own process, one after the other (compiling one changes how dynamo treats the code the others
share). The figure is the median step.
Writes bench/results/<machine>-<date>-qat-step[-quick].json and regenerates the README's
qat-step section. GPU rows appear only when run on a GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
SCHEMA = "qat_step/1"  # not bench.report's schema 1: its README tables skip these files
START, END = "<!-- qat-step:start -->", "<!-- qat-step:end -->"

VARIANTS = ("float", "torch_fake_quantize", "torch_fused", "acq_fake_quant")
# (name, batch, quick batch, image size)
MODELS = {"resnet20": (128, 32, 32), "resnet18": (16, 4, 112), "mobilenet_v2": (16, 4, 112)}
TARGETS = {"resnet20_vs_float": 0.15, "vs_torch_best": 0.25}


def _fake_quant_class(variant: str):
    from torch.ao import quantization as tq

    import acq_kernels
    return {"torch_fake_quantize": tq.FakeQuantize, "torch_fused": tq.FusedMovingAvgObsFakeQuantize,
            "acq_fake_quant": acq_kernels.FakeQuant}[variant]


def qconfig(variant: str):
    from torch.ao import quantization as tq
    from torch.ao.quantization.observer import (MovingAverageMinMaxObserver,
                                                MovingAveragePerChannelMinMaxObserver)
    cls = _fake_quant_class(variant)
    return tq.QConfig(
        activation=cls.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=15,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine),
        weight=cls.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-8,
                             quant_max=7, dtype=torch.qint8, qscheme=torch.per_channel_symmetric))


def float_model(name: str) -> nn.Module:
    if name == "resnet20":
        sys.path.insert(0, os.path.join(ROOT, "python"))
        from acqtrain.models import resnet20
        return resnet20(10)
    import torchvision
    if name == "resnet18":
        return torchvision.models.resnet18(weights=None)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(weights=None)
    raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")


def qat_model(name: str, variant: str) -> nn.Module:
    from torch.ao import quantization as tq
    torch.manual_seed(0)
    model = float_model(name).train()
    if variant == "float":
        return model
    model.qconfig = qconfig(variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.prepare_qat(model)


class Step:
    """One model's training step: forward, cross-entropy, backward, SGD with momentum."""

    def __init__(self, name: str, variant: str, batch: int, size: int, device: torch.device,
                 compiled: bool):
        self.model = qat_model(name, variant).to(device)
        classes = 10 if name == "resnet20" else 1000
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, size, size, generator=g).to(device)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.device = device

    def __call__(self) -> float:
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(self.forward(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure(name: str, batch: int, size: int, device: torch.device, compiled: bool,
            rounds: int, warmup: int, log=print) -> list[dict]:
    """Median step time of each variant, timed interleaved; rows with overhead over float.
    Compiled variants are timed one after the other, each in its own process: compiling one
    variant changes how dynamo treats the code objects the others share (measured: the acq
    ResNet-20 step compiled after torch's FakeQuantize model took 241 ms, alone 112 ms), and a
    user compiles one model, not four."""
    if compiled:
        return _measure_in_subprocesses(name, batch, size, device, rounds, warmup, log)
    steps, rows = {}, []
    for v in VARIANTS:
        t0 = time.perf_counter()
        try:
            steps[v] = Step(name, v, batch, size, device, compiled)
            for _ in range(warmup):  # compiles here (forward and backward graphs)
                steps[v]()
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            rows.append(dict(model=name, variant=v, compiled=compiled, error=repr(exc)[:300]))
            steps.pop(v, None)
            continue
        log(f"  {name} {'compiled' if compiled else 'eager'} {v}: ready in "
            f"{time.perf_counter() - t0:.1f} s")
    times = {v: [] for v in steps}
    for _ in range(rounds):
        for v, step in steps.items():
            times[v].append(step())
    return rows + _rows_from_times(name, batch, size, compiled, times)


def _rows_from_times(name, batch, size, compiled, times: dict) -> list[dict]:
    base = statistics.median(times["float"]) if "float" in times else None
    rows = []
    for v, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(model=name, variant=v, compiled=compiled, batch=batch, size=size,
                         median_ms=round(med * 1e3, 3), times_ms=[round(t * 1e3, 3) for t in ts],
                         overhead=round(med / base - 1, 4) if base else None))
    return rows


def _measure_in_subprocesses(name, batch, size, device, rounds, warmup, log) -> list[dict]:
    import subprocess
    times, rows = {}, []
    for v in VARIANTS:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bench.qat_step", "--_one-compiled", name, v, str(batch),
               str(size), str(device), str(rounds), str(warmup)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append(dict(model=name, variant=v, compiled=True, error=err[:300]))
            continue
        times[v] = json.loads(lines[-1])["times_s"]
        log(f"  {name} compiled {v}: {len(times[v])} steps in its own process, "
            f"{time.perf_counter() - t0:.1f} s with compilation")
    return rows + _rows_from_times(name, batch, size, True, times)


def _one_compiled(name, variant, batch, size, device, rounds, warmup) -> None:
    """Child of _measure_in_subprocesses: compile, warm up, time, print the times as JSON."""
    import acq_kernels
    dev = torch.device(device)
    if dev.type == "cpu":
        acq_kernels.tune_cpu_allocator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = Step(name, variant, int(batch), int(size), dev, True)
        for _ in range(int(warmup)):
            step()
        ts = [step() for _ in range(int(rounds))]
    print(json.dumps({"times_s": ts}))


def targets(rows: list[dict]) -> list[dict]:
    """Issue 11's targets for acq_kernels.FakeQuant, per (model, eager/compiled)."""
    out = []
    keys = sorted({(r["model"], r["compiled"]) for r in rows if "median_ms" in r})
    for model, compiled in keys:
        got = {r["variant"]: r for r in rows
               if r["model"] == model and r["compiled"] == compiled and "median_ms" in r}
        if "acq_fake_quant" not in got or "float" not in got:
            continue
        ours = got["acq_fake_quant"]["overhead"]
        torch_best = min((got[v]["overhead"] for v in ("torch_fake_quantize", "torch_fused")
                          if v in got), default=None)
        t = dict(model=model, compiled=compiled, acq_overhead=ours, torch_best_overhead=torch_best)
        if torch_best is not None and torch_best > 0:
            t["acq_over_torch_best"] = round(ours / torch_best, 3)
            t["meets_quarter_of_torch"] = ours <= TARGETS["vs_torch_best"] * torch_best
        if model == "resnet20":
            t["meets_15pct_of_float"] = ours <= TARGETS["resnet20_vs_float"]
        out.append(t)
    return out


def run(args, log=print) -> dict:
    import acq_kernels

    from bench import report
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        acq_kernels.tune_cpu_allocator()
    size_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    rounds = args.rounds or (2 if args.tiny else 5 if args.quick else 11)
    warmup = 1 if args.tiny else 2
    start = _dt.datetime.now(_dt.timezone.utc)
    rows: list[dict] = []
    result = dict(schema=SCHEMA, machine=report.machine_info(device), device=device.type,
                  size=size_name, date=start.isoformat(timespec="seconds"),
                  git_commit=report._git_commit(), rounds=rounds,
                  load_average_before=report._loadavg(), results=rows)
    for name in args.models:
        full_b, quick_b, img = MODELS[name]
        batch = 2 if args.tiny else quick_b if args.quick else full_b
        img = 32 if args.tiny else img
        compile_models = args.compile_models or (["resnet20"] if args.quick else list(MODELS))
        modes = [False] + ([True] if args.compile and name in compile_models else [])
        for compiled in modes:
            log(f"- {name} B={batch} {img}x{img} {'torch.compile' if compiled else 'eager'}")
            rows += measure(name, batch, img, device, compiled, rounds, warmup, log)
    result.update(targets=targets(rows), load_average_after=report._loadavg(),
                  wall_s=round((_dt.datetime.now(_dt.timezone.utc) - start).total_seconds(), 1))
    return result


def table(result: dict) -> str:
    """Markdown: median step (ms) and overhead over float, per model and eager/compiled."""
    lines = ["| model | mode | float ms | torch FakeQuantize | torch Fused | acq FakeQuant |",
             "|---|---|---|---|---|---|"]
    keys = []
    for r in result["results"]:
        if (r["model"], r["compiled"]) not in keys:
            keys.append((r["model"], r["compiled"]))
    for model, compiled in keys:
        got = {r["variant"]: r for r in result["results"]
               if r["model"] == model and r["compiled"] == compiled}
        cells = []
        for v in VARIANTS:
            r = got.get(v)
            if r is None or "median_ms" not in r:
                cells.append("failed" if r else "-")
            elif v == "float":
                cells.append(f"{r['median_ms']:.1f}")
            else:
                cells.append(f"{r['median_ms']:.1f} ({r['overhead']:+.0%})")
        b = next((r["batch"] for r in got.values() if "batch" in r), "?")
        s = next((r["size"] for r in got.values() if "size" in r), "?")
        lines.append(f"| {model} B={b} {s}px | {'compiled' if compiled else 'eager'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(result: dict, out_dir: str) -> str:
    from bench import report
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{report.machine_slug(result['machine'])}-{result['date'][:10]}-qat-step"
    path = os.path.join(out_dir, stem + ("" if result["size"] == "full" else f"-{result['size']}")
                        + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return path


def readme_section(result: dict, json_name: str) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    lines = [START, "<!-- generated by `python -m bench.qat_step` (bench/results/*-qat-step*.json);"
             " do not edit -->", "",
             f"{where}, {result['date']} ({result['size']} run, {result['rounds']} rounds "
             "(eager variants interleaved, compiled ones each in its own process), median "
             f"step; load average {result['load_average_before'][0]} before / "
             f"{result['load_average_after'][0]} after), torch {m['torch']}, commit "
             f"{result.get('git_commit') or 'unknown'}, file `bench/results/{json_name}`. "
             "Cells: median ms of forward + backward + SGD step (overhead over the float step).",
             "", table(result), ""]
    if not any(r.get("compiled") for r in result["results"]):
        lines += ["torch.compile: not measured in this run (`--no-compile`).", ""]
    load = (result.get("load_average_before") or [0])[0]
    if result["device"] == "cpu" and load > 1.5 * m.get("cores", 1):
        lines += [f"**Measured under heavy load** (load average {load} on {m.get('cores')} cores: "
                  "other jobs shared the CPU): the step times are dominated by contention and "
                  "the overheads are noisy; rerun on an idle machine before judging the targets.",
                  ""]
    lines += ["Targets (issue 11, FakeQuant): overhead <= 15% of the float "
             "step on ResNet-20, and <= 1/4 of the best torch module's overhead on every model:", ""]
    for t in result["targets"]:
        parts = [f"acq {t['acq_overhead']:+.0%}"]
        if t.get("torch_best_overhead") is not None:
            parts.append(f"torch best {t['torch_best_overhead']:+.0%}")
        if "meets_quarter_of_torch" in t:
            parts.append("<= 1/4 of torch: " + ("met" if t["meets_quarter_of_torch"] else "NOT met"))
        if "meets_15pct_of_float" in t:
            parts.append("<= 15% of float: " + ("met" if t["meets_15pct_of_float"] else "NOT met"))
        lines.append(f"- {t['model']} {'compiled' if t['compiled'] else 'eager'}: "
                     + ", ".join(parts))
    if result["device"] != "cuda":
        lines += ["", "GPU: not measured (no GPU on the machine that produced this file)."]
    return "\n".join(lines + ["", END])


def update_readme(readme: str, section: str) -> None:
    with open(readme) as f:
        text = f.read()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    with open(readme, "w") as f:
        f.write(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.qat_step", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="quarter batches; compile ResNet-20 only")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-models", nargs="+", default=None, choices=list(MODELS),
                   help="models also timed under torch.compile (default: all; --quick: resnet20)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--no-readme", dest="update_readme", action="store_false")
    p.add_argument("--readme-only", action="store_true",
                   help="only regenerate the README section from the newest result file")
    return p.parse_args(argv)


def newest_result(results_dir: str):
    """(result, file name) of the newest *-qat-step*.json under results_dir, or None."""
    import glob
    files = glob.glob(os.path.join(results_dir, "*-qat-step*.json"))
    if not files:
        return None
    loaded = [(json.load(open(f)), f) for f in files]
    result, path = max(loaded, key=lambda rf: rf[0]["date"])
    return result, os.path.basename(path)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 9 and sys.argv[1] == "--_one-compiled":
        _one_compiled(*sys.argv[2:])
        return 0
    args = parse_args(argv)
    if args.readme_only:
        newest = newest_result(args.out)
        if newest is None:
            print(f"no *-qat-step*.json under {args.out}")
            return 2
        update_readme(args.readme, readme_section(*newest))
        print(f"regenerated the qat-step section of {os.path.relpath(args.readme, ROOT)}")
        return 0
    result = run(args)
    path = write(result, args.out)
    print()
    print(table(result))
    for t in result["targets"]:
        print(t)
    print(f"\nwrote {os.path.relpath(path, ROOT)}")
    if args.update_readme:
        update_readme(args.readme, readme_section(result, os.path.basename(path)))
        print(f"regenerated the qat-step section of {os.path.relpath(args.readme, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
