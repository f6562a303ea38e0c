"""pytest-benchmark: the bn_stats cases of bench.cases, every contender, every mode."""
from bench import pytest_support

@pytest_support.parametrize_family("bn_stats")
def test_bn_stats(benchmark, request, case, impl_name, mode):
    pytest_support.run(benchmark, request, case, impl_name, mode)
