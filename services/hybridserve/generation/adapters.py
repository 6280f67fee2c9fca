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

Ids are never reused. Unregistering leaves a tombstone with the content hash, so
the id can later name those same bytes again but never other ones: a replica
that still holds the old weights under it can never serve them for a new
adapter. The snapshot outlives the record by `snapshot_retention_s` (at least
the longest request), because a request admitted before the unregister may still
make its replica load it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hybridserve.errors import AlreadyExists, Internal, InvalidArgument, NotFound

if TYPE_CHECKING:
    from hybridserve.config import HybridServeConfig

_NAME_RULE = "[a-z0-9][a-z0-9._-]{0,63}"
_VERSION_RULE = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_RE = re.compile(_NAME_RULE)
_VERSION_RE = re.compile(_VERSION_RULE)
_ID_RE = re.compile(f"({_NAME_RULE})@({_VERSION_RULE})")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_HASH_VERSION_LEN = 12
_CHUNK = 1 << 20

_NOT_FOUND_HINT = (
    "list registered adapters with `hybridserve adapters list` "
    "or register it with `hybridserve adapters register`"
)


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


def parse_adapter_id(adapter_id: str) -> tuple[str, str]:
    """Splits `name@version`, raising InvalidArgument for anything else.

    Checked before the id touches the filesystem, so an id can never name a path.
    """
    match = _ID_RE.fullmatch(adapter_id) if isinstance(adapter_id, str) else None
    if match is None:
        raise InvalidArgument(
            f"invalid adapter id {adapter_id!r}: expected `name@version` where name matches "
            f"{_NAME_RULE} and version matches {_VERSION_RULE}"
        )
    return match.group(1), match.group(2)


