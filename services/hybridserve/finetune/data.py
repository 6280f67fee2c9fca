"""Fine-tuning data: load and validate JSONL, split it, and tokenise it with the chat template.

Each non-blank line of the file is one JSON object, in one of two forms:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}

A prompt/completion pair is the chat `[user: prompt, assistant: completion]`:
adapters are served through the chat path, so they are trained on chats.
Conversations must have at least one user turn and end with an assistant turn;
system turns may only come first.

Problems are reported as `FILE:LINE: what is wrong`, all lines at once (up
to a limit), as `hybridserve.errors.InvalidArgument`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridserve.errors import FailedPrecondition, InvalidArgument

ROLES = ("system", "user", "assistant")
#: Label of positions that carry no loss (PyTorch's cross-entropy ignore index).
IGNORE = -100
#: Problems listed in one error at most; the rest are counted.
_MAX_REPORTED = 20


@dataclass(frozen=True)
class Example:
    """One validated conversation, with the line it came from (1-based)."""

    line: int
    messages: list[dict[str, str]] = field(repr=False)

    @property
    def content_sha256(self) -> str:
        """Hash of the conversation alone: the same chat hashes alike in either input form."""
        blob = json.dumps(self.messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def reference(self) -> str:
        """The last assistant turn: the answer the task metric compares against."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Dataset:
    """The examples of one file, in file order, and the sha256 of the file's bytes."""

    path: Path
    sha256: str
    examples: list[Example] = field(repr=False)


