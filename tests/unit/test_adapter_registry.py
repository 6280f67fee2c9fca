"""The adapter registry against real PEFT LoRA folders on a real filesystem."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
from hybridserve.adapters import AdapterRecord, AdapterRegistry
from hybridserve.config import LLAMA_LORA_MODULES, HybridServeConfig
from hybridserve.errors import AlreadyExists, InvalidArgument, NotFound
from pydantic import ValidationError

BASE = "test-org/tiny-llama"
MAX_RANK = 8
MAX_SIZE = 1 << 20


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """One real PEFT LoRA folder (r=4, q_proj+v_proj) for a tiny random Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("template") / "adapter"
    peft_model.save_pretrained(folder)
    _edit_config(folder, base_model_name_or_path=BASE)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def registry_dir(tmp_path) -> Path:
    return tmp_path / "registry"


def _registry(store: Path, registry_dir: Path, **overrides) -> AdapterRegistry:
    options = dict(
        base_model_names={BASE},
        max_rank=MAX_RANK,
        supported_target_modules=LLAMA_LORA_MODULES,
        max_size_bytes=MAX_SIZE,
    )
    options.update(overrides)
    return AdapterRegistry(store, registry_dir, **options)


@pytest.fixture
def registry(store, registry_dir) -> AdapterRegistry:
    return _registry(store, registry_dir)


@pytest.fixture
def make_adapter(store, template):
    """Copies the template into the store at `rel`, applying config changes."""

    def make(rel: str = "tenant-a", **config_changes) -> Path:
        folder = store / rel
        shutil.copytree(template, folder)
        if config_changes:
            _edit_config(folder, **config_changes)
        return folder

    return make


def assert_nothing_registered(registry: AdapterRegistry) -> None:
    """A failed register leaves no record, snapshot, staging dir or temp file behind."""
    assert registry.list() == []
    root = registry.registry_dir
    assert list((root / "adapters").iterdir()) == []
    assert list((root / "snapshots").iterdir()) == []
    assert list((root / ".tmp").iterdir()) == []


def expected_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for rel in files:
        data = (folder / rel).read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode() + data + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------- happy path


def test_register_snapshots_a_read_only_immutable_copy(registry, make_adapter, store):
    folder = make_adapter("tenants/a/support-bot")

    record, created = registry.register("support-bot", "tenants/a/support-bot", metadata={"run": "7"})

    assert created is True
    sha = expected_sha256(folder)
    assert record.content_sha256 == sha
    assert record.version == sha[:12]
    assert record.id == f"support-bot@{sha[:12]}"
    assert record.name == "support-bot"
    assert record.rank == 4
    assert record.target_modules == ("q_proj", "v_proj")
    assert record.base_model == BASE
    assert record.size_bytes == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert record.source_path == "tenants/a/support-bot"
    assert record.registered_at.endswith("Z")
    assert record.metadata == {"run": "7"}

    snapshot = Path(record.snapshot_dir)
    assert snapshot == registry.registry_dir / "snapshots" / "support-bot" / record.version
    assert snapshot.is_absolute()
    names = sorted(p.name for p in snapshot.iterdir())
    assert names == sorted(p.name for p in folder.iterdir())
    for path in snapshot.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert path.read_bytes() == (folder / path.name).read_bytes()
    with pytest.raises(ValidationError, match="frozen"):
        record.rank = 8  # type: ignore[misc]

    # Changing the source afterwards does not touch the snapshot.
    (folder / "adapter_model.safetensors").write_bytes(b"changed")
    assert (snapshot / "adapter_model.safetensors").read_bytes() != b"changed"

    assert registry.get(record.id) == record
    assert registry.list() == [record]


def test_register_same_content_again_is_idempotent(registry, make_adapter):
    make_adapter("a")
    first, created = registry.register("bot", "a")
    again, created_again = registry.register("bot", "a", metadata={"ignored": "yes"})

    assert created is True and created_again is False
    assert again == first
    assert registry.list() == [first]


