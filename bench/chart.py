"""PNG chart of one result file: forward+backward speedup over the baseline, per case."""
from __future__ import annotations

from bench.summary import ratios
from bench.tables import IMPL_ORDER


def draw(result: dict, path: str) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tab = [e for e in ratios(result["results"]) if e["speedup"]
           and e["mode"] == ("step" if e["family"] == "acq_step" else "fwdbwd")]
    if not tab:
        return None
    impls = [n for n in ("baseline",) + IMPL_ORDER if any(n in e["speedup"] for e in tab)]
    labels = [f"{e['case']}\n[{e['dtype']}]" for e in tab]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tab)), 5.5))
    width = 0.8 / len(impls)
    for k, name in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(tab))]
        ys = [e["speedup"].get(name, 0) for e in tab]
        errs = [e["speedup"].get(name, 0) * e["spread"].get(name, 0) for e in tab]
        ax.bar(xs, ys, width, yerr=errs, label=name, capsize=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(tab)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("speedup over the eager baseline (fwd+bwd; log)")
    m = result["machine"]
    ax.set_title(f"{m.get('gpu') or m['cpu']} ({m['cores']} cores) · torch {m['torch']} · "
                 f"{result['date'][:10]} · {result['size']}", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
