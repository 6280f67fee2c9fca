"""Runs a local `weaviate-server` on loopback (what `hybridserve up` does).

The binary is built from Weaviate's Go module at a pinned version by
scripts/install.sh. Its data persists under <data_dir>/weaviate, so a restart
finds every tenant and chunk again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybridserve import constants, localproc
from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition


def install_hint(binary: Path) -> str:
    return (
        f"weaviate-server is not at {binary}. Build it with `bash scripts/install.sh` (it runs "
        f"`go install github.com/weaviate/weaviate/cmd/weaviate-server@{constants.WEAVIATE_VERSION}`; "
        "Go >= 1.26 needed, about 4 minutes), set weaviate.binary to an existing binary, or "
        "point weaviate.url (and weaviate.grpc_port) at an external Weaviate"
    )


@dataclass
class WeaviateServer:
    """A weaviate-server child process.

    Args:
        binary: the weaviate-server executable.
        data_dir: persistence folder (created if missing).
        http_port / grpc_port: loopback ports.
        log_path: where its output goes (default: <data_dir>/weaviate.log).
    """

    binary: Path
    data_dir: Path
    http_port: int
    grpc_port: int
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen | None = None

    @classmethod
    def from_config(cls, config: HybridServeConfig) -> WeaviateServer:
        return cls(
            binary=config.weaviate_binary,
            data_dir=config.weaviate_data_dir,
            http_port=config.weaviate.http_port,
            grpc_port=config.weaviate.grpc_port,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 120) -> None:
        """Starts the server and waits until /v1/.well-known/ready answers 200."""
        if self.running():
            return
        if not (self.binary.is_file() and os.access(self.binary, os.X_OK)):
            raise FailedPrecondition(install_hint(self.binary))
        for what, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port)):
            if reason := localproc.bind_error(port):
                raise FailedPrecondition(
                    f"the weaviate-server {what} port {port} is in use ({reason}); stop what "
                    "holds it or set weaviate.http_port / weaviate.grpc_port"
                )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path or self.data_dir.parent / "weaviate.log"
        env = {
            "PERSISTENCE_DATA_PATH": str(self.data_dir),
            "DEFAULT_VECTORIZER_MODULE": "none",
            "ENABLE_MODULES": "",
            "GRPC_PORT": str(self.grpc_port),
            "CLUSTER_HOSTNAME": "hybridserve",
            # Single node on loopback. NOTE: the gossip, data, raft and profiling ports
            # derive from the HTTP port, so two servers on one machine never collide.
            "CLUSTER_GOSSIP_BIND_PORT": str(self.http_port + 10000),
            "CLUSTER_DATA_BIND_PORT": str(self.http_port + 10001),
            "RAFT_PORT": str(self.http_port + 10002),
            "RAFT_INTERNAL_RPC_PORT": str(self.http_port + 10003),
            "RAFT_BOOTSTRAP_EXPECT": "1",
            "GO_PROFILING_PORT": str(self.http_port + 10004),
            "CLUSTER_BIND_ADDR": "127.0.0.1",
            "CLUSTER_ADVERTISE_ADDR": "127.0.0.1",
            "AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED": "true",
            "DISABLE_TELEMETRY": "true",
            "LOG_LEVEL": "warning",
            "QUERY_DEFAULTS_LIMIT": "25",
            **self.extra_env,
        }
        self._proc = localproc.launch(
            [str(self.binary), "--host", "127.0.0.1", "--port", str(self.http_port),
             "--scheme", "http"],
            log_path, env,
        )
        try:
            localproc.await_ready(self._proc, f"{self.url}/v1/.well-known/ready", timeout_s,
                                  "weaviate-server", log_path)
        except BaseException:
            self._proc = None
            raise

    def stop(self, timeout_s: float = 30) -> None:
        """Stops the server gracefully (SIGTERM: it flushes to disk), killing it after timeout_s."""
        proc, self._proc = self._proc, None
        localproc.terminate(proc, timeout_s)

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self, timeout_s: float = 5) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung server).
        Returns once the kernel reports the process stopped (Linux), at most timeout_s."""
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self._proc.pid}/stat")
        deadline = time.monotonic() + timeout_s
        while stat.is_file() and time.monotonic() < deadline:
            try:
                # The state is the first field after the ")" closing the name.
                if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
                    return
            except (OSError, IndexError):
                return
            time.sleep(0.01)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
