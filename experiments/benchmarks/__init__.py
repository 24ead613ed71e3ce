"""Benchmarks: forward+backward time and peak memory per implementation, results under ``results/`` with the
device named. Run one as ``python -m experiments.benchmarks.<name> [--quick]``."""
