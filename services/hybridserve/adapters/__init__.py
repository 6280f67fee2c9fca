"""Adapter identity, shared by generation, tenancy, rag, finetune and the controller.

A lower layer: it uses config, errors and the standard library, never a service.

    ids.py         `name@version`: the rules and the parsing
    records.py     `AdapterRecord`, what the registry keeps per adapter
    validation.py  is a folder in the store a LoRA adapter this server can serve?
    files.py       the content hash, the race-safe copy, atomic writes
    registry.py    `AdapterRegistry`: validates, snapshots and looks adapters up
"""

from hybridserve.adapters.files import content_sha256
from hybridserve.adapters.ids import parse_adapter_id
from hybridserve.adapters.records import AdapterRecord
from hybridserve.adapters.registry import AdapterRegistry
from hybridserve.adapters.validation import CONFIG_FILE, WEIGHT_FILES

__all__ = [
    "CONFIG_FILE",
    "WEIGHT_FILES",
    "AdapterRecord",
    "AdapterRegistry",
    "content_sha256",
    "parse_adapter_id",
]
