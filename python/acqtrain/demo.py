"""`acq demo`: the embedded default, end to end on scikit-learn's digits (no download, CPU).

FP teacher (trained once, cached) -> for W4A4 and W3A3: naive min-max quantization without data
(activation ranges from N(0, 1) noise), GDFQ (ACQ terms off) and ACQ, each evaluated on the held-out
digits split. Every number is measured in this run.
"""
from __future__ import annotations

import json
import os
import time

import torch

from .config import make_config, demo_defaults
from .data import TensorData, evaluate, load_digits_split
from .errors import AcqError
from .quant import calibrate_on_noise, quantize_model
from .teacher import digits_teacher
from .trainer import Trainer, seed_everything
from .viz import sample_grid

DEFAULT_BITS = ((4, 4), (3, 3))


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "acq")


def _onnx_accuracy(student, out_dir: str, test) -> float:
    """Export `student` to out_dir and evaluate its model.onnx with onnxruntime on `test`."""
    from .export import export_student, onnx_run, onnx_session
    export_student(student, out_dir, (1, 16, 16), {"model": "digits_net", "dataset": "digits"})
    session = onnx_session(os.path.join(out_dir, "model.onnx"))
    correct = sum(int((onnx_run(session, x).argmax(1) == y).sum()) for x, y in test)
    return 100.0 * correct / len(test)


def run_demo(work_dir: str, bits=DEFAULT_BITS, seed: int = 0, backend: str = "auto", cache_dir: str | None = None,
             progress: bool = True, export: bool = True, **overrides) -> dict:
    """FP vs naive vs GDFQ vs ACQ on digits for each (w_bits, a_bits) in `bits`; returns the results
    (also written to work_dir/results.json) with a printable "table". export: also export each ACQ
    student (work_dir/wXaY_acq/export) and evaluate its ONNX file with onnxruntime (skipped, with a
    note, when the [export] extra is missing)."""
    from .console import say, warn

    t_start = time.perf_counter()
    base = demo_defaults(seed=seed, backend=backend, progress=progress, **overrides)
    for w, a in bits:  # validate everything before writing anything
        cfg = make_config(**{**base, "w_bits": w, "a_bits": a})
    if cfg.epochs <= cfg.warmup_epochs:
        raise AcqError(f"--epochs {cfg.epochs} <= warm-up epochs ({cfg.warmup_epochs}): the GDFQ and ACQ students "
                       "would never be trained and the table would compare untrained copies")
    from .paths import check_output_dir
    check_output_dir(work_dir, "--work-dir")
    if export:
        from .export import require_export_deps
        try:
            require_export_deps()
        except AcqError as exc:
            warn(f"{exc}: the ACQ students are not exported")
            export = False
    import acq_kernels
    acq_kernels.set_backend(backend)
    _, _, xte, yte = load_digits_split(seed)
    test = TensorData(xte, yte, 512)
    cache = os.path.join(cache_dir or default_cache_dir(), f"digits_teacher_seed{seed}.pt")
    teacher, fp_acc, trained = digits_teacher(cache, seed, progress=progress)
    say(f"FP teacher: {fp_acc:.2f}% on {len(yte)} held-out digits ({'trained' if trained else 'cached'}: {cache})")
    os.makedirs(work_dir, exist_ok=True)
    rows = []
    for w, a in bits:
        row = {"bits": f"W{w}A{a}", "fp": fp_acc}
        seed_everything(seed)
        naive = quantize_model(teacher, w, a, base.get("first_last_bits"), base.get("ste", "pure"))
        calibrate_on_noise(naive, (1, 16, 16), batches=4, batch_size=base["batch_size"])
        row["naive"] = evaluate(naive, test)
        say(f"W{w}A{a} naive min-max (noise ranges): {row['naive']:.2f}%")
        for method, kw in (("gdfq", dict(lambda_acm=0.0, lambda_pair=0.0, lambda_cons=0.0)), ("acq", {})):
            cfg = make_config(**{**base, "w_bits": w, "a_bits": a, **kw})
            out = os.path.join(work_dir, f"w{w}a{a}_{method}")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
            t0 = time.perf_counter()
            trainer = Trainer(cfg, teacher, eval_data=test, out_dir=out)
            res = trainer.fit()
            row[method] = res["final_acc"]
            row[f"{method}_best"] = res["best"]
            row[f"{method}_seconds"] = round(time.perf_counter() - t0, 1)
            say(f"W{w}A{a} {method.upper()}: final {res['final_acc']:.2f}% (best {res['best']['acc']:.2f}% "
                f"at epoch {res['best']['epoch'] + 1}), {row[f'{method}_seconds']}s")
            if method == "acq":
                png = os.path.join(work_dir, f"samples_w{w}a{a}_acq.png")
                sample_grid(trainer.generator, trainer.teacher, png, 10, cfg.latent_dim, cfg.center_range,
                            seed=seed, title=f"ACQ generator (W{w}A{a} run): samples, teacher attention "
                                             "(layer2), center + and target c x")
                row["samples_png"] = png
                if export:
                    row["acq_onnx"] = _onnx_accuracy(trainer.student, os.path.join(out, "export"), test)
                    say(f"W{w}A{a} ACQ exported to {os.path.join(out, 'export')}: onnxruntime "
                        f"{row['acq_onnx']:.2f}% on the same {len(yte)} digits")
            trainer.close()
        rows.append(row)
    results = {"fp_acc": fp_acc, "rows": rows, "seconds_total": round(time.perf_counter() - t_start, 1),
               "settings": {k: v for k, v in base.items() if k != "progress"}, "backend": backend,
               "torch": torch.__version__, "test_size": len(yte)}
    path = os.path.join(work_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    results["table"] = format_table(results)
    results["path"] = path
    return results


def format_table(results: dict) -> str:
    onnx = any("acq_onnx" in r for r in results["rows"])
    lines = ["| bits | FP | naive min-max (noise) | GDFQ | ACQ |" + (" ACQ (ONNX, onnxruntime) |" if onnx else ""),
             "|---|---|---|---|---|" + ("---|" if onnx else "")]
    for r in results["rows"]:
        lines.append(f"| {r['bits']} | {r['fp']:.2f} | {r['naive']:.2f} | {r['gdfq']:.2f} | {r['acq']:.2f} |"
                     + (f" {r['acq_onnx']:.2f} |" if "acq_onnx" in r else (" - |" if onnx else "")))
    lines.append(f"(top-1 % on {results['test_size']} held-out digits; final epoch; {results['seconds_total']}s)")
    return "\n".join(lines)
