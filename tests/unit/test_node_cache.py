"""The node-local adapter copies (adapters.node_cache_dir)."""

from __future__ import annotations

import shutil
import threading

import pytest

from hybridserve.adapters import AdapterRecord, content_sha256
from hybridserve.errors import Internal
from hybridserve.generation import node_cache


def _record(snapshot, name="tone", version="v1") -> AdapterRecord:
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    return AdapterRecord(
        id=f"{name}@{version}", name=name, version=version,
        content_sha256=content_sha256(snapshot, files), rank=8, target_modules=("q_proj",),
        base_model="tiny", size_bytes=1, source_path=name, registered_at="2026-01-01T00:00:00Z",
        snapshot_dir=str(snapshot))


@pytest.fixture
def snapshot(tmp_path):
    snap = tmp_path / "registry" / "snapshots" / "tone" / "v1"
    snap.mkdir(parents=True)
    (snap / "adapter_config.json").write_text('{"r": 8}')
    (snap / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    return snap


def test_first_load_copies_and_verifies_later_loads_reuse(snapshot, tmp_path, monkeypatch):
    record = _record(snapshot)
    local = node_cache.local_copy(record, tmp_path / "node")
    assert local.parent == tmp_path / "node" / "tone"
    assert (local / "adapter_model.safetensors").read_bytes() == b"\x00weights" * 100
    assert local.name.startswith("v1-") and record.content_sha256[:16] in local.name

    def no_copy(*a, **k):
        raise AssertionError("copied twice")

    monkeypatch.setattr(shutil, "copyfile", no_copy)
    shutil.rmtree(snapshot)  # the shared volume is not read again
    assert node_cache.local_copy(record, tmp_path / "node") == local


def test_a_snapshot_that_does_not_match_its_hash_is_refused(snapshot, tmp_path):
    record = _record(snapshot)
    (snapshot / "adapter_model.safetensors").write_bytes(b"other bytes")
    with pytest.raises(Internal, match="does not match its registered content hash"):
        node_cache.local_copy(record, tmp_path / "node")
    assert list((tmp_path / "node" / "tone").iterdir()) == []  # nothing half-published


def test_other_bytes_under_a_reused_id_get_their_own_copy(snapshot, tmp_path):
    first = node_cache.local_copy(_record(snapshot), tmp_path / "node")
    (snapshot / "adapter_model.safetensors").write_bytes(b"new weights")
    second = node_cache.local_copy(_record(snapshot), tmp_path / "node")
    assert first != second and (second / "adapter_model.safetensors").read_bytes() == b"new weights"


def test_concurrent_replicas_publish_one_copy(snapshot, tmp_path):
    record = _record(snapshot)
    out, errors = [], []

    def load():
        try:
            out.append(node_cache.local_copy(record, tmp_path / "node"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(out)) == 1
    assert [p.name for p in (tmp_path / "node" / "tone").iterdir()] == [out[0].name]
