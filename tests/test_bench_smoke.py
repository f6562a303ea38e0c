"""Smoke test of the benchmark suite: every case of bench.cases runs once, at a tiny size, on every
contender usable here, in every mode — so CI catches a broken benchmark. It also checks that
each eager baseline computes what the library's reference backend computes (a benchmark that
compares different maths would be meaningless)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `bench` package

from bench import cases as C  # noqa: E402
from bench import harness as H  # noqa: E402

CPU = torch.device("cpu")
TINY = C.Config(CPU, torch.float32, "tiny")
# The acq_step cases drive a whole trainer; at tiny size only the embedded model is cheap enough.
SMOKE_CASES = [c for c in C.all_cases() if not (c.family == "acq_step" and c.heavy)]


def _finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point())


@pytest.mark.parametrize("case", SMOKE_CASES, ids=lambda c: c.id)
def test_case_runs_once_per_contender_and_mode(case):
    # Triton under the interpreter is exercised by the kernel tests; here it would only be slow.
    backends = tuple(b for b in ("reference", "cpu") if b == "reference" or H._backend.backend_usable(b, CPU))
    impls = [i for i in H.implementations(case, CPU, compile=False, backends=backends)]
    try:
        wl = case.make(TINY)
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    ran = 0
    for impl in impls:
        if impl.name.startswith("acq:") and not case.acq_available():
            continue
        with H.backend_in_force(impl.backend):
            runner = H.Runner(impl, wl, CPU)
            for mode in case.modes:
                out = runner.callable(mode)()
                if mode != "step":
                    assert _finite(H.flat_tensors(out)), (impl.name, mode)
                else:
                    # the eager baseline reads its losses on the host each step (floats)
                    assert all(math.isfinite(float(v.detach() if torch.is_tensor(v) else v))
                               for v in out.values()), out
                ran += 1
    assert ran >= 2 * len(case.modes)  # at least the baseline and one other contender
    if case.modes != ("step",):
        assert wl.io_bytes("fwdbwd") == 2 * wl.io_bytes("fwd") > 0


@pytest.mark.parametrize("case", [c for c in SMOKE_CASES if c.family != "acq_step"], ids=lambda c: c.id)
def test_baseline_matches_the_reference_backend(case):
    if not case.acq_available():
        pytest.skip(f"acq_kernels lacks {case.acq_needs}")
    torch.manual_seed(0)
    wl_a = case.make(TINY)
    torch.manual_seed(0)
    wl_b = case.make(TINY)  # fresh state (observers update theirs in place)
    base = H.flat_tensors(case.baseline(**wl_a.kwargs))
    with H.backend_in_force("reference"):
        ref = H.flat_tensors(case.acq(**wl_b.kwargs))
    assert len(base) == len(ref)
    for b, r in zip(base, ref):
        assert b.shape == r.shape
        torch.testing.assert_close(b.float(), r.float(), rtol=1e-4, atol=1e-5)


def test_report_tables_and_readme(tmp_path):
    """The report's table, chart and README section from one tiny measured case."""
    from bench import readme, report, tables
    case = C.FAKE_QUANT[0]
    rows = H.run_case(case, TINY, H.implementations(case, CPU, compile=False, backends=("reference",)),
                      rounds=3, block_s=0.001, log=lambda *_: None)
    result = {"schema": 1, "machine": report.machine_info(CPU), "device": "cpu", "size": "tiny",
              "date": "2000-01-01T00:00:00+00:00", "git_commit": None, "compile": False, "wall_s": 0,
              "d2d_copy_GBps": None, "results": rows}
    path, png = report.write(result, str(tmp_path))
    assert os.path.exists(path) and png and os.path.getsize(png) > 0
    text = tables.text_table(result)
    assert "per_tensor" in text and "fwdbwd" in text
    md = tmp_path / "README.md"
    md.write_text("# x\n\nintro\n")
    readme.update(str(md), str(tmp_path))
    readme.update(str(md), str(tmp_path))  # idempotent: one section, regenerated in place
    body = md.read_text()
    assert body.count(readme.START) == 1 and body.startswith("# x\n\nintro\n")
    assert "GPU figures are not yet measured" in body and "| per_tensor |" in body


