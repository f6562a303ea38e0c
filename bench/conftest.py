"""pytest-benchmark settings for bench/ (run: `python -m pytest bench --benchmark-only`).

The repository's pytest config adds --benchmark-disable so that tests/ never times anything;
here benchmarks are the point, so that default is lifted unless given on the command line.
Options: --bench-size quick|full (default: quick on CPU, full on GPU), --bench-compile (also
torch.compile the baselines: ~15 s of compilation per case on CPU), --bench-heavy.
"""
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("acq bench")
    group.addoption("--bench-size", choices=("quick", "full", "tiny"), default=None)
    group.addoption("--bench-compile", action="store_true", default=False)
    group.addoption("--bench-heavy", action="store_true", default=False)
    group.addoption("--bench-rounds", type=int, default=None)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    import acq_kernels
    acq_kernels.tune_cpu_allocator()  # as bench.report does: same allocator for every contender
    if "--benchmark-disable" not in config.invocation_params.args:
        config.option.benchmark_enable = True