def test_register_absolute_path_inside_store_and_explicit_version(registry, make_adapter):
    folder = make_adapter("a")
    record, created = registry.register("bot", folder, version="V1.0_rc-2")
    assert created
    assert record.id == "bot@V1.0_rc-2"
    assert record.source_path == "a"


def test_symlinked_folder_inside_store_is_accepted(registry, make_adapter, store):
    make_adapter("real")
    (store / "alias").symlink_to(store / "real", target_is_directory=True)
    record, _ = registry.register("bot", "alias")
    assert record.source_path == "real"


def test_string_target_module_naming_one_supported_module(registry, make_adapter):
    make_adapter("a", target_modules="q_proj")
    record, _ = registry.register("bot", "a")
    assert record.target_modules == ("q_proj",)


@pytest.mark.parametrize(
    "declared",
    [BASE, "/models/cache/Tiny-LLaMA", "tiny-llama/"],
    ids=["exact", "same-leaf-any-case", "trailing-slash"],
)
def test_base_model_matches_by_name_or_folder(registry, make_adapter, declared):
    make_adapter("a", base_model_name_or_path=declared)
    record, _ = registry.register("bot", "a")
    assert record.base_model == declared


def test_base_model_matches_by_resolved_path(store, registry_dir, make_adapter, tmp_path):
    base = tmp_path / "models" / "prepared-base"
    base.mkdir(parents=True)
    (tmp_path / "link-to-base").symlink_to(base, target_is_directory=True)
    registry = _registry(store, registry_dir, base_model_names={"some/name", str(base)})
    make_adapter("a", base_model_name_or_path=str(tmp_path / "link-to-base"))
    assert registry.register("bot", "a")[1]


def test_from_config_uses_store_registry_and_engine_limits(tmp_path, template):
    cfg = HybridServeConfig(data_dir=tmp_path / "data", engine={"max_lora_rank": 1})
    prepared = tmp_path / "cache" / "models" / "my-prepared-model"
    registry = AdapterRegistry.from_config(cfg, base_model_path=prepared)

    assert registry.store_dir == cfg.adapter_store
    assert registry.registry_dir == cfg.registry_dir.resolve()
    shutil.copytree(template, cfg.adapter_store / "a")
    _edit_config(cfg.adapter_store / "a", base_model_name_or_path=str(prepared))
    with pytest.raises(InvalidArgument, match="max_lora_rank 1"):
        registry.register("bot", "a")
    _edit_config(cfg.adapter_store / "a", r=1, base_model_name_or_path=cfg.model.name)
    assert registry.register("bot", "a")[0].rank == 1


# ---------------------------------------------------------------------- immutability


def test_same_id_with_different_content_is_rejected(registry, make_adapter):
    make_adapter("a")
    first, _ = registry.register("bot", "a", version="v1")
    changed = make_adapter("b")
    (changed / "README.md").write_text("retrained")

    with pytest.raises(AlreadyExists) as err:
        registry.register("bot", "b", version="v1")
    assert "bot@v1 is already registered with different content" in err.value.message
    assert "register it under a new version" in err.value.message
    assert registry.list() == [first]
    assert registry.get("bot@v1").content_sha256 == first.content_sha256
    assert list((registry.registry_dir / ".tmp").iterdir()) == []

    second, created = registry.register("bot", "b", version="v2")
    assert created and second.content_sha256 != first.content_sha256


