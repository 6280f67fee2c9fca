"""The adapter registry: the one place that owns adapter identity.

An adapter is a PEFT LoRA folder inside the adapter store. Registering it
validates it against the served base model and the engine's limits, then copies
it into an immutable, read-only snapshot under the registry. The engine loads
adapters only from snapshots, so an id (`name@version`) always means the same
bytes: a changed adapter is a new version, never an in-place reload (reloading
under a known id leaves stale prefix-cache entries in vLLM).

The registry is plain files, shared by every process that serves or manages
adapters (Serve replicas, the CLI, the admin service):

    <registry_dir>/.lock                         flock held by register/unregister
    <registry_dir>/adapters/<name>@<version>.json  one record per adapter
    <registry_dir>/tombstones/<name>@<version>.json  one per unregistered adapter, forever
    <registry_dir>/snapshots/<name>/<version>/   the read-only copy the engine loads
    <registry_dir>/.tmp/                         staging; same filesystem as snapshots

Writers stage everything and publish with `os.replace`, so a reader sees either
nothing or a complete adapter. Transport-free: raises `hybridserve.errors`.
What makes a folder servable is checked in `validation.py`; the copy, the hash and
the atomic writes are in `files.py`.

Ids are never reused. Unregistering leaves a tombstone with the content hash, so
the id can later name those same bytes again but never other ones: a replica
that still holds the old weights under it can never serve them for a new
adapter. The snapshot outlives the record by `snapshot_retention_s` (at least
the longest request), because a request admitted before the unregister may still
make its replica load it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from hybridserve.adapters.files import copy_files, rmtree, write_json_atomic
from hybridserve.adapters.ids import ID_RE, check_name, check_version, parse_adapter_id
from hybridserve.adapters.records import AdapterRecord
from hybridserve.adapters.validation import (
    check_metadata,
    resolve_source,
    scan_source,
    validate_config,
)
from hybridserve.errors import AlreadyExists, Internal, InvalidArgument, NotFound

if TYPE_CHECKING:
    from hybridserve.config import HybridServeConfig

_HASH_VERSION_LEN = 12

_NOT_FOUND_HINT = (
    "list registered adapters with `hybridserve adapters list` "
    "or register it with `hybridserve adapters register`"
)


class AdapterRegistry:
    """Validates, snapshots and looks up LoRA adapters. See the module docstring.

    Args:
        store_dir: the adapter store; only folders inside it can be registered.
        registry_dir: where records and snapshots live (shared between processes).
        base_model_names: names or paths that identify the served base model.
        max_rank: the engine's `max_lora_rank`.
        supported_target_modules: LoRA target modules the engine can serve.
        max_size_bytes: largest adapter folder accepted.
        snapshot_retention_s: how long an unregistered adapter's snapshot is kept.
    """

    def __init__(
        self,
        store_dir: Path,
        registry_dir: Path,
        *,
        base_model_names: set[str],
        max_rank: int,
        supported_target_modules: Collection[str],
        max_size_bytes: int,
        snapshot_retention_s: float = 3600.0,
    ):
        self.store_dir = Path(store_dir).expanduser().resolve()
        self.registry_dir = Path(registry_dir).expanduser().resolve()
        self.base_model_names = {str(n) for n in base_model_names if str(n)}
        self.max_rank = max_rank
        self.supported_target_modules = frozenset(supported_target_modules)
        self.max_size_bytes = max_size_bytes
        self.snapshot_retention_s = snapshot_retention_s
        self._records_dir = self.registry_dir / "adapters"
        self._tombstones_dir = self.registry_dir / "tombstones"
        self._snapshots_dir = self.registry_dir / "snapshots"
        self._staging_dir = self.registry_dir / ".tmp"
        self._lock_path = self.registry_dir / ".lock"
        # id -> ((st_mtime_ns, st_ino) of its record file, record)
        self._cache: dict[str, tuple[tuple[int, int], AdapterRecord]] = {}
        for directory in (self.store_dir, self._records_dir, self._tombstones_dir,
                          self._snapshots_dir, self._staging_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(
        cls, cfg: HybridServeConfig, base_model_path: Path | None = None
    ) -> AdapterRegistry:
        """Builds the registry the config describes.

        `base_model_path` is the folder the engine actually loads (e.g. the prepared
        default model); adapters trained against it by path are accepted too.
        """
        names = {cfg.model.name}
        if cfg.model.path is not None:
            names.add(str(cfg.model.path))
        if base_model_path is not None:
            names.add(str(base_model_path))
        return cls(
            cfg.adapter_store,
            cfg.registry_dir,
            base_model_names=names,
            max_rank=cfg.engine.max_lora_rank,
            supported_target_modules=cfg.adapters.supported_target_modules,
            max_size_bytes=cfg.adapters.max_size_bytes,
            snapshot_retention_s=cfg.adapters.snapshot_retention_s,
        )

    # ------------------------------------------------------------------ lookups

    def get(self, adapter_id: str) -> AdapterRecord:
        """Returns the record of `adapter_id`. Cheap when cached: one stat."""
        name, version = parse_adapter_id(adapter_id)
        record = self._load(self._record_path(name, version))
        if record is None:
            raise NotFound(f"unknown adapter {adapter_id!r}; {_NOT_FOUND_HINT}")
        return record

    def exists(self, adapter_id: str) -> bool:
        """Whether `adapter_id` is registered (False for a string that is no adapter id)."""
        try:
            self.get(adapter_id)
        except (NotFound, InvalidArgument):
            return False
        return True

    def list(self) -> list[AdapterRecord]:
        """All registered adapters, sorted by id."""
        records = []
        for path in self._records_dir.glob("*.json"):
            if ID_RE.fullmatch(path.stem) and (record := self._load(path)) is not None:
                records.append(record)
        return sorted(records, key=lambda r: r.id)

    def _load(self, path: Path) -> AdapterRecord | None:
        adapter_id = path.stem
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cache.pop(adapter_id, None)
            return None
        key = (st.st_mtime_ns, st.st_ino)
        cached = self._cache.get(adapter_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:  # unregistered between stat and read
            self._cache.pop(adapter_id, None)
            return None
        except (OSError, ValueError) as exc:
            raise Internal(f"adapter record {path} is unreadable: {exc}") from exc
        name, version = parse_adapter_id(adapter_id)
        try:
            # snapshot_dir is derived, not stored: processes may mount the registry elsewhere.
            record = AdapterRecord.model_validate(
                {**data, "snapshot_dir": str(self._snapshot_path(name, version))}
            )
        except ValidationError as exc:
            raise Internal(f"adapter record {path} is malformed: {exc}") from exc
        if record.id != adapter_id:
            raise Internal(f"adapter record {path} holds id {record.id!r}, not {adapter_id!r}")
        self._cache[adapter_id] = (key, record)
        return record

    # ------------------------------------------------------------------ writes

    def register(
        self,
        name: str,
        path: str | Path,
        version: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[AdapterRecord, bool]:
        """Validates the adapter folder at `path` and registers a snapshot of it.

        Args:
            name: adapter name, `[a-z0-9][a-z0-9._-]{0,63}`.
            path: folder relative to the adapter store (or absolute, inside it).
            version: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`; default: the content hash prefix.
            metadata: free-form string metadata kept with the record.

        Returns:
            (record, created). Registering the same content under the same id
            again returns the existing record with created=False.

        Raises:
            InvalidArgument: bad name/version/path, or not a servable adapter.
            AlreadyExists: the id is taken by different content.
        """
        check_name(name)
        check_version(version)
        metadata = check_metadata(metadata)
        source = self._resolve_source(path)
        files = self._scan_source(source)

        # NOTE: the scan above only decides which files to take. The copy opens each
        # one once more, beneath the store's directory fd with O_NOFOLLOW at every
        # component, checks it is a regular file on that fd, and hashes and copies
        # from that same fd: a file swapped for a symlink (or a FIFO, or a folder
        # swapped for a symlink) between scan and copy is refused, never followed.
        # Everything after reads the private staged copy, so what is validated is
        # exactly what gets published, whatever happens to the source.
        staged = Path(tempfile.mkdtemp(prefix="stage-", dir=self._staging_dir))
        try:
            size, sha = copy_files(self.store_dir, staged, files, self.max_size_bytes)
            config = self._validate_config(staged, source)
            version = version or sha[:_HASH_VERSION_LEN]
            for rel in files:
                os.chmod(staged / rel, 0o444)
            os.chmod(staged, 0o755)  # mkdtemp makes it 0o700; replicas may run as other users
            record = AdapterRecord(
                id=f"{name}@{version}",
                name=name,
                version=version,
                content_sha256=sha,
                rank=config["rank"],
                target_modules=config["target_modules"],
                base_model=config["base_model"],
                size_bytes=size,
                source_path=source.relative_to(self.store_dir).as_posix(),
                registered_at=datetime.now(UTC).isoformat(timespec="seconds").replace(
                    "+00:00", "Z"
                ),
                metadata=metadata,
                snapshot_dir=str(self._snapshot_path(name, version)),
            )
            with self._locked():
                return self._publish(record, staged)
        finally:
            rmtree(staged)

    def unregister(self, adapter_id: str, *, now: float | None = None) -> None:
        """Removes an adapter's record and leaves a tombstone (the id is never free for
        other bytes). New requests for the id get NOT_FOUND; replicas that hold it
        finish their requests with it and then unload it. The snapshot is deleted
        `snapshot_retention_s` later, by a later unregister (see `collect`).
        """
        name, version = parse_adapter_id(adapter_id)
        record_path = self._record_path(name, version)
        with self._locked():
            record = self._load(record_path)
            if record is None:
                raise NotFound(f"unknown adapter {adapter_id!r}; {_NOT_FOUND_HINT}")
            write_json_atomic(self._tombstone_path(name, version), {
                "id": record.id,
                "content_sha256": record.content_sha256,
                "unregistered_at": time.time() if now is None else now,
            })
            record_path.unlink()
            self._cache.pop(adapter_id, None)
            self._collect(time.time() if now is None else now)

    def collect(self, now: float | None = None) -> list[str]:
        """Deletes the snapshots of adapters unregistered more than
        `snapshot_retention_s` ago; returns their ids. Unregister runs it too."""
        with self._locked():
            return self._collect(time.time() if now is None else now)

    def _collect(self, now: float) -> list[str]:
        removed = []
        for path in sorted(self._tombstones_dir.glob("*.json")):
            match = ID_RE.fullmatch(path.stem)
            if match is None or self._record_path(*match.groups()).exists():
                continue  # registered again with the same bytes: the snapshot is live
            snapshot = self._snapshot_path(*match.groups())
            if not snapshot.exists():
                continue
            try:
                tomb = json.loads(path.read_text())
                expired = now - float(tomb["unregistered_at"]) >= self.snapshot_retention_s
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: keep the snapshot (disk is cheaper than a failed load)
            if expired:
                rmtree(snapshot)
                with contextlib.suppress(OSError):  # only succeeds when no version is left
                    snapshot.parent.rmdir()
                removed.append(path.stem)
        return removed

    def _tombstone(self, name: str, version: str) -> dict | None:
        path = self._tombstone_path(name, version)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Internal(f"adapter tombstone {path} is unreadable: {exc}") from exc

    def _publish(self, record: AdapterRecord, staged: Path) -> tuple[AdapterRecord, bool]:
        """Makes a staged snapshot visible. Caller holds the registry lock."""
        record_path = self._record_path(record.name, record.version)
        existing = self._load(record_path)
        if existing is not None:
            if existing.content_sha256 == record.content_sha256:
                return existing, False
            raise AlreadyExists(
                f"adapter {record.id} is already registered with different content; "
                "versions are immutable — register it under a new version"
            )
        tomb = self._tombstone(record.name, record.version)
        if tomb is not None and tomb.get("content_sha256") != record.content_sha256:
            raise AlreadyExists(
                f"adapter {record.id} was registered before with different content and then "
                "unregistered; ids are never reused, because replicas may still hold the old "
                "weights under it — register it under a new version",
                reason="ADAPTER_ID_RETIRED", metadata={"adapter": record.id},
            )
        snapshot = self._snapshot_path(record.name, record.version)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if tomb is not None and snapshot.is_dir():
            # The same bytes again, and the retained snapshot is theirs: keep it, so a
            # replica reading it now is not disturbed.
            fresh_snapshot = False
        else:
            rmtree(snapshot)  # orphan of a crashed register; no record points at it
            os.replace(staged, snapshot)
            fresh_snapshot = True
        try:
            write_json_atomic(record_path, record.model_dump(mode="json", exclude={"snapshot_dir"}))
        except BaseException:
            if fresh_snapshot:
                rmtree(snapshot)
            raise
        return self._load(record_path) or record, True

    # ------------------------------------------------------------------ validation

    def _resolve_source(self, path: str | Path) -> Path:
        """Resolves `path` to a folder inside the store (see `validation.resolve_source`)."""
        return resolve_source(path, store_dir=self.store_dir, registry_dir=self.registry_dir)

    def _scan_source(self, source: Path) -> dict[str, str]:
        """The folder's files, within the size limit (see `validation.scan_source`)."""
        return scan_source(source, store_dir=self.store_dir, max_size_bytes=self.max_size_bytes)

    def _validate_config(self, folder: Path, source: Path) -> dict[str, Any]:
        """Checks the staged copy's config and weights (see `validation.validate_config`)."""
        return validate_config(
            folder,
            source,
            store_dir=self.store_dir,
            base_model_names=self.base_model_names,
            max_rank=self.max_rank,
            supported_target_modules=self.supported_target_modules,
        )

    # ------------------------------------------------------------------ layout

    def _record_path(self, name: str, version: str) -> Path:
        return self._records_dir / f"{name}@{version}.json"

    def _tombstone_path(self, name: str, version: str) -> Path:
        return self._tombstones_dir / f"{name}@{version}.json"

    def _snapshot_path(self, name: str, version: str) -> Path:
        return self._snapshots_dir / name / version

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock across processes (and threads: each call opens its own fd)."""
        with open(self._lock_path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
