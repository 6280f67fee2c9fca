"""The adapter record: what the registry keeps about one registered adapter."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AdapterRecord(BaseModel):
    """A registered adapter. Mirrors `hybridserve.v1.Adapter`, plus `snapshot_dir`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="`name@version`; immutable.")
    name: str = Field(description="Adapter name.")
    version: str = Field(description="Version; defaults to the first 12 hex chars of the hash.")
    content_sha256: str = Field(description="sha256 over the adapter's files, see `content_sha256`.")
    rank: int = Field(description="Largest LoRA rank in the adapter (`r` or `rank_pattern`).")
    target_modules: tuple[str, ...] = Field(description="Modules the LoRA targets, sorted.")
    base_model: str = Field(description="`base_model_name_or_path` from adapter_config.json.")
    size_bytes: int = Field(description="Total size of the adapter's files.")
    source_path: str = Field(description="Folder it was registered from, relative to the store.")
    registered_at: str = Field(description="RFC 3339, UTC.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Free-form metadata.")
    snapshot_dir: str = Field(description="Absolute path of the read-only copy the engine loads.")
