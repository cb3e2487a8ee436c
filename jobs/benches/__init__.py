"""Benchmark suites for `python -m raymoe.jobs.bench <suite>`."""
