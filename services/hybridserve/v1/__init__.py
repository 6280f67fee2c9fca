"""GENERATED from protos/hybridserve/v1 by scripts/gen_protos.py. Do not edit."""
