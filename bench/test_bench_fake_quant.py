"""pytest-benchmark: the fake_quant cases of bench.cases, every contender, every mode."""
from bench import pytest_support

@pytest_support.parametrize_family("fake_quant")
def test_fake_quant(benchmark, request, case, impl_name, mode):
    pytest_support.run(benchmark, request, case, impl_name, mode)
