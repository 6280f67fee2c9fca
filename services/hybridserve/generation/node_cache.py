"""A node-local copy of adapter snapshots (`adapters.node_cache_dir`).

On a cluster the registry's snapshots live on a shared ReadWriteMany volume.
A replica that loads an adapter first copies its snapshot to local disk, once
per node, checks the copy against the registered content hash, and hands vLLM
the local folder. A later load on that node, after an eviction, a replica
restart or from another replica, reads local disk, not the network volume.

The copy's folder is named by the content hash as well as the version, so a
copy can never stand for other bytes. Copies are published with one
`os.replace`, so concurrent replicas on a node never see a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hybridserve.adapters import AdapterRecord, content_sha256
from hybridserve.errors import Internal


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())


def local_copy(record: AdapterRecord, cache_dir: Path) -> Path:
    """The node-local folder of `record`'s snapshot, copied and verified on first use."""
    dest = cache_dir / record.name / f"{record.version}-{record.content_sha256[:16]}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{record.version}."))
    try:
        source = Path(record.snapshot_dir)
        for rel in _files(source):
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, staged / rel)
        got = content_sha256(staged, _files(staged))
        if got != record.content_sha256:
            raise Internal(
                f"the snapshot of adapter {record.id} at {source} does not match its registered "
                f"content hash ({got[:12]} != {record.content_sha256[:12]}); re-register it"
            )
        try:
            os.replace(staged, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent replica's identical copy
                raise
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return dest
