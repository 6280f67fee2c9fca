"""Synthetic fine-tuning data with a format a tiny random model learns in a few dozen steps.

Every answer is `[OK:<word>]`, where the word is the key word of the prompt.
The base model never produces it (held-out format match ~0); a LoRA adapter
trained for ~40 steps on the tiny model does (~1). The words come from the
tiny tokenizer's training corpus, so answers stay a handful of tokens long.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

#: Matches a whole answer in the format; use as `TrainConfig.format_regex`.
FORMAT_REGEX = r"\[OK:[a-z]+\]"

_KEYS = ("cat", "dog", "fox", "tea")
_SUBJECTS = (
    "the book",
    "a song",
    "the story",
    "some milk",
    "the letter",
    "the answer",
    "a train",
    "the river",
    "my friend",
    "the robot",
)
_TAILS = (
    "today",
    "again",
    "with care",
    "at night",
    "in the morning",
    "before dinner",
    "very quickly",
    "for me",
    "please",
    "now",
)


def format_examples(n: int = 80, *, seed: int = 0) -> list[dict]:
    """`n` examples (deterministic for `seed`); odd ones in the `messages` form, even ones
    as prompt/completion, so both input forms are exercised."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for i in range(n):
        word = _KEYS[i % len(_KEYS)]
        prompt = f"{rng.choice(_SUBJECTS)} {word} {rng.choice(_TAILS)}"
        answer = f"[OK:{word}]"
        if i % 2:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Writes one JSON object per line; returns `path`."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
