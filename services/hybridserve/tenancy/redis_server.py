"""Runs a local `redis-server` for the quota counters (what `hybridserve up` does
unless `tenancy.redis_url` names an external Redis).

It listens on a Unix socket under the data dir only (no TCP port, so nothing else
on the machine can reach it and no port can collide), keeps nothing on disk
(quota counters are soft state that refills within a minute), and is stopped with
the platform.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hybridserve import localproc
from hybridserve.errors import FailedPrecondition

INSTALL_HINT = (
    "redis-server is not installed; `bash scripts/install.sh` installs Debian's "
    "redis-server package (as root), or run `apt-get install redis-server`, or point "
    "tenancy.redis_url at an external Redis"
)


@dataclass
class RedisServer:
    """A redis-server child process on a Unix socket.

    Args:
        run_dir: holds the socket and the log (created if missing).
        binary: the executable (default: `redis-server` on PATH).
    """

    run_dir: Path
    binary: str = "redis-server"
    _proc: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "redis.sock"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ping(self) -> bool:
        import redis

        try:
            client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def start(self, timeout_s: float = 30) -> None:
        if self.running():
            return
        binary = shutil.which(self.binary)
        if binary is None:
            raise FailedPrecondition(INSTALL_HINT)
        # NOTE: the Unix socket path limit is 107 bytes on Linux.
        if len(str(self.socket_path)) > 100:
            raise FailedPrecondition(
                f"the Redis socket path {self.socket_path} is too long for a Unix socket; "
                "use a shorter data_dir or set tenancy.redis_url"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        if self._ping():
            raise FailedPrecondition(f"a Redis already answers on {self.socket_path}")
        argv = [
            binary, "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.run_dir),
        ]
        self._proc = localproc.launch(argv, self.log_path, {})
        localproc.await_ready(self._proc, self._ping, timeout_s, "redis-server", self.log_path)

    def stop(self) -> None:
        localproc.terminate(self._proc)
        self._proc = None
        self.socket_path.unlink(missing_ok=True)