def test_concurrent_registers_of_one_id_create_it_once(store, registry_dir, make_adapter):
    make_adapter("a")
    registries = [_registry(store, registry_dir) for _ in range(4)]
    results: list[tuple[AdapterRecord, bool]] = []

    def run(reg: AdapterRegistry) -> None:
        results.append(reg.register("bot", "a", version="v1"))

    threads = [threading.Thread(target=run, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(created for _, created in results) == [False, False, False, True]
    assert all(record == results[0][0] for record, _ in results)
    assert list((registry_dir / ".tmp").iterdir()) == []


# ---------------------------------------------------------------------- invalid adapters


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"base_model_name_or_path": "meta-llama/Llama-3-8B"}, ["'meta-llama/Llama-3-8B'", f"'{BASE}'"]),
        ({"base_model_name_or_path": None}, ["base_model_name_or_path", f"'{BASE}'"]),
        ({"r": 16}, ["r=16", "max_lora_rank 8"]),
        ({"r": 0}, ["r must be an integer >= 1"]),
        ({"rank_pattern": {"q_proj": 32}}, ["rank_pattern['q_proj']=32", "max_lora_rank 8"]),
        ({"target_modules": ["q_proj", "lm_head"]}, ["unsupported modules ['lm_head']", "down_proj"]),
        ({"target_modules": ".*proj"}, ["pattern '.*proj'", "list the module names explicitly", "q_proj"]),
        ({"target_modules": []}, ["non-empty list"]),
        ({"use_dora": True}, ["DoRA", "vLLM cannot serve"]),
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save", "vLLM cannot serve"]),
        ({"bias": "all"}, ["bias='none'"]),
        ({"peft_type": "IA3"}, ["peft_type 'IA3'", "only LoRA"]),
    ],
    ids=[
        "wrong-base", "no-base", "rank-too-high", "rank-zero", "rank-pattern-too-high",
        "unsupported-module", "regex-modules", "no-modules", "dora", "modules-to-save",
        "bias", "not-lora",
    ],
)
def test_invalid_adapter_config_is_rejected(registry, make_adapter, changes, expected):
    make_adapter("a", **changes)
    with pytest.raises(InvalidArgument) as err:
        registry.register("bot", "a")
    for part in expected:
        assert part in err.value.message
    assert_nothing_registered(registry)


def test_missing_config(registry, make_adapter):
    (make_adapter("a") / "adapter_config.json").unlink()
    with pytest.raises(InvalidArgument, match="has no adapter_config.json.*PEFT LoRA"):
        registry.register("bot", "a")
    assert_nothing_registered(registry)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["malformed", "not-an-object"])
def test_malformed_config(registry, make_adapter, text):
    (make_adapter("a") / "adapter_config.json").write_text(text)
    with pytest.raises(InvalidArgument, match="not valid JSON|must be a JSON object"):
        registry.register("bot", "a")
    assert_nothing_registered(registry)


def test_missing_weights(registry, make_adapter):
    (make_adapter("a") / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidArgument) as err:
        registry.register("bot", "a")
    assert "has no weights" in err.value.message
    assert "adapter_model.safetensors or adapter_model.bin" in err.value.message
    assert_nothing_registered(registry)


def test_bin_weights_are_accepted(registry, make_adapter):
    folder = make_adapter("a")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    assert registry.register("bot", "a")[1]


def test_too_big(store, registry_dir, make_adapter):
    folder = make_adapter("a")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    registry = _registry(store, registry_dir, max_size_bytes=size - 1)
    with pytest.raises(InvalidArgument) as err:
        registry.register("bot", "a")
    assert f"{size} bytes" in err.value.message
    assert f"limit is {size - 1} bytes" in err.value.message
    assert_nothing_registered(registry)


# ---------------------------------------------------------------------- paths


def test_dotdot_path_is_rejected(registry, make_adapter, store):
    make_adapter("a")
    with pytest.raises(InvalidArgument, match=r"contains '\.\.'"):
        registry.register("bot", "../x")
    with pytest.raises(InvalidArgument, match=r"contains '\.\.'"):
        registry.register("bot", "a/../a")
    assert_nothing_registered(registry)