def content_sha256(root: Path, files: list[str]) -> str:
    """Hashes an adapter folder: for each file, sorted by relative POSIX path,
    `path NUL size NUL bytes NUL`.

    The size makes the encoding unambiguous: without it, bytes that contain
    NUL could make two different folders hash alike, and two different adapters
    would then share one immutable id.
    """
    digest = hashlib.sha256()
    for rel in sorted(files):
        path = root / rel
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


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
            if _ID_RE.fullmatch(path.stem) and (record := self._load(path)) is not None:
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
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidArgument(f"invalid adapter name {name!r}: it must match {_NAME_RULE}")
        if version is not None and (
            not isinstance(version, str) or not _VERSION_RE.fullmatch(version)
        ):
            raise InvalidArgument(
                f"invalid adapter version {version!r}: it must match {_VERSION_RULE}"
            )
        metadata = _check_metadata(metadata)
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
            size, sha = _copy_files(self.store_dir, staged, files, self.max_size_bytes)
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
            _rmtree(staged)

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
            _write_json_atomic(self._tombstone_path(name, version), {
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
            match = _ID_RE.fullmatch(path.stem)
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
                _rmtree(snapshot)
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
            _rmtree(snapshot)  # orphan of a crashed register; no record points at it
            os.replace(staged, snapshot)
            fresh_snapshot = True
        try:
            _write_json_atomic(record_path, record.model_dump(mode="json", exclude={"snapshot_dir"}))
        except BaseException:
            if fresh_snapshot:
                _rmtree(snapshot)
            raise
        return self._load(record_path) or record, True

    # ------------------------------------------------------------------ validation

    def _resolve_source(self, path: str | Path) -> Path:
        """Resolves `path` to a folder inside the store, following symlinks."""
        if not isinstance(path, (str, PurePath)) or not str(path):
            raise InvalidArgument("adapter path is empty: give the folder's path relative to the adapter store")
        raw = Path(path).expanduser()
        if ".." in raw.parts:
            raise InvalidArgument(
                f"adapter path {str(path)!r} contains '..'; give the folder's path relative to "
                f"the adapter store {self.store_dir} without '..'"
            )
        candidate = raw if raw.is_absolute() else self.store_dir / raw
        try:
            source = candidate.resolve(strict=True)
        except FileNotFoundError:
            raise InvalidArgument(
                f"adapter path {str(path)!r} does not exist; copy the adapter folder into the "
                f"adapter store {self.store_dir} and register it by its path relative to the store"
            ) from None
        except (OSError, RuntimeError, ValueError) as exc:  # loops, permissions, NUL bytes
            raise InvalidArgument(f"adapter path {str(path)!r} cannot be resolved: {exc}") from exc
        if not source.is_relative_to(self.store_dir):
            raise InvalidArgument(
                f"adapter path {str(path)!r} resolves outside the adapter store {self.store_dir}; "
                "copy the adapter folder into the store and register it by its path relative "
                "to the store"
            )
        if source == self.store_dir:
            raise InvalidArgument(
                f"adapter path {str(path)!r} is the adapter store itself; put each adapter in "
                "its own folder inside the store"
            )
        if source.is_relative_to(self.registry_dir) or self.registry_dir.is_relative_to(source):
            raise InvalidArgument(
                f"adapter path {str(path)!r} overlaps the registry {self.registry_dir}; register "
                "the original folder from the adapter store, not a snapshot"
            )
        if not source.is_dir():
            raise InvalidArgument(
                f"adapter path {str(path)!r} is not a directory; give the adapter folder "
                f"(the one holding {CONFIG_FILE})"
            )
        return source

    def _scan_source(self, source: Path) -> dict[str, str]:
        """Lists the folder's files, checking their total size: relative POSIX path
        -> the path the copy opens, relative to the store (for a file symlink, the
        file it resolves to now).

        File symlinks are followed only if they stay in the store; directory
        symlinks and special files are refused, so the copy is finite and safe.
        """
        files: dict[str, str] = {}
        total = 0
        for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
            here = Path(dirpath)
            for entry in sorted(dirnames + filenames):
                path = here / entry
                rel = path.relative_to(source).as_posix()
                opened = path
                if path.is_symlink():
                    try:
                        target = path.resolve(strict=True)
                    except (OSError, RuntimeError):
                        raise InvalidArgument(
                            f"adapter file {rel!r} is a broken symlink; replace it with the file"
                        ) from None
                    if not target.is_relative_to(self.store_dir):
                        raise InvalidArgument(
                            f"adapter file {rel!r} is a symlink that resolves outside the adapter "
                            f"store {self.store_dir}; copy the file into the adapter folder instead"
                        )
                    if target.is_dir():
                        raise InvalidArgument(
                            f"adapter entry {rel!r} is a symlink to a directory; replace it with "
                            "a real directory"
                        )
                    opened = target
                st = path.stat()
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise InvalidArgument(
                        f"adapter entry {rel!r} is not a regular file; remove it from the folder"
                    )
                files[rel] = opened.relative_to(self.store_dir).as_posix()
                total += st.st_size
        if total > self.max_size_bytes:
            raise _too_big(self.max_size_bytes, total)
        return files

    def _validate_config(self, folder: Path, source: Path) -> dict[str, Any]:
        """Checks adapter_config.json and the weights; returns rank, modules, base."""
        where = source.relative_to(self.store_dir).as_posix()
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise InvalidArgument(
                f"adapter folder {where!r} has no {CONFIG_FILE}; it must be a PEFT LoRA "
                "adapter folder as written by `model.save_pretrained(...)`"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{CONFIG_FILE} in {where!r} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InvalidArgument(f"{CONFIG_FILE} in {where!r} must be a JSON object")

        peft_type = config.get("peft_type")
        if peft_type is not None and str(peft_type).upper() != "LORA":
            raise InvalidArgument(
                f"{CONFIG_FILE} in {where!r} has peft_type {peft_type!r}; only LoRA adapters "
                "(peft_type LORA) can be served"
            )

        rank = self._check_rank(config, where)
        target_modules = self._check_target_modules(config.get("target_modules"), where)

        base = config.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise InvalidArgument(
                f"{CONFIG_FILE} in {where!r} does not name its base model "
                f"(base_model_name_or_path); set it to the served model "
                f"{_describe(self.base_model_names)}"
            )
        if not self._is_served_base(base):
            raise InvalidArgument(
                f"adapter {where!r} was trained for base model {base!r}, but this server serves "
                f"{_describe(self.base_model_names)}; train it on the served base model"
            )

        # vLLM refuses these at load time; refusing them here gives the reason up front.
        if config.get("modules_to_save"):
            raise InvalidArgument(
                f"adapter {where!r} sets modules_to_save {config['modules_to_save']!r}; vLLM "
                "cannot serve adapters that replace whole modules — retrain without modules_to_save"
            )
        if config.get("use_dora"):
            raise InvalidArgument(
                f"adapter {where!r} is a DoRA adapter (use_dora: true); vLLM cannot serve DoRA "
                "— retrain with use_dora=False"
            )
        if config.get("bias", "none") not in (None, "none"):
            raise InvalidArgument(
                f"adapter {where!r} trains biases (bias: {config['bias']!r}); vLLM serves only "
                "bias='none' adapters — retrain with bias='none'"
            )

        if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
            raise InvalidArgument(
                f"adapter folder {where!r} has no weights: expected {' or '.join(WEIGHT_FILES)}"
            )
        return {"rank": rank, "target_modules": target_modules, "base_model": base}

    def _check_rank(self, config: dict[str, Any], where: str) -> int:
        """Returns the largest rank, counting per-module overrides in `rank_pattern`."""
        ranks = {"r": config.get("r")}
        pattern = config.get("rank_pattern") or {}
        if not isinstance(pattern, dict):
            raise InvalidArgument(f"{CONFIG_FILE} in {where!r}: rank_pattern must be an object")
        ranks.update({f"rank_pattern[{k!r}]": v for k, v in pattern.items()})
        for label, value in ranks.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(
                    f"{CONFIG_FILE} in {where!r}: {label} must be an integer >= 1, got {value!r}"
                )
            if value > self.max_rank:
                raise InvalidArgument(
                    f"adapter {where!r} has LoRA rank {label}={value}, above the engine's "
                    f"max_lora_rank {self.max_rank}; retrain with r <= {self.max_rank} or raise "
                    "engine.max_lora_rank"
                )
        return max(ranks.values())

    def _check_target_modules(self, value: Any, where: str) -> tuple[str, ...]:
        supported = ", ".join(sorted(self.supported_target_modules))
        if isinstance(value, str):
            # PEFT treats a string as a regex over module paths; the engine needs names.
            if value not in self.supported_target_modules:
                raise InvalidArgument(
                    f"adapter {where!r} sets target_modules to the pattern {value!r}; list the "
                    f"module names explicitly, from the supported ones: {supported}"
                )
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
            raise InvalidArgument(
                f"{CONFIG_FILE} in {where!r}: target_modules must be a non-empty list of module "
                f"names, from the supported ones: {supported}"
            )
        unsupported = sorted(set(value) - self.supported_target_modules)
        if unsupported:
            raise InvalidArgument(
                f"adapter {where!r} targets unsupported modules {unsupported}; the engine "
                f"supports: {supported}"
            )
        return tuple(sorted(set(value)))

    def _is_served_base(self, candidate: str) -> bool:
        """Exact name, same resolved path, or same last path component (any case)."""
        cand_path = Path(candidate).expanduser()
        for served in self.base_model_names:
            served_path = Path(served).expanduser()
            if candidate == served or (
                cand_path.name and cand_path.name.lower() == served_path.name.lower()
            ):
                return True
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                if cand_path.resolve() == served_path.resolve():
                    return True
        return False

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


# ---------------------------------------------------------------------- helpers


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidArgument("adapter metadata must map strings to strings")
    return dict(metadata)


def _too_big(limit: int, size: int, *, partial: bool = False) -> InvalidArgument:
    actual = f"at least {size}" if partial else str(size)
    return InvalidArgument(
        f"adapter folder is too large: {actual} bytes, the limit is {limit} bytes "
        "(adapters.max_size_bytes); remove files the adapter does not need"
    )


def _copy_files(store_dir: Path, dest: Path, files: Mapping[str, str], limit: int) -> tuple[int, str]:
    """Copies each file `rel -> path beneath store_dir` to `dest/rel`; returns the
    bytes copied and the content hash (`content_sha256`'s encoding) of what was copied.

    Each file is opened once, beneath `store_dir`'s fd with O_NOFOLLOW at every path
    component, checked on that fd to be a regular file, and hashed and copied from
    it. Stops once past `limit`: the source may have grown since it was scanned.
    """
    digest = hashlib.sha256()
    copied = 0
    store_fd = os.open(store_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for rel in sorted(files):
            fd = _open_beneath(store_fd, files[rel], rel)
            with os.fdopen(fd, "rb") as src:
                st = os.fstat(src.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise InvalidArgument(
                        f"adapter entry {rel!r} is not a regular file (it changed while the "
                        "adapter was being registered); remove it from the folder"
                    )
                digest.update(f"{rel}\0{st.st_size}\0".encode())
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                read = 0
                with target.open("wb") as dst:
                    while chunk := src.read(_CHUNK):
                        read += len(chunk)
                        copied += len(chunk)
                        if copied > limit:
                            raise _too_big(limit, copied, partial=True)
                        digest.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                if read != st.st_size:
                    raise InvalidArgument(
                        f"adapter file {rel!r} changed while it was being registered; register "
                        "it again once nothing writes to the folder"
                    )
                digest.update(b"\0")
    finally:
        os.close(store_fd)
    return copied, digest.hexdigest()


def _open_beneath(dir_fd: int, path: str, rel: str) -> int:
    """Opens `path` (relative, `/`-separated) beneath `dir_fd` for reading, following
    no symlink on the way (O_NOFOLLOW at every component); O_NONBLOCK so a FIFO
    swapped in cannot hang the open (fstat refuses it afterwards)."""
    parts = path.split("/")
    fds: list[int] = []
    try:
        current = dir_fd
        for part in parts[:-1]:
            current = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=current)
            fds.append(current)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=current)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            why = "it (or a folder above it) became a symlink"
        elif exc.errno == errno.ENOENT:
            why = "it disappeared"
        else:
            why = f"it could not be opened ({exc.strerror or exc})"
        raise InvalidArgument(
            f"adapter file {rel!r} cannot be copied: {why} while the adapter was being "
            "registered (symlinks are never followed at that point); register it again "
            "from a folder nothing changes"
        ) from None
    finally:
        for opened in fds:
            os.close(opened)
    os.set_blocking(fd, True)
    return fd


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """tmp + fsync + os.replace: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _rmtree(path: Path) -> None:
    """Removes a tree if present. Files are 0o444 but dirs stay writable, so this works."""
    if path.exists():
        shutil.rmtree(path)


def _describe(names: set[str]) -> str:
    return " or ".join(repr(n) for n in sorted(names)) or "(no base model configured)"
