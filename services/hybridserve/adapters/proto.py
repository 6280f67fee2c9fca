"""An adapter's record as the API shows it (the `Adapter` message), for the
servicers that return one: GenerationService's ListAdapters and AdminService's
RegisterAdapter."""

from __future__ import annotations

from pathlib import PurePosixPath

from hybridserve.adapters.records import AdapterRecord
from hybridserve.v1 import generation_pb2


def adapter_to_proto(r: AdapterRecord, *, full: bool = True) -> generation_pb2.Adapter:
    """The adapter as the API shows it. `full=False` (a tenant key) leaves out what
    only the operator needs: where it was registered from (a server path), its
    metadata (which can name its owner, e.g. the LoRAAdapter resource), and a base
    model given as a filesystem path is shown by its folder name only."""
    reply = generation_pb2.Adapter(
        id=r.id,
        name=r.name,
        version=r.version,
        content_sha256=r.content_sha256,
        rank=r.rank,
        target_modules=list(r.target_modules),
        base_model=r.base_model if full else _public_base_model(r.base_model),
        size_bytes=r.size_bytes,
        registered_at=r.registered_at,
    )
    if full:
        reply.source_path = r.source_path
        reply.metadata.update(r.metadata)
    return reply


def _public_base_model(base: str) -> str:
    """A hub name (`org/model`) as is; a filesystem path by its last component."""
    if base.startswith(("/", "~", ".")) or "\\" in base or base.count("/") > 1:
        return PurePosixPath(base.replace("\\", "/")).name
    return base
