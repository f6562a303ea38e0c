"""Glue between the shared cases (bench.cases) and pytest-benchmark: one test per
(case, contender, mode), grouped per case and mode so pytest-benchmark compares them."""
from __future__ import annotations

import pytest
import torch

from bench import cases as C
from bench import harness as H

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_cache: dict = {}


def _impl_names(case: C.Case) -> list[str]:
    return [i.name for i in H.implementations(case, DEVICE, compile=True)]


def parametrize_family(family: str):
    params = []
    for case in C.all_cases([family]):
        for name in _impl_names(case):
            for mode in case.modes:
                marks = [pytest.mark.benchmark(group=f"{case.id} {mode}")]
                params.append(pytest.param(case, name, mode, id=f"{case.name}-{name}-{mode}", marks=marks))
    return pytest.mark.parametrize("case,impl_name,mode", params)


def _workload(case: C.Case, cfg: C.Config):
    key = (case.id, cfg)
    if key not in _cache:
        _cache.clear()  # one case's tensors alive at a time
        torch.manual_seed(0)
        try:
            _cache[key] = case.make(cfg)
        except C.Unavailable as exc:
            _cache[key] = exc
    return _cache[key]


def run(benchmark, request, case: C.Case, impl_name: str, mode: str):
    opt = request.config.getoption
    size = opt("--bench-size") or ("full" if DEVICE.type == "cuda" else "quick")
    if case.heavy and DEVICE.type == "cpu" and not opt("--bench-heavy"):
        pytest.skip("heavy case: run on a GPU or with --bench-heavy")
    impl = next(i for i in H.implementations(case, DEVICE, compile=True) if i.name == impl_name)
    if impl.compiled and not opt("--bench-compile"):
        pytest.skip("torch.compile contenders need --bench-compile")
    if impl.name.startswith("acq:") and not case.acq_available():
        pytest.skip(f"acq_kernels lacks {case.acq_needs}")
    wl = _workload(case, C.Config(DEVICE, torch.float32, size))
    if isinstance(wl, Exception):
        pytest.skip(str(wl))
    with H.backend_in_force(impl.backend):
        runner = H.Runner(impl, wl, DEVICE)
        fn = runner.callable(mode)
        if DEVICE.type == "cuda":
            inner = fn

            def fn():
                inner()
                torch.cuda.synchronize()
        saved, extra = runner.saved_bytes()
        benchmark.extra_info.update(case=case.id, impl=impl.name, mode=mode, shape=wl.label,
                                    saved_bytes=saved, saved_extra_bytes=extra,
                                    peak_bytes=runner.peak_bytes(), compile_s=runner.compile_s,
                                    bytes=wl.io_bytes(mode))
        rounds = opt("--bench-rounds") or (3 if size == "tiny" else 10)
        result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    if mode != "fwd" and impl.name != "copy" and case.modes != ("step",):
        assert all(g is None or torch.isfinite(g).all() for g in result), "non-finite gradient"
