"""Helpers for the local child processes `hybridserve up` runs (weaviate-server,
redis-server, Prometheus) and the ports the platform binds: one start/ready/stop lifecycle, so
every such process is stopped the same way when its start fails or is interrupted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from hybridserve.errors import Unavailable


def bind_error(port: int, host: str = "127.0.0.1") -> str | None:
    """Why `port` on `host` cannot be bound (the OS's reason), or None when it is free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def http_ok(url: str, timeout_s: float = 2) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, or "(no log)"."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def launch(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Starts `argv` with its output appended to `log_path`, in its own session (a
    Ctrl-C in the terminal reaches us, not it), with PATH and HOME plus `env`."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def await_ready(
    proc: subprocess.Popen, ready: str | Callable[[], bool], timeout_s: float, name: str,
    log_path: Path,
) -> None:
    """Waits until `ready` (a URL that must answer 200, or a check that must return
    True) says the process is ready. If the process exits, the wait times out,
    or it is interrupted (Ctrl-C), the process is stopped before the error goes on:
    in its own session, nothing else would stop it."""
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise Unavailable(f"{name} exited at start; the end of {log_path}:\n{tail(log_path)}")
            if ready() if callable(ready) else http_ok(ready):
                return
            time.sleep(0.25)
        raise Unavailable(f"{name} did not become ready within {timeout_s:.0f}s; see {log_path}")
    except BaseException:
        terminate(proc)
        raise


def terminate(proc: subprocess.Popen | None, timeout_s: float = 30) -> None:
    """Stops `proc` gracefully (SIGTERM), killing it after timeout_s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
