"""Experiments: one-command paper tables (``python -m experiments``), training entry point, configs, benchmarks."""
