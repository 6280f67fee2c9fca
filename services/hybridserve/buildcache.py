"""Build-once folders: lock, build into a temp folder, swap into place with a marker.

Shared by the builders of test models, demo adapters and the like: a folder
whose marker matches the build parameters is reused as is; anything else is
rebuilt, atomically, with concurrent builders of the same folder serialised.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def building(out_dir: Path, marker_name: str, params: dict) -> Iterator[Path | None]:
    """Lock, build into a temp folder next to `out_dir`, then swap it into place.

    Yields the temp folder to fill, or None when `out_dir` already holds a build
    with the same params (possibly made by another process while this one
    waited for the lock).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if read_json(out_dir / marker_name) == params:
                yield None
                return
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
            try:
                yield tmp
                # The marker goes in last: a folder without it is never trusted.
                (tmp / marker_name).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
                os.chmod(tmp, 0o755)  # mkdtemp: 0700; safetensors writes 0600
                for item in tmp.iterdir():
                    os.chmod(item, 0o644)
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                os.replace(tmp, out_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
