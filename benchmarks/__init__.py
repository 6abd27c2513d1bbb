"""Benchmarks: run as ``python -m benchmarks.<name> --help`` from the repository root."""
