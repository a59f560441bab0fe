"""Benchmarks: each module prints numbers with the machine and data size."""
