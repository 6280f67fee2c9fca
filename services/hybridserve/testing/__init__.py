"""Helpers for tests and benchmarks: tiny random checkpoints, adapters, reference generation."""