def test_absolute_path_outside_store(registry, template):
    with pytest.raises(InvalidArgument) as err:
        registry.register("bot", template)
    assert f"resolves outside the adapter store {registry.store_dir}" in err.value.message
    assert "copy the adapter folder into the store" in err.value.message
    assert_nothing_registered(registry)


def test_symlinked_folder_escaping_store(registry, template, store):
    (store / "escape").symlink_to(template, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="resolves outside the adapter store"):
        registry.register("bot", "escape")
    assert_nothing_registered(registry)


def test_symlinked_file_inside_folder_escaping_store(registry, make_adapter, tmp_path):
    folder = make_adapter("a")
    secret = tmp_path / "secret.txt"
    secret.write_text("not an adapter file")
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(InvalidArgument) as err:
        registry.register("bot", "a")
    assert "'notes.txt' is a symlink that resolves outside the adapter store" in err.value.message
    assert_nothing_registered(registry)


def test_symlinked_directory_inside_folder_is_rejected(registry, make_adapter, store):
    folder = make_adapter("a")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="symlink to a directory"):
        registry.register("bot", "a")
    assert_nothing_registered(registry)


def _swap_after_scan(monkeypatch, swap) -> None:
    """Runs `swap()` between the folder scan and the copy (the race an attacker who
    can write to the store would win)."""
    scan = AdapterRegistry._scan_source

    def scan_then_swap(self, source):
        files = scan(self, source)
        swap()
        return files

    monkeypatch.setattr(AdapterRegistry, "_scan_source", scan_then_swap)


def test_a_file_swapped_for_a_symlink_after_the_scan_is_refused(
        registry, make_adapter, tmp_path, monkeypatch):
    folder = make_adapter("a")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"the server's private bytes")
    weights = folder / "adapter_model.safetensors"

    def swap():
        weights.unlink()
        weights.symlink_to(secret)

    _swap_after_scan(monkeypatch, swap)
    with pytest.raises(InvalidArgument) as err:
        registry.register("bot", "a")
    assert "'adapter_model.safetensors'" in err.value.message
    assert "became a symlink" in err.value.message
    assert_nothing_registered(registry)


def test_a_folder_swapped_for_a_symlink_after_the_scan_is_refused(
        registry, make_adapter, tmp_path, monkeypatch):
    folder = make_adapter("a")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("notes")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("the server's private notes")

    def swap():
        shutil.rmtree(folder / "extra")
        (folder / "extra").symlink_to(elsewhere, target_is_directory=True)

    _swap_after_scan(monkeypatch, swap)
    with pytest.raises(InvalidArgument, match="became a symlink"):
        registry.register("bot", "a")
    assert_nothing_registered(registry)


def test_a_file_swapped_for_a_fifo_after_the_scan_is_refused_without_hanging(
        registry, make_adapter, monkeypatch):
    folder = make_adapter("a")
    notes = folder / "notes.txt"
    notes.write_text("notes")

    def swap():
        notes.unlink()
        os.mkfifo(notes)

    _swap_after_scan(monkeypatch, swap)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        registry.register("bot", "a")
    assert_nothing_registered(registry)


def test_a_file_symlink_inside_the_store_is_copied_from_its_target(registry, make_adapter, store):
    folder = make_adapter("a")
    (store / "shared").mkdir()
    (store / "shared" / "NOTES.md").write_text("shared notes")
    (folder / "NOTES.md").symlink_to(store / "shared" / "NOTES.md")
    record, _ = registry.register("bot", "a")
    snapshot = Path(record.snapshot_dir)
    assert (snapshot / "NOTES.md").read_text() == "shared notes"
    assert not (snapshot / "NOTES.md").is_symlink()
    assert record.content_sha256 == expected_sha256(snapshot)


def test_missing_path_and_file_path(registry, make_adapter):
    make_adapter("a")
    with pytest.raises(InvalidArgument, match="does not exist.*adapter store"):
        registry.register("bot", "nope")
    with pytest.raises(InvalidArgument, match="is not a directory"):
        registry.register("bot", "a/adapter_config.json")
    with pytest.raises(InvalidArgument, match="is the adapter store itself"):
        registry.register("bot", ".")
    assert_nothing_registered(registry)


