"""The package's layering, checked by import-linter against the contracts in
`.importlinter` (transport, services, shared domain, config and errors; nothing but
app.py imports a servicer; the SDK and the client commands import nothing of the
server; no import circles).

The second test plants a forbidden import in a copy of the package and expects the
checker to fail: a contract that cannot fail proves nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint(package_root: Path) -> subprocess.CompletedProcess:
    try:
        importlib.metadata.version("import-linter")
    except importlib.metadata.PackageNotFoundError:
        raise AssertionError("import-linter is not installed: run scripts/install.sh "
                             "(it installs requirements/lock-tools.txt)") from None
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--config", str(ROOT / ".importlinter"), "--no-cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_every_layering_contract_is_kept():
    proc = _lint(ROOT / "services")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_planted_import_breaks_the_contracts(tmp_path):
    # A copy of the package, without the generated code (nothing in the contracts
    # reads it) and with two imports no layer allows: the SDK importing the server,
    # and a shared-domain module importing a servicer.
    copy = tmp_path / "hybridserve"
    shutil.copytree(ROOT / "services" / "hybridserve", copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "client.py", "a") as f:
        f.write("\nimport hybridserve.platform  # planted\n")
    with open(copy / "adapters" / "ids.py", "a") as f:
        f.write("\nimport hybridserve.generation.servicer  # planted\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0, proc.stdout[-4000:]
    out = proc.stdout
    assert "The SDK imports nothing of the server BROKEN" in out, out[-4000:]
    assert "Nothing but app.py imports a servicer BROKEN" in out, out[-4000:]
    assert "hybridserve.client -> hybridserve.platform" in out, out[-4000:]
    assert "hybridserve.adapters.ids -> hybridserve.generation.servicer" in out, out[-4000:]
