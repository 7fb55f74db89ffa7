"""On-demand benchmarks (not run in CI): `python -m benchmarks.strategies`."""