def test_snapshot_area_cannot_be_registered(store, make_adapter):
    registry = _registry(store, store / "registry")  # registry living inside the store
    record, _ = registry.register("bot", make_adapter("a"))
    with pytest.raises(InvalidArgument, match="overlaps the registry"):
        registry.register("copy", Path(record.snapshot_dir))
    assert [r.id for r in registry.list()] == [record.id]


# ---------------------------------------------------------------------- names and ids


@pytest.mark.parametrize("name", ["", "Bot", "-bot", "bot@1", "a/b", "x" * 65, "../x"])
def test_bad_name(registry, make_adapter, name):
    make_adapter("a")
    with pytest.raises(InvalidArgument) as err:
        registry.register(name, "a")
    assert "[a-z0-9][a-z0-9._-]{0,63}" in err.value.message
    assert_nothing_registered(registry)


@pytest.mark.parametrize("version", ["", ".v1", "v 1", "v/1", "a@b", "v" * 65])
def test_bad_version(registry, make_adapter, version):
    make_adapter("a")
    with pytest.raises(InvalidArgument) as err:
        registry.register("bot", "a", version=version)
    assert "[A-Za-z0-9][A-Za-z0-9._-]{0,63}" in err.value.message
    assert_nothing_registered(registry)


def test_bad_metadata(registry, make_adapter):
    make_adapter("a")
    with pytest.raises(InvalidArgument, match="metadata must map strings to strings"):
        registry.register("bot", "a", metadata={"epochs": 3})  # type: ignore[dict-item]
    assert_nothing_registered(registry)


@pytest.mark.parametrize("adapter_id", ["../x", "bot", "bot@", "@v1", "bot@v1/../../x", "BOT@v1"])
def test_malformed_id_is_invalid_not_missing(registry, adapter_id):
    with pytest.raises(InvalidArgument, match="expected `name@version`"):
        registry.get(adapter_id)
    with pytest.raises(InvalidArgument, match="expected `name@version`"):
        registry.unregister(adapter_id)


def test_unknown_id(registry):
    with pytest.raises(NotFound) as err:
        registry.get("bot@v1")
    assert "unknown adapter 'bot@v1'" in err.value.message
    assert "hybridserve adapters list" in err.value.message
    assert "hybridserve adapters register" in err.value.message
    with pytest.raises(NotFound, match="unknown adapter 'bot@v1'"):
        registry.unregister("bot@v1")


# ---------------------------------------------------------------------- list, unregister, sharing


def test_list_is_sorted_by_id(registry, make_adapter):
    make_adapter("a")
    for name, version in [("zeta", "v1"), ("alpha", "v2"), ("alpha", "v10"), ("mid", "a")]:
        registry.register(name, "a", version=version)
    assert [r.id for r in registry.list()] == ["alpha@v10", "alpha@v2", "mid@a", "zeta@v1"]


def test_unregister_removes_the_record_and_keeps_the_snapshot_for_a_while(registry, make_adapter):
    make_adapter("a")
    record, _ = registry.register("bot", "a", version="v1")
    registry.unregister("bot@v1", now=1000.0)

    with pytest.raises(NotFound):
        registry.get("bot@v1")
    assert registry.list() == []
    assert list((registry.registry_dir / "adapters").iterdir()) == []
    # A request admitted before the unregister may still make a replica load it.
    assert Path(record.snapshot_dir).is_dir()
    assert registry.collect(now=1000.0 + registry.snapshot_retention_s - 1) == []
    assert Path(record.snapshot_dir).is_dir()
    assert registry.collect(now=1000.0 + registry.snapshot_retention_s) == ["bot@v1"]
    assert not Path(record.snapshot_dir).exists()


