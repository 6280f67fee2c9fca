"""Adapter files: the content hash, the race-safe copy out of the store, atomic writes.

Plain file operations under the registry's rules; they know nothing of records or
of the registry's layout. Transport-free: raises `hybridserve.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hybridserve.errors import InvalidArgument

_CHUNK = 1 << 20


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


def too_big(limit: int, size: int, *, partial: bool = False) -> InvalidArgument:
    """The error for an adapter folder over `adapters.max_size_bytes` (`partial`: counting stopped early)."""
    actual = f"at least {size}" if partial else str(size)
    return InvalidArgument(
        f"adapter folder is too large: {actual} bytes, the limit is {limit} bytes "
        "(adapters.max_size_bytes); remove files the adapter does not need"
    )


def copy_files(store_dir: Path, dest: Path, files: Mapping[str, str], limit: int) -> tuple[int, str]:
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
            fd = open_beneath(store_fd, files[rel], rel)
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
                            raise too_big(limit, copied, partial=True)
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


def open_beneath(dir_fd: int, path: str, rel: str) -> int:
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


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
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


def rmtree(path: Path) -> None:
    """Removes a tree if present. Files are 0o444 but dirs stay writable, so this works."""
    if path.exists():
        shutil.rmtree(path)
