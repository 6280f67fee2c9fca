"""Generates services/hybridserve/v1/ from protos/ (Python, .pyi stubs, gRPC).

The ONE way to produce the generated code; never edit its output by hand.
`tests/unit/test_protos_fresh.py` fails when the committed code is stale.

Usage: python scripts/gen_protos.py [--out DIR]   (default: services/)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("hybridserve") / "v1"

_INIT = '"""GENERATED from protos/hybridserve/v1 by scripts/gen_protos.py. Do not edit."""\n'


def generate(out_root: Path) -> list[Path]:
    """Writes the generated package under out_root/hybridserve/v1; returns its files."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        (Path(tmp) / PACKAGE / "__init__.py").write_text(_INIT)
        dest = out_root / PACKAGE
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(Path(tmp) / PACKAGE, dest)
    return sorted(p for p in dest.rglob("*") if p.is_file())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "services")
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path.relative_to(ns.out))
    sys.exit(0)