def test_an_unregistered_id_never_names_other_bytes(registry, make_adapter, store):
    make_adapter("a")
    first, _ = registry.register("bot", "a", version="v1")
    registry.unregister("bot@v1")
    (store / "a" / "README.md").write_text("other bytes under the same name@version")
    with pytest.raises(AlreadyExists) as err:
        registry.register("bot", "a", version="v1")
    assert err.value.reason == "ADAPTER_ID_RETIRED"
    assert "never reused" in err.value.message and "new version" in err.value.message
    assert registry.list() == []
    # Its snapshot is untouched: it still holds the first bytes.
    assert expected_sha256(Path(first.snapshot_dir)) == first.content_sha256
    # Even after the snapshot is collected, the tombstone stays.
    registry.collect(now=time.time() + registry.snapshot_retention_s + 1)
    with pytest.raises(AlreadyExists):
        registry.register("bot", "a", version="v1")
    # A new version is fine.
    assert registry.register("bot", "a", version="v2")[1]


def test_the_same_bytes_may_come_back_under_their_id(registry, make_adapter):
    make_adapter("a")
    first, _ = registry.register("bot", "a", version="v1")
    registry.unregister("bot@v1")
    again, created = registry.register("bot", "a", version="v1")
    assert created and again.content_sha256 == first.content_sha256
    assert again.snapshot_dir == first.snapshot_dir and Path(again.snapshot_dir).is_dir()
    # Registered again, its snapshot is live: collecting never takes it.
    assert registry.collect(now=time.time() + registry.snapshot_retention_s + 1) == []
    assert Path(again.snapshot_dir).is_dir()
    # And after a collected snapshot, the same bytes are staged afresh.
    registry.unregister("bot@v1")
    registry.collect(now=time.time() + registry.snapshot_retention_s + 1)
    third, created = registry.register("bot", "a", version="v1")
    assert created and Path(third.snapshot_dir).is_dir()


def test_registry_is_shared_between_instances(store, registry_dir, make_adapter):
    writer = _registry(store, registry_dir)
    reader = _registry(store, registry_dir)
    make_adapter("a")

    with pytest.raises(NotFound):
        reader.get("bot@v1")
    record, _ = writer.register("bot", "a", version="v1")
    assert reader.get("bot@v1") == record
    assert reader.list() == [record]
    assert reader.register("bot", "a", version="v1") == (record, False)

    writer.unregister("bot@v1")
    with pytest.raises(NotFound):
        reader.get("bot@v1")
    assert reader.list() == []


def test_get_is_served_from_cache_until_the_record_changes(registry, make_adapter, monkeypatch):
    make_adapter("a")
    record, _ = registry.register("bot", "a", version="v1")
    reads = []
    real_read_text = Path.read_text

    def counting_read_text(self, *args, **kwargs):
        reads.append(self)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    for _ in range(5):
        assert registry.get("bot@v1") is record
    assert reads == []

    # Another process replaces the record (unregister + register): the cache notices.
    other = _registry(registry.store_dir, registry.registry_dir)
    other.unregister("bot@v1")
    fresh, _ = other.register("bot", "a", version="v1", metadata={"again": "yes"})
    reads.clear()
    assert registry.get("bot@v1").metadata == fresh.metadata == {"again": "yes"}
    assert reads == [registry.registry_dir / "adapters" / "bot@v1.json"]


def test_snapshot_dir_follows_the_registry_mount(store, registry_dir, make_adapter, tmp_path):
    make_adapter("a")
    _registry(store, registry_dir).register("bot", "a", version="v1")
    moved = tmp_path / "elsewhere"
    os.rename(registry_dir, moved)
    record = _registry(store, moved).get("bot@v1")
    assert Path(record.snapshot_dir) == moved.resolve() / "snapshots" / "bot" / "v1"
    assert (Path(record.snapshot_dir) / "adapter_config.json").is_file()
