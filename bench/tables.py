"""Text (terminal) and Markdown (README) renderings of a result file's ratios."""
from __future__ import annotations

from bench.acq_step import LADDER_NAMES
from bench.summary import ratios, targets

IMPL_ORDER = ("native", "compiled", "acq:reference", "acq:cpu", "acq:triton", "acq:cuda", "copy")


def _columns(tab):
    present = {n for e in tab for n in e["speedup"]}
    return [n for n in IMPL_ORDER if n in present]


def _cell(e, name):
    s = e["speedup"].get(name)
    if s is None:
        return "-"
    return f"{s:.2f}x ±{e['spread'][name] * 100:.0f}%"


def _mem(d: dict, fused) -> str:
    if "baseline" not in d or fused not in d:
        return "-"
    return f"{d['baseline']:.1f} / {d[fused]:.1f}"


def _rows(result):
    tab = ratios(result["results"])
    cols = _columns(tab)
    d2d = result.get("d2d_copy_GBps")
    gpu = result.get("device") == "cuda"
    head = (["case", "dtype", "mode", "baseline ms"] + cols
            + ["fused vs native", "fused vs compiled", "fused / copy time", "saved for bwd MB (base / fused)"]
            + (["peak MB (base / fused)", "fused GB/s (of d2d copy)"] if gpu else []))
    body = []
    for e in tab:
        f = e.get("fused")
        row = ([e["case"], e["dtype"], e["mode"], f"{e['baseline_ms']:.3f}" if e["baseline_ms"] else "-"]
               + [_cell(e, c) for c in cols]
               + [f"{e['fused_vs_native']:.2f}x" if e.get("fused_vs_native") else "-",
                  f"{e['fused_vs_compiled']:.2f}x" if e.get("fused_vs_compiled") else "-",
                  f"{e['fused_over_copy']:.2f}" if e.get("fused_over_copy") else "-",
                  _mem(e["saved_MB"], f) if e["mode"] == "fwd" else ""])
        if gpu:
            gbps = e.get("fused_GBps")
            row += [_mem(e["peak_MB"], f) if e["mode"] in ("fwdbwd", "step") else "",
                    f"{gbps:.0f} ({gbps / d2d:.0%})" if gbps and d2d and e["family"] != "acq_step" else "-"]
        body.append(row)
    return head, body


def _ladder_rows(result):
    """The ACQ step's ladder: each rung's speedup over the eager baseline (bench/acq_step.py)."""
    steps = [e for e in ratios(result["results"]) if e["family"] == "acq_step" and e["baseline_ms"]]
    head = (["case", "baseline ms"] + list(LADDER_NAMES)
            + ["full step (fused; + CUDA graphs on GPUs)", "full step on reference kernels"])
    body = [[e["case"], f"{e['baseline_ms']:.1f}"] + [_cell(e, n) for n in LADDER_NAMES]
            + [_cell(e, e["fused"]) if e.get("fused") else "-", _cell(e, "acq:reference")] for e in steps]
    return head, body


def _text(head, body) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]


def _markdown(head, body) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in body])


def text_table(result) -> str:
    lines = ["speedup = baseline median / contender median (higher is better); ± = relative IQR spread"]
    lines += _text(*_rows(result)) + [""]
    ladder = _ladder_rows(result)
    if ladder[1]:
        lines += ["ACQ step, one change at a time (cumulative, vs the eager baseline):"] + _text(*ladder) + [""]
    lines += [f"[{'met' if ok else 'NOT met' if ok is False else '  ?  '}] {t}: {m}"
              for t, m, ok in targets(result["results"], result.get("d2d_copy_GBps"))]
    return "\n".join(lines)


def markdown_table(result) -> str:
    return "\n".join(_markdown(*_rows(result)))


def markdown_ladder(result) -> str:
    """'' when the result has no ACQ step measured."""
    head, body = _ladder_rows(result)
    return "\n".join(_markdown(head, body)) if body else ""


def markdown_targets(result) -> str:
    mark = {True: "met", False: "**not met**", None: "not measured"}
    found = targets(result["results"], result.get("d2d_copy_GBps"))
    if not found:
        return "- none of the issue's targets is about the cases of this run"
    return "\n".join(f"- {t}: {m} — {mark[ok]}" for t, m, ok in found)
