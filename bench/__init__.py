"""Benchmark suite: shared case definitions (bench.cases), the harness (bench.harness), the
pytest-benchmark tests (bench/test_bench_*.py) and the report command (python -m bench.report)."""
