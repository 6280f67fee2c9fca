"""`hybridserve finetune` end to end on the tiny model, on CPU, without a running platform.

A few dozen steps on a synthetic format take the held-out format-match rate
from ~0 to ~1; the adapter is registered with its config and eval as metadata;
an adapter that does not beat the base is refused unless forced; the same seed
gives the same adapter; an interrupt leaves nothing behind; `--output` trains into a
cached folder and registers nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hybridserve.adapters import AdapterRegistry
from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition, InvalidArgument
from hybridserve.finetune import AdapterNotBetter, FinetuneResult, TrainConfig, finetune
from hybridserve.finetune.pipeline import TMP_PREFIX
from testkit.synthetic import FORMAT_REGEX, format_examples, write_jsonl

pytestmark = pytest.mark.integration

MODEL_NAME = "tiny-llama"
NAME = "ok-format"
#: Robust on the tiny model: 5/5 seeds reach a held-out format match of 1.0 at 40 steps.
STEPS, LR = 40, 1e-2


def _quiet(_message: str) -> None:
    pass


def _train_cfg(**overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "steps": STEPS,
            "lr": LR,
            "format_regex": FORMAT_REGEX,
            "eval_max_new_tokens": 16,
            **overrides,
        }
    )


@dataclass
class Env:
    base_dir: Path
    data: Path

    def cfg(self, data_dir: Path) -> HybridServeConfig:
        return HybridServeConfig(
            data_dir=data_dir,
            cache_dir=data_dir / "cache",
            model={"path": str(self.base_dir), "name": MODEL_NAME, "max_model_len": 1024},
            engine={"max_lora_rank": 8},
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from testkit.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("finetune")
    base = build_tiny_llama(root / "tiny")
    return Env(base, write_jsonl(root / "examples.jsonl", format_examples(80)))


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory) -> tuple[HybridServeConfig, FinetuneResult]:
    cfg = env.cfg(tmp_path_factory.mktemp("data"))
    return cfg, finetune(cfg, env.data, NAME, _train_cfg(), progress=_quiet)


def _assert_store_and_registry_empty(cfg: HybridServeConfig) -> None:
    assert AdapterRegistry.from_config(cfg).list() == []
    assert sorted(p.name for p in cfg.adapter_store.iterdir()) == []


def test_a_few_dozen_steps_learn_the_format(trained):
    _, result = trained
    ev = result.eval
    assert ev.metric == "format_match" and ev.examples >= 8
    assert ev.base_metric <= 0.2, ev
    assert ev.adapter_metric >= 0.8, ev
    assert ev.adapter_loss < ev.base_loss
    assert result.train.steps == STEPS and result.train.tokens > 0
    assert result.train_examples + result.held_out_examples == 80
    assert not result.forced


def test_registered_with_config_and_eval(trained, env):
    cfg, result = trained
    record = result.record
    registry = AdapterRegistry.from_config(cfg)
    assert [r.id for r in registry.list()] == [record.id]
    assert result.created
    # The version is the content hash, and so is the store folder's name.
    assert record.id == f"{NAME}@{record.content_sha256[:12]}"
    assert result.adapter_dir == cfg.adapter_store / f"{NAME}-{record.version}"
    assert record.source_path == result.adapter_dir.name
    assert record.base_model == MODEL_NAME and record.rank == 8
    assert not any(p.name.startswith(TMP_PREFIX) for p in cfg.adapter_store.iterdir())

    meta = record.metadata
    training_config = json.loads(meta["training_config"])
    assert training_config["steps"] == STEPS and training_config["total_steps"] == STEPS
    assert training_config["lr"] == LR and training_config["format_regex"] == FORMAT_REGEX
    assert (
        TrainConfig.model_validate({k: v for k, v in training_config.items() if k != "total_steps"})
        == _train_cfg()
    )
    ev = json.loads(meta["eval"])
    assert ev["adapter_metric"] == result.eval.adapter_metric and ev["beats_base"] is True
    assert ev["held_out_examples"] == result.held_out_examples
    assert meta["dataset_sha256"] == hashlib.sha256(env.data.read_bytes()).hexdigest()
    assert json.loads(meta["training"])["steps"] == STEPS
    assert meta["forced"] == "false"


def test_snapshot_generates_the_format_with_peft(trained, env):
    """The registered snapshot, loaded by PEFT, answers in the format (what serving must match)."""
    import re

    from hybridserve.finetune.data import encode_chat
    from hybridserve.finetune.evaluate import greedy_answers
    from hybridserve.finetune.trainer import load_base
    from peft import PeftModel

    _, result = trained
    tokenizer, base = load_base(env.base_dir)
    model = PeftModel.from_pretrained(base, result.record.snapshot_dir).eval()
    prompts = ["the book cat today", "a song fox now"]  # unseen word/tail combinations
    ids = [
        encode_chat(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
        for p in prompts
    ]
    answers = greedy_answers(model, tokenizer, ids, 16)
    assert all(re.fullmatch(FORMAT_REGEX, a.strip()) for a in answers), answers


def test_same_seed_same_adapter(trained, env, tmp_path):
    cfg, first = trained
    other = env.cfg(tmp_path / "other")
    again = finetune(other, env.data, NAME, _train_cfg(), progress=_quiet)
    assert again.record.id == first.record.id
    assert again.record.content_sha256 == first.record.content_sha256

    # Same registry, same content: the existing version, nothing new.
    same = finetune(cfg, env.data, NAME, _train_cfg(), progress=_quiet)
    assert (same.record.id, same.created) == (first.record.id, False)
    assert len(AdapterRegistry.from_config(cfg).list()) == 1

    other_seed = finetune(other, env.data, NAME, _train_cfg(seed=1), progress=_quiet)
    assert other_seed.record.id != first.record.id


@pytest.mark.parametrize("overrides", [{"steps": 0}, {"lr": 0.0}], ids=["steps=0", "lr=0"])
def test_adapter_that_does_not_beat_the_base_is_refused_unless_forced(env, tmp_path, overrides):
    cfg = env.cfg(tmp_path / "data")
    with pytest.raises(AdapterNotBetter) as err:
        finetune(cfg, env.data, "same-as-base", _train_cfg(**overrides), progress=_quiet)
    assert isinstance(err.value, FailedPrecondition)
    ev = err.value.eval
    assert ev.adapter_loss == ev.base_loss and ev.adapter_metric == ev.base_metric
    message = err.value.message
    assert f"{ev.adapter_loss:.4f}" in message and f"{ev.base_loss:.4f}" in message
    assert "--force" in message and "nothing was registered" in message
    _assert_store_and_registry_empty(cfg)

    forced = finetune(
        cfg, env.data, "same-as-base", _train_cfg(**overrides), force=True, progress=_quiet
    )
    assert forced.forced and forced.record.metadata["forced"] == "true"
    assert [r.id for r in AdapterRegistry.from_config(cfg).list()] == [forced.record.id]


@pytest.mark.parametrize("stage", ["train", "evaluate", "register"])
def test_interrupt_leaves_nothing_behind(env, tmp_path, monkeypatch, stage):
    """Ctrl-C before the registry publishes: no temp folder, no adapter folder, no record."""
    import hybridserve.finetune.evaluate as evaluate_mod
    import hybridserve.finetune.trainer as trainer_mod

    def interrupted(*args, **kwargs):
        if stage == "train":  # mid-training: some files already written
            (Path(args[3]) / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    if stage == "train":
        monkeypatch.setattr(trainer_mod, "train", interrupted)
    elif stage == "evaluate":
        monkeypatch.setattr(evaluate_mod, "evaluate", interrupted)
    else:  # validated and staged by the registry, not yet published
        monkeypatch.setattr(AdapterRegistry, "_publish", interrupted)
    cfg = env.cfg(tmp_path / "data")
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, env.data, "interrupted", _train_cfg(), progress=_quiet)
    monkeypatch.undo()
    _assert_store_and_registry_empty(cfg)
    assert list((cfg.registry_dir / ".tmp").iterdir()) == []  # the registry's staging too


def test_real_ctrl_c_during_training_leaves_nothing(env, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = env.cfg(tmp_path / "data")
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from hybridserve.config import HybridServeConfig\n"
        "from hybridserve.finetune import TrainConfig, finetune\n"
        "cfg = HybridServeConfig.model_validate_json(sys.argv[1])\n"
        "finetune(cfg, sys.argv[2], 'ctrl-c', TrainConfig(steps=100000), "
        "progress=lambda m: print(m, flush=True))\n"
    )
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, cfg.model_dump_json(), str(env.data)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        for line in proc.stdout:
            if line.startswith("Training"):
                break
        time.sleep(1.0)  # well into the steps
        tmp_dirs = [p for p in cfg.adapter_store.iterdir() if p.name.startswith(TMP_PREFIX)]
        assert len(tmp_dirs) == 1 and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        # A bound for a loaded machine (the platform shares its 2 cores), not a timing:
        # a process that ignores Ctrl-C fails it all the same. Its stderr says where it was.
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise AssertionError("no exit within 180 s of SIGINT; its stderr:\n"
                                 + stderr.read_text()[-3000:]) from None
        assert code != 0, stderr.read_text()[-3000:]
        assert "KeyboardInterrupt" in stderr.read_text(), stderr.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_store_and_registry_empty(cfg)


def test_interrupt_after_publish_keeps_a_complete_registration(env, tmp_path, monkeypatch):
    real_publish = AdapterRegistry._publish

    def publish_then_interrupt(self, *args, **kwargs):
        real_publish(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(AdapterRegistry, "_publish", publish_then_interrupt)
    cfg = env.cfg(tmp_path / "data")
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, env.data, "late", _train_cfg(), progress=_quiet)
    monkeypatch.undo()
    (record,) = AdapterRegistry.from_config(cfg).list()
    assert Path(record.snapshot_dir, "adapter_model.safetensors").is_file()
    assert [p.name for p in cfg.adapter_store.iterdir()] == [record.source_path]


def test_cli_prints_id_and_eval_table(env, tmp_path, capsys):
    from hybridserve.cli.finetune import add_finetune_parser

    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.loads(env.cfg(tmp_path / "data").model_dump_json())))
    parser = argparse.ArgumentParser(prog="hybridserve")
    parser.add_argument("--config")
    add_finetune_parser(parser.add_subparsers(dest="cmd", required=True))

    def run(*args: str) -> int:
        ns = parser.parse_args(
            ["--config", str(config), "finetune", "--data", str(env.data), *args]
        )
        return ns.func(ns)

    base = ["--steps", str(STEPS), "--lr", str(LR), "--format-regex", FORMAT_REGEX]
    assert run("--name", "cli-ok", *base) == 0
    out = capsys.readouterr().out
    adapter_id = out.splitlines()[0]
    assert adapter_id.startswith("cli-ok@")
    assert "held-out loss" in out and "format match rate" in out

    with pytest.raises(AdapterNotBetter):
        run("--name", "cli-refused", "--steps", "0", "--format-regex", FORMAT_REGEX)
    assert "held-out loss" in capsys.readouterr().out
    ids = [r.id for r in AdapterRegistry.from_config(HybridServeConfig.load(config)).list()]
    assert ids == [adapter_id]


def test_output_trains_every_example_into_a_cached_folder(env, tmp_path, capsys):
    """`--output DIR` (scripts/demo.sh's way): the adapter `train` makes from every example,
    saved into DIR with a marker, nothing registered; the same inputs again reuse DIR."""
    from hybridserve.cli.finetune import add_finetune_parser
    from hybridserve.finetune.data import load_examples, tokenize_examples
    from hybridserve.finetune.pipeline import OUTPUT_MARKER
    from hybridserve.finetune.trainer import load_tokenizer, train

    cfg = env.cfg(tmp_path / "data")
    config = tmp_path / "config.json"
    config.write_text(cfg.model_dump_json())
    parser = argparse.ArgumentParser(prog="hybridserve")
    parser.add_argument("--config")
    add_finetune_parser(parser.add_subparsers(dest="cmd", required=True))
    out = tmp_path / "built" / NAME

    def run(*args: str) -> int:
        ns = parser.parse_args(
            ["--config", str(config), "finetune", "--data", str(env.data), "--name", NAME,
             "--lr", str(LR), "--layers", "1", *args]
        )
        return ns.func(ns)

    assert run("--steps", "3", "--output", str(out)) == 0
    assert capsys.readouterr().out == f"{out}\n"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([OUTPUT_MARKER, "adapter_config.json", "adapter_model.safetensors"])
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["layers_to_transform"] == [1]
    assert adapter_config["base_model_name_or_path"] == MODEL_NAME
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["dataset_sha256"] == hashlib.sha256(env.data.read_bytes()).hexdigest()
    assert marker["training_config"]["steps"] == 3
    assert AdapterRegistry.from_config(cfg).list() == []  # nothing registered

    # Every example, in file order: the same bytes as the trainer on the whole file.
    direct = tmp_path / "direct"
    direct.mkdir()
    tokenizer = load_tokenizer(env.base_dir)
    examples = tokenize_examples(
        tokenizer, load_examples(env.data).examples, max_seq_len=512, source=env.data
    )
    train(env.base_dir, examples, TrainConfig(steps=3, lr=LR, layers_to_transform=(1,)), direct,
          base_model_name=MODEL_NAME)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (direct / name).read_bytes(), name

    # Same inputs: reused as is, without training; other inputs: rebuilt.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run("--steps", "3", "--output", str(out)) == 0
    assert "already holds" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert run("--steps", "4", "--output", str(out)) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["training_config"]["steps"] == 4
    assert (out / "adapter_model.safetensors").read_bytes() != (
        direct / "adapter_model.safetensors"
    ).read_bytes()

    # The evaluation's options make no sense without an evaluation.
    assert run("--steps", "3", "--force", "--output", str(tmp_path / "forced")) == 2
    assert "--output skips" in capsys.readouterr().err
    assert not (tmp_path / "forced").exists()
    # A folder the command did not write is never replaced (a stale one would be).
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InvalidArgument, match="was not written by"):
        run("--steps", "3", "--output", str(mine))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit):
        run("--layers", "3-1")
