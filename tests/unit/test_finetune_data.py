"""Fine-tuning data: validation names the line, the split is stable, only assistant tokens learn.

Bad data must fail before anything is trained, and leave the adapter store and
registry untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hybridserve.adapters import AdapterRegistry
from hybridserve.config import HybridServeConfig
from hybridserve.errors import InvalidArgument
from hybridserve.finetune import TrainConfig, finetune
from hybridserve.finetune.data import (
    IGNORE,
    Example,
    load_examples,
    split_examples,
    tokenize_example,
    tokenize_examples,
)

GOOD = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"prompt": "2+2?", "completion": "4"},
]


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# (case id, line 3 of the file, words the error must contain)
MALFORMED = [
    ("malformed-json", '{"prompt": "a", "completion": ', ["malformed JSON"]),
    ("not-an-object", "[1, 2]", ["expected a JSON object"]),
    ("non-utf8", b'{"prompt": "\xff", "completion": "x"}', ["not valid UTF-8"]),
    (
        "missing-role",
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]},
        ["messages[0]", "no 'role'"],
    ),
    ("unknown-role", _chat(("user", "hi"), ("bot", "yo")), ["messages[1]", "unknown role 'bot'"]),
    (
        "tool-role",
        _chat(("user", "hi"), ("tool", "{}"), ("assistant", "ok")),
        ["unknown role 'tool'"],
    ),
    (
        "missing-content",
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]},
        ["messages[0] (user) has no 'content'"],
    ),
    ("content-not-string", _chat(("user", "hi"), ("assistant", 5)), ["must be a string"]),
    (
        "empty-content",
        _chat(("user", "hi"), ("assistant", "  \n")),
        ["empty content", "messages[1]"],
    ),
    ("empty-prompt", {"prompt": "", "completion": "x"}, ["empty content in 'prompt'"]),
    ("empty-completion", {"prompt": "x", "completion": " "}, ["empty content in 'completion'"]),
    ("missing-completion", {"prompt": "x"}, ["no 'completion'"]),
    ("no-messages-key", {"text": "hello"}, ["neither 'messages' nor 'prompt'"]),
    (
        "both-forms",
        {**_chat(("user", "a"), ("assistant", "b")), "prompt": "a", "completion": "b"},
        ["both"],
    ),
    ("empty-messages", {"messages": []}, ["non-empty list"]),
    ("no-user", _chat(("system", "be nice"), ("assistant", "hi")), ["no user turn"]),
    (
        "ends-with-user",
        _chat(("user", "a"), ("assistant", "b"), ("user", "c")),
        ["last turn is 'user'", "must be 'assistant'"],
    ),
    (
        "late-system",
        _chat(("user", "a"), ("system", "b"), ("assistant", "c")),
        ["system turn after"],
    ),
    (
        "assistant-first",
        _chat(("assistant", "a"), ("user", "b"), ("assistant", "c")),
        ["first non-system turn"],
    ),
    (
        "extra-keys",
        {
            "messages": [
                {"role": "user", "content": "a", "name": "x"},
                {"role": "assistant", "content": "b"},
            ]
        },
        ["unsupported keys"],
    ),
]


def _write(path: Path, lines) -> Path:
    raw = b""
    for line in lines:
        if isinstance(line, bytes):
            raw += line
        elif isinstance(line, str):
            raw += line.encode()
        else:
            raw += json.dumps(line).encode()
        raw += b"\n"
    path.write_bytes(raw)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from testkit.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("finetune-data") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)


def _cfg(tmp_path: Path, tiny: Path) -> HybridServeConfig:
    return HybridServeConfig(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        model={"path": str(tiny), "name": "tiny-llama"},
        engine={"max_lora_rank": 8},
    )


def _assert_nothing_registered(cfg: HybridServeConfig) -> None:
    registry = AdapterRegistry.from_config(cfg)
    assert registry.list() == []
    assert list(cfg.adapter_store.iterdir()) == []  # no adapter folder, no temp folder


@pytest.mark.parametrize(
    "bad, expected", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_line_is_named(tmp_path, bad, expected):
    path = _write(tmp_path / "examples.jsonl", [*GOOD, bad, GOOD[0]])
    with pytest.raises(InvalidArgument) as err:
        load_examples(path)
    assert f"{path}:3: " in err.value.message
    for words in expected:
        assert words in err.value.message


@pytest.mark.parametrize(
    "bad", [case[1] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_data_registers_nothing(tmp_path, tiny, bad):
    path = _write(tmp_path / "examples.jsonl", [*GOOD, bad])
    cfg = _cfg(tmp_path, tiny)
    with pytest.raises(InvalidArgument, match=r"examples\.jsonl:3: "):
        finetune(cfg, path, "bad-data", TrainConfig(steps=1), progress=lambda _: None)
    _assert_nothing_registered(cfg)


def test_every_bad_line_is_reported_at_once(tmp_path):
    path = _write(tmp_path / "x.jsonl", [GOOD[0], "{oops", GOOD[1], "", {"prompt": "a"}, "[]"])
    with pytest.raises(InvalidArgument) as err:
        load_examples(path)
    message = err.value.message
    assert "3 invalid examples" in message
    assert all(f"{path}:{line}: " in message for line in (2, 5, 6))


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    path = _write(tmp_path / "x.jsonl", ["", GOOD[0], "   ", GOOD[1]])
    dataset = load_examples(path)
    assert [ex.line for ex in dataset.examples] == [2, 4]
    assert dataset.examples[1].messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    import hashlib

    assert dataset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(InvalidArgument, match="has no examples"):
        load_examples(path)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


def test_over_long_example_names_line_and_limit(tmp_path, tiny, tokenizer):
    long = {"prompt": "word " * 200, "completion": "ok"}
    path = _write(tmp_path / "long.jsonl", [*GOOD, long])
    dataset = load_examples(path)
    with pytest.raises(InvalidArgument) as err:
        tokenize_examples(tokenizer, dataset.examples, max_seq_len=64, source=path)
    assert f"{path}:3: " in err.value.message and "max_seq_len=64" in err.value.message

    cfg = _cfg(tmp_path, tiny)
    with pytest.raises(InvalidArgument, match=r"long\.jsonl:3: .*max_seq_len=64"):
        finetune(
            cfg, path, "too-long", TrainConfig(steps=1, max_seq_len=64), progress=lambda _: None
        )
    _assert_nothing_registered(cfg)


def test_split_is_stable_and_keeps_both_sides(tmp_path):
    examples = [
        Example(
            i + 1, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        )
        for i in range(200)
    ]
    train, held = split_examples(examples, 0.15)
    assert 15 <= len(held) <= 45 and len(train) + len(held) == 200
    # Each example's side depends on its content alone: not on order, not on neighbours.
    _, held2 = split_examples(list(reversed(examples))[:150], 0.15)
    assert {e.line for e in held2} == {e.line for e in held if e.line > 50}
    assert [e.line for e in held] == sorted(e.line for e in held)  # file order

    two = examples[:2]
    train, held = split_examples(two, 0.01)
    assert len(train) == 1 and len(held) == 1
    train, held = split_examples(two, 0.99)
    assert len(train) == 1 and len(held) == 1
    with pytest.raises(InvalidArgument, match="at least 2 examples"):
        split_examples(examples[:1], 0.15)


def test_same_chat_in_either_form_is_the_same_example(tmp_path):
    path = _write(tmp_path / "x.jsonl", [_chat(("user", "2+2?"), ("assistant", "4")), GOOD[1]])
    a, b = load_examples(path).examples
    assert a.content_sha256 == b.content_sha256


def test_loss_covers_every_assistant_turn_and_its_end(tokenizer):
    example = Example(
        1,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "a dog"},
            {"role": "user", "content": "the book"},
            {"role": "assistant", "content": "a song"},
        ],
    )
    tokenized = tokenize_example(tokenizer, example)
    assert len(tokenized.labels) == len(tokenized.input_ids)
    # Contiguous labelled spans, in order.
    spans, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    eos = tokenizer.eos_token
    assert [tokenizer.decode(span) for span in spans] == [f"a dog{eos}", f"a song{eos}"]
    # The sequence ends with the last turn's end token; the generation prompt is its prefix.
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert tokenized.input_ids[: len(tokenized.prompt_ids)] == tokenized.prompt_ids
    assert tokenizer.decode(tokenized.prompt_ids).endswith("<|assistant|>\n")
    assert tokenized.reference == "a song"


def test_train_config_checks_and_explains():
    with pytest.raises(InvalidArgument, match="steps or epochs, not both"):
        TrainConfig.from_options(steps=3, epochs=1)
    with pytest.raises(InvalidArgument, match="format_regex"):
        TrainConfig.from_options(format_regex="([a-z")
    with pytest.raises(InvalidArgument, match="rank"):
        TrainConfig.from_options(rank=0)
    assert TrainConfig.from_options(steps=None, lr=None).lr == 2e-3
    assert TrainConfig(steps=7).total_steps(100) == 7
    assert TrainConfig(epochs=2, batch_size=4).total_steps(10) == 5
    assert TrainConfig().total_steps(10) == 8  # 3 epochs by default
    assert TrainConfig(target_modules=("v_proj", "q_proj", "q_proj")).target_modules == (
        "q_proj",
        "v_proj",
    )


def test_every_train_config_field_is_described():
    missing = [name for name, f in TrainConfig.model_fields.items() if not f.description]
    assert not missing


def test_rank_above_engine_limit_fails_before_training(tmp_path, tiny):
    path = _write(tmp_path / "x.jsonl", GOOD)
    cfg = _cfg(tmp_path, tiny)
    with pytest.raises(InvalidArgument, match="max_lora_rank 8"):
        finetune(cfg, path, "big", TrainConfig(rank=16), progress=lambda _: None)
    with pytest.raises(InvalidArgument, match="invalid adapter name"):
        finetune(cfg, path, "Bad Name", TrainConfig(), progress=lambda _: None)
