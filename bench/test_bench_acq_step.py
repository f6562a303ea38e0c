"""pytest-benchmark: the acq_step cases of bench.cases, every contender, every mode."""
from bench import pytest_support

@pytest_support.parametrize_family("acq_step")
def test_acq_step(benchmark, request, case, impl_name, mode):
    pytest_support.run(benchmark, request, case, impl_name, mode)
