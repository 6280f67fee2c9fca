"""Helpers for tests and benchmarks, kept out of the installed package.

`tiny` (tiny random Llama checkpoints, seeded PEFT adapters, the transformers
reference for greedy generation), `synthetic` (fine-tuning data), `postgres` and
`kube` (a real PostgreSQL and a real kube-apiserver on loopback).

Importable from the repository root: pytest puts it on `sys.path` (the
`pythonpath` option in pyproject.toml) and each benchmark inserts the root at
its top. The helpers run in the test or benchmark process only: nothing of
them is passed to Ray workers or subprocesses.
"""