@dataclass(frozen=True)
class TokenizedExample:
    """An example ready for training and evaluation.

    `labels` equals `input_ids` on assistant tokens (each assistant turn up to
    and including its end-of-turn token) and is IGNORE elsewhere.
    `prompt_ids` is the chat before the last assistant turn, with the
    generation prompt: what the served chat path would feed the engine.
    """

    line: int
    input_ids: list[int] = field(repr=False)
    labels: list[int] = field(repr=False)
    prompt_ids: list[int] = field(repr=False)
    reference: str = field(repr=False)

    @property
    def n_labels(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class _Bad(Exception):
    """What is wrong with one line (internal; collected into an InvalidArgument)."""


class _Problems:
    """Collects `FILE:LINE: problem` messages and raises them as one InvalidArgument."""

    def __init__(self, path: Path):
        self.path = path
        self.items: list[str] = []
        self.count = 0

    def add(self, line: int, problem: str) -> None:
        self.count += 1
        if len(self.items) < _MAX_REPORTED:
            self.items.append(f"{self.path}:{line}: {problem}")

    def raise_if_any(self, hint: str) -> None:
        if not self.count:
            return
        if self.count == 1:
            raise InvalidArgument(f"{self.items[0]} ({hint})")
        more = (
            f"\n  ... and {self.count - len(self.items)} more"
            if self.count > len(self.items)
            else ""
        )
        raise InvalidArgument(
            f"{self.path}: {self.count} invalid examples ({hint}):\n  "
            + "\n  ".join(self.items)
            + more
        )


_FORMAT_HINT = (
    'each line must be {"messages": [{"role": ..., "content": ...}, ...]} or '
    '{"prompt": ..., "completion": ...}'
)


def load_examples(path: str | Path) -> Dataset:
    """Reads and validates a JSONL file of chat examples.

    Raises:
        InvalidArgument: the file is missing, empty, or has invalid lines
            (every message names the file and the line).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"data file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(
            f"data file {str(path)!r} is a directory; give a .jsonl file"
        ) from None
    except OSError as exc:
        raise InvalidArgument(f"data file {str(path)!r} cannot be read: {exc}") from None

    problems = _Problems(path)
    examples: list[Example] = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:  # its own "line 1" would mislead: report the column
            problems.add(number, f"malformed JSON: {exc.msg} at column {exc.colno}")
            continue
        except ValueError as exc:  # e.g. numbers too long to convert
            problems.add(number, f"malformed JSON: {exc}")
            continue
        try:
            examples.append(Example(number, _messages_of(obj)))
        except _Bad as exc:
            problems.add(number, str(exc))
    problems.raise_if_any(_FORMAT_HINT)
    if not examples:
        raise InvalidArgument(
            f"data file {str(path)!r} has no examples; {_FORMAT_HINT}, one example per line"
        )
    return Dataset(path, hashlib.sha256(raw).hexdigest(), examples)


def _messages_of(obj: Any) -> list[dict[str, str]]:
    """The conversation in one parsed line; _Bad says what is wrong."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
    has_messages = "messages" in obj
    has_pair = "prompt" in obj or "completion" in obj
    if has_messages and has_pair:
        raise _Bad("has both 'messages' and 'prompt'/'completion'; use one form")
    if has_pair:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise _Bad(f"has no {key!r}; a prompt/completion example needs both")
            if not isinstance(obj[key], str):
                raise _Bad(f"{key!r} must be a string, got {type(obj[key]).__name__}")
            if not obj[key].strip():
                raise _Bad(f"empty content in {key!r}")
        return [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["completion"]},
        ]
    if not has_messages:
        raise _Bad(f"has neither 'messages' nor 'prompt'/'completion' (keys: {sorted(obj)})")

    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Bad("'messages' must be a non-empty list of {role, content} objects")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Bad(f"{where} must be an object with 'role' and 'content'")
        if "role" not in message:
            raise _Bad(f"{where} has no 'role'; use one of {', '.join(ROLES)}")
        role = message["role"]
        if role not in ROLES:
            raise _Bad(f"{where} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise _Bad(f"{where} ({role}) has unsupported keys {extra}; only role and content")
        if "content" not in message:
            raise _Bad(f"{where} ({role}) has no 'content'")
        content = message["content"]
        if not isinstance(content, str):
            raise _Bad(f"{where} ({role}) content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise _Bad(f"empty content in {where} ({role})")
        if role == "system" and any(m["role"] != "system" for m in out):
            raise _Bad(
                f"{where} is a system turn after the conversation started; "
                "system turns may only come first"
            )
        out.append({"role": role, "content": content})

    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise _Bad("no user turn; a conversation needs at least one")
    first = next(r for r in roles if r != "system")
    if first != "user":
        raise _Bad(f"the first non-system turn is {first!r}; it must be 'user'")
    if roles[-1] != "assistant":
        raise _Bad(f"the last turn is {roles[-1]!r}; it must be 'assistant' (the answer to learn)")
    return out


def split_examples(
    examples: list[Example], held_out_fraction: float
) -> tuple[list[Example], list[Example]]:
    """(train, held_out), each in file order; needs at least two examples.

    An example is held out when the hash of its content, read as a number in
    [0, 1), is below `held_out_fraction`. The split thus depends on each
    example alone: reordering the file or adding lines moves no other example,
    and duplicates land on the same side. At least one example goes to each side.
    """
    if len(examples) < 2:
        raise InvalidArgument(
            f"need at least 2 examples (one to train on, one held out), got {len(examples)}"
        )
    score = {id(ex): int(ex.content_sha256[:16], 16) / 2**64 for ex in examples}
    held = {id(ex) for ex in examples if score[id(ex)] < held_out_fraction}
    if not held:
        held = {id(min(examples, key=lambda ex: score[id(ex)]))}
    if len(held) == len(examples):
        held.discard(id(max(examples, key=lambda ex: score[id(ex)])))
    train = [ex for ex in examples if id(ex) not in held]
    return train, [ex for ex in examples if id(ex) in held]


# --------------------------------------------------------------------------- tokenising


def encode_chat(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    """Token ids of a rendered chat; no extra special tokens, as vLLM's chat path does."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer, example: Example) -> TokenizedExample:
    """Renders `example` with the chat template and masks everything but the assistant turns.

    NOTE: the loss covers every assistant turn, each up to and including its
    end-of-turn token (the tokenizer's EOS; whatever the template renders after
    it, such as a newline, is not learned). Learning the end-of-turn token is
    what makes the adapted model stop in time.

    Raises:
        FailedPrecondition: the tokenizer has no chat template, or its template
            renders an earlier part of a chat differently from the whole chat.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition(
            "the base model's tokenizer has no chat template; fine-tuning trains on chats, so "
            "use a base model whose tokenizer_config.json (or chat_template.jinja) has one"
        )
    messages = example.messages
    full = encode_chat(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(full)
    eos = tokenizer.eos_token_id
    end = prompt = None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = encode_chat(tokenizer, messages[:i], generation_prompt=True)
        upto = (
            full
            if i == len(messages) - 1
            else encode_chat(tokenizer, messages[: i + 1], generation_prompt=False)
        )
        if full[: len(upto)] != upto or upto[: len(prompt)] != prompt:
            raise FailedPrecondition(
                f"line {example.line}: the base model's chat template does not render the "
                "conversation up to an assistant turn as a prefix of the whole conversation, "
                "so the assistant tokens cannot be located; use single-turn examples"
            )
        end = (
            full.index(eos, len(prompt)) + 1 if eos in full[len(prompt) : len(upto)] else len(upto)
        )
        labels[len(prompt) : end] = full[len(prompt) : end]
    assert end is not None and prompt is not None  # validated: the last turn is the assistant's
    return TokenizedExample(example.line, full[:end], labels[:end], prompt, example.reference)


def tokenize_examples(
    tokenizer, examples: list[Example], *, max_seq_len: int, source: str | Path
) -> list[TokenizedExample]:
    """Tokenises `examples`, refusing (never truncating) any longer than `max_seq_len`.

    Raises:
        InvalidArgument: over-long examples, each named `source:LINE`.
    """
    problems = _Problems(Path(source))
    out = []
    for example in examples:
        tokenized = tokenize_example(tokenizer, example)
        if len(tokenized.input_ids) > max_seq_len:
            problems.add(
                example.line,
                f"example is {len(tokenized.input_ids)} tokens long, over the limit of "
                f"max_seq_len={max_seq_len} tokens",
            )
            continue
        out.append(tokenized)
    problems.raise_if_any("shorten these examples or raise --max-seq-len")
    return out
