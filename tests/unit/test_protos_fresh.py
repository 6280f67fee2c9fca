"""The committed generated code must equal what scripts/gen_protos.py produces."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path):
    _gen_module().generate(tmp_path)
    fresh_dir = tmp_path / "hybridserve" / "v1"
    committed_dir = ROOT / "services" / "hybridserve" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    committed = {
        p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file() and p.suffix != ".pyc"
    }
    assert sorted(fresh) == sorted(committed), "generated file set differs: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `python scripts/gen_protos.py`"
