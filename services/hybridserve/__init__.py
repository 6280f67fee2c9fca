"""hybridserve: per-tenant RAG and per-tenant LoRA adapters on one base model."""

__version__ = "0.1.0"
