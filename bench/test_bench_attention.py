"""pytest-benchmark: the attention cases of bench.cases, every contender, every mode."""
from bench import pytest_support

@pytest_support.parametrize_family("attention")
def test_attention(benchmark, request, case, impl_name, mode):
    pytest_support.run(benchmark, request, case, impl_name, mode)
