"""A throwaway PostgreSQL server for tests: `initdb` into a temp dir, the server on
loopback, stopped and removed at the end.

postgres refuses to run as root, so as root the data dir is given to the
`postgres` system user (the Debian package creates it) and both commands run as
that user; as anyone else they run as the caller.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hybridserve import localproc


def _bin_dir() -> Path:
    """The newest Debian PostgreSQL (/usr/lib/postgresql/<major>/bin), or PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise FileNotFoundError(
            "PostgreSQL is not installed: `bash scripts/install.sh` installs Debian's "
            "postgresql package (as root), or `apt-get install postgresql`"
        )
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    root: Path
    port: int
    user: str
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://hybridserve@127.0.0.1:{self.port}/hybridserve"

    @classmethod
    def start(cls, timeout_s: float = 60) -> PostgresServer:
        bins = _bin_dir()
        root = Path(tempfile.mkdtemp(prefix="hybridserve-pg-"))
        user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        root.chmod(0o700)
        data = root / "data"
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid} if os.geteuid() == 0 else {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        subprocess.run(
            [str(bins / "initdb"), "-D", str(data), "-U", "hybridserve", "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, env=env, cwd=root, **run_as,
        )
        port = _free_port()
        log = root / "postgres.log"
        server = cls(root, port, user)
        with open(log, "ab") as out:
            os.chown(log, pw.pw_uid, pw.pw_gid)
            server.proc = subprocess.Popen(
                [str(bins / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(root), "-c", "fsync=off", "-c", "max_connections=100"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
                **run_as,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{localproc.tail(log)}")
            ok = subprocess.run(
                [str(bins / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "hybridserve",
                 "-d", "postgres", "-c", "CREATE DATABASE hybridserve"],
                capture_output=True, env=env,
            )
            if ok.returncode == 0:
                return server
            time.sleep(0.25)
        server.stop()
        raise RuntimeError(f"postgres did not start within {timeout_s}s:\n{localproc.tail(log)}")

    def psql(self, sql: str) -> str:
        out = subprocess.run(
            [str(_bin_dir() / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "hybridserve",
             "-d", "hybridserve", "-At", "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return out.stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT is postgres's fast shutdown (SIGTERM would wait for clients).
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)
