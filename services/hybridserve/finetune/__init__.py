"""Fine-tune, evaluate and register a tenant's LoRA adapter: `hybridserve finetune`.

    from hybridserve.finetune import TrainConfig, finetune
    result = finetune(cfg, "examples.jsonl", "support-formal", TrainConfig(steps=60))
    result.record.id   # "support-formal@<first 12 hex digits of the content hash>"

Modules: `data` (JSONL validation, split, chat-template tokenising), `config`
(TrainConfig), `trainer` (PEFT LoRA on CPU), `evaluate` (held-out loss and task
metric, base vs adapter), `raft` (retrieval-aware chats from the tenant's own retrieval), `pipeline` (the whole flow, and `train_to_folder`: train
only, into a cached folder), `cli` (the subcommand).
Importing this package does not import torch.
"""

from hybridserve.finetune.config import TrainConfig
from hybridserve.finetune.pipeline import (
    AdapterNotBetter,
    FinetuneResult,
    TrainedFolder,
    RagFinetuneResult,
    finetune,
    finetune_rag,
    train_to_folder,
)

__all__ = [
    "AdapterNotBetter",
    "FinetuneResult",
    "TrainConfig",
    "TrainedFolder",
    "RagFinetuneResult",
    "finetune",
    "finetune_rag",
    "train_to_folder",
]
