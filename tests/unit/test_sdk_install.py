"""`pip install hybridserve` gives the SDK and the client CLI alone.

A fresh virtualenv, the project installed from a copy of this checkout (not editable,
no extras, no lock), offline from the wheelhouse scripts/install.sh downloads (the
base dependencies at the lock's versions and the build backend).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
#: Written by scripts/install.sh into this checkout's venv.
WHEELHOUSE_NOTE = Path(sys.prefix) / ".client-wheelhouse"


def _wheelhouse() -> Path:
    wheelhouse = Path(WHEELHOUSE_NOTE.read_text().strip()) if WHEELHOUSE_NOTE.is_file() else None
    if wheelhouse is None or not (wheelhouse / ".complete").is_file():
        # A failure, not a skip: this is the proof that the SDK installs alone, and
        # the README's test command runs scripts/install.sh first.
        raise AssertionError("the SDK's wheelhouse is missing: scripts/install.sh downloads "
                             f"it (and notes its path in {WHEELHOUSE_NOTE})")
    return wheelhouse


def _run(*args, env, check=True) -> subprocess.CompletedProcess:
    # cwd: `python -c` puts the working directory on sys.path; the checkout's must
    # not be it.
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=env["HYBRIDSERVE_DATA_DIR"])
    if check:
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc


def test_the_client_installs_alone(tmp_path):
    wheelhouse = _wheelhouse()
    # Only what the sdist/wheel build reads: a build in the checkout would leave
    # build/ and egg-info behind.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "services", src / "services",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "HYBRIDSERVE_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               HYBRIDSERVE_DATA_DIR=str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    venv = tmp_path / "venv"
    # Without pip of its own (ensurepip is the slowest step): this venv's pip installs
    # into it.
    _run(sys.executable, "-m", "venv", "--without-pip", venv, env=env)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    _run(sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-index",
         "--find-links", wheelhouse, "--no-cache-dir", src, env=env)

    _run(py, "-c", "from hybridserve.client import HybridServeClient, AsyncHybridServeClient",
         env=env)
    help_ = _run(bin_dir / "hybridserve", "ask", "--help", env=env)
    assert "usage: hybridserve ask" in help_.stdout
    # The platform's dependencies are not there.
    for heavy in ("ray", "vllm", "sqlalchemy", "torch", "pydantic"):
        proc = _run(py, "-c", f"import {heavy}", env=env, check=False)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, (heavy, proc.stderr)
    # A client command runs to the network without them (nothing listens on port 1).
    ask = _run(bin_dir / "hybridserve", "ask", "--address", "127.0.0.1:1", "hello",
               env=env | {"HYBRIDSERVE_API_KEY": "hst_x"}, check=False)
    assert ask.returncode == 1 and "error: cannot reach hybridserve" in ask.stderr, ask.stderr
    # A platform command says which extra it needs instead of a traceback.
    server = _run(bin_dir / "hybridserve", "serve-config", env=env, check=False)
    assert server.returncode != 0, server.stdout
    assert "pip install 'hybridserve[server]'" in server.stderr, server.stderr
    assert "Traceback" not in server.stderr, server.stderr