def test_acq_step_ladder_and_compiled_contender(tmp_path):
    """The step's ladder rungs and its torch.compile'd baseline run, and the report lays the
    ladder out as its own table (text and README)."""
    from bench import acq_step, readme, tables
    case = next(c for c in acq_step.CASES if not c.heavy)
    impls = H.implementations(case, CPU, compile=True, backends=("reference",))
    names = [i.name for i in impls]
    assert names[:1 + len(acq_step.LADDER)] == ["baseline", *acq_step.LADDER_NAMES]
    assert "compiled" in names and "acq:reference" in names
    rows = H.run_case(case, TINY, impls, modes=case.modes, rounds=3, block_s=0.001, log=lambda *_: None)
    assert not [r for r in rows if r.get("error")], rows
    assert {r["impl"] for r in rows if r.get("median_s")} == set(names)
    # a fake fused backend row so the "full step (fused)" column has a value
    rows.append(dict(next(r for r in rows if r["impl"] == "acq:reference"), impl="acq:cpu"))
    result = {"schema": 1, "machine": {"cpu": "test", "cores": 1, "torch": "x", "python": "x"}, "device": "cpu",
              "size": "tiny", "date": "2000-01-01T00:00:00+00:00", "results": rows}
    text = tables.text_table(result)
    assert "one change at a time" in text and "+channels_last" in text and "embedded_b64" in text
    ladder = tables.markdown_ladder(result)
    assert ladder.count("\n") == 2 and "+frozen_teacher" in ladder
    (tmp_path / "r.json").write_text(__import__("json").dumps(result))
    assert "one change at a time" in readme.section(str(tmp_path), str(tmp_path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_qat_step_benchmark(tmp_path):
    """bench.qat_step at a tiny size (eager): every variant times real steps, the targets and
    the README section come out of the measured rows."""
    from bench import qat_step
    rows = qat_step.measure("resnet20", 2, 16, CPU, compiled=False, rounds=2, warmup=1,
                            log=lambda *_: None)
    assert [r["variant"] for r in rows] == list(qat_step.VARIANTS)
    assert all(r["median_ms"] > 0 and len(r["times_ms"]) == 2 for r in rows), rows
    assert rows[0]["overhead"] == 0
    result = {"schema": qat_step.SCHEMA, "machine": {"cpu": "test cpu", "cores": 2, "torch": "x"},
              "device": "cpu", "size": "tiny", "date": "2000-01-01T00:00:00+00:00",
              "git_commit": None, "rounds": 2, "load_average_before": [1.0],
              "load_average_after": [1.0], "results": rows, "targets": qat_step.targets(rows)}
    (t,) = result["targets"]
    assert t["model"] == "resnet20" and "meets_15pct_of_float" in t
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{qat_step.START}\nold\n{qat_step.END}\noutro\n")
    qat_step.update_readme(str(readme), qat_step.readme_section(result, "x.json"))
    text = readme.read_text()
    assert "old" not in text and "| resnet20 B=2 16px | eager |" in text and text.endswith("outro\n")
    # bench.report's README regeneration refreshes this section too, from the newest file
    from bench import readme as bench_readme
    results = tmp_path / "results"
    qat_step.write(result, str(results))
    both = tmp_path / "BOTH.md"
    both.write_text(f"# x\n{qat_step.START}\nstale\n{qat_step.END}\n")
    bench_readme.update(str(both), str(results))
    text = both.read_text()
    assert "stale" not in text and "| resnet20 B=2 16px | eager |" in text
    assert text.count(bench_readme.START) == 1  # the results section (no bench.report JSON here)


def test_qat_step_compiled_variants_run_each_in_its_own_process(monkeypatch):
    """Compiled variants: one child process each (its times as JSON); a child that fails is an
    error row, not a lost run."""
    import subprocess
    import types

    from bench import qat_step
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        variant = cmd[cmd.index("--_one-compiled") + 2]
        if variant == "torch_fake_quantize":
            return types.SimpleNamespace(returncode=1, stdout="", stderr="Traceback\nRuntimeError: boom")
        t = {"float": 0.1, "torch_fused": 0.3, "acq_fake_quant": 0.11}[variant]
        return types.SimpleNamespace(returncode=0, stdout='noise\n{"times_s": [%s, %s]}\n' % (t, t),
                                     stderr="")
    monkeypatch.setattr(subprocess, "run", fake_run)
    rows = qat_step.measure("resnet20", 2, 16, CPU, compiled=True, rounds=2, warmup=1,
                            log=lambda *_: None)
    assert len(calls) == len(qat_step.VARIANTS)
    by = {r["variant"]: r for r in rows}
    assert by["torch_fake_quantize"]["error"].endswith("boom")
    assert by["float"]["overhead"] == 0 and by["torch_fused"]["overhead"] == pytest.approx(2.0)
    assert by["acq_fake_quant"]["median_ms"] == pytest.approx(110.0)
    assert all(r["compiled"] for r in rows)
