"""Benchmark suite of curvop and its peers; run it with ``python -m benchmarks.run``."""
