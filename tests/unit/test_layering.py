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


def test_every_top_level_module_has_a_layer():
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / ".importlinter")
    layered = {
        name.strip().removeprefix("hybridserve.")
        for line in ini["importlinter:contract:layers"]["layers"].splitlines()
        for name in line.replace(":", "|").split("|")
        if name.strip()
    }
    package = ROOT / "services" / "hybridserve"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in package.iterdir()
                if (p / "__init__.py").is_file() and p.name != "v1"}  # v1/: generated
    assert modules - layered == set(), "modules in no layer of .importlinter"
    assert layered - modules == set(), "layers naming no module"


def _plant(tmp_path: Path, plants: dict[str, str]) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package with `import <module>` appended to
    each file (a path relative to the package) of `plants`."""
    copy = tmp_path / "hybridserve"
    shutil.copytree(ROOT / "services" / "hybridserve", copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for file, module in plants.items():
        with open(copy / file, "a") as f:
            f.write(f"\nimport {module}  # planted\n")
    return _lint(tmp_path)


def test_a_planted_import_breaks_the_contracts(tmp_path):
    # The SDK importing the server, and a shared-domain module importing a servicer.
    proc = _plant(tmp_path, {"client.py": "hybridserve.platform",
                             "adapters/ids.py": "hybridserve.generation.servicer"})
    assert proc.returncode != 0, proc.stdout[-4000:]
    out = proc.stdout
    assert "The SDK imports nothing of the server BROKEN" in out, out[-4000:]
    assert "Nothing but app.py imports a servicer (or the HTTP API's routes) BROKEN" in out, out[-4000:]
    assert "hybridserve.client -> hybridserve.platform" in out, out[-4000:]
    assert "hybridserve.adapters.ids -> hybridserve.generation.servicer" in out, out[-4000:]


def test_a_planted_upward_import_a_cycle_and_a_server_import_in_a_client_command_break_them(
        tmp_path):
    proc = _plant(tmp_path, {
        "adapters/ids.py": "hybridserve.tenancy.store",    # shared domain -> tenancy
        "rag/prompt.py": "hybridserve.rag.service",        # service imports prompt: a cycle
        "cli/client_cmds.py": "hybridserve.tenancy.auth",  # a client command -> the server
        "evaluation/runner.py": "hybridserve.finetune",    # the eval client -> training
    })
    assert proc.returncode != 0, proc.stdout[-4000:]
    out = " ".join(proc.stdout.split())  # the report wraps long contract names
    assert "hybridserve.adapters is not allowed to import hybridserve.tenancy" in out, out[-4000:]
    assert "No import circles between sibling packages or modules BROKEN" in out, out[-4000:]
    assert "client commands import nothing of the server" in out and \
        "hybridserve.cli.client_cmds -> hybridserve.tenancy.auth" in out, out[-4000:]
    assert "hybridserve.evaluation.runner -> hybridserve.finetune" in out, out[-4000:]
    assert "2 kept, 3 broken" in out, out[-4000:]
