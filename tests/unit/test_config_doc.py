"""docs/config.md is generated from the config's field descriptions; it must be fresh."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_doc_is_fresh():
    # Defaults that come from the environment are documented as the built-in ones.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDSERVE_")}
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_doc.py"), "--check"],
        capture_output=True,
        env=env,
    )
    assert check.returncode == 0, "docs/config.md is stale: run `python scripts/gen_config_doc.py`"


def test_every_config_field_is_described():
    from hybridserve.config import HybridServeConfig
    from pydantic import BaseModel

    def walk(model):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from walk(field.annotation)
            else:
                yield f"{model.__name__}.{name}", field.description

    missing = [name for name, desc in walk(HybridServeConfig) if not desc]
    assert not missing, f"fields without a description: {missing}"
