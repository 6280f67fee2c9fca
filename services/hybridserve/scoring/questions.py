"""Question files: JSONL, one question a line, loaded and validated.

Each non-blank line is one JSON object with these keys:

    {"id": "q1", "question": "Who wrote X?", "answers": ["Jane Doe"], "gold_docs": ["doc-7"]}

- "question": the question, a non-empty string of at most 4000 characters;
- "answers": the accepted answers, a list of non-empty strings; at least one
  when "gold_docs" is not empty, and none when it is;
- "gold_docs": the ids of the documents that hold the answer, a list of
  non-empty strings; empty when the documents do not answer the question (an
  unanswerable question, where the right answer is a refusal);
- "id" (optional): a non-empty string, unique in the file; "line-<n>" by
  default, n being the line number.

Any other key is an error, which catches typos such as "answer". Every problem
of the file is reported at once, each as `FILE:LINE: what is wrong`; problems
of the whole file (missing, unreadable, empty) are reported at line 1, so that
every problem has that form.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Question", "QuestionFileError", "QuestionSet", "load_questions"]

#: The longest question accepted, in characters.
MAX_QUESTION_CHARS = 4000
_KEYS = ("id", "question", "answers", "gold_docs")
#: Problems that str(QuestionFileError) lists; the rest are counted.
_MAX_LISTED = 20


@dataclass(frozen=True)
class Question:
    """One question of a question file, with its line (1-based)."""

    id: str
    question: str
    answers: tuple[str, ...]
    gold_docs: tuple[str, ...]
    line: int

    @property
    def answerable(self) -> bool:
        """Whether some document holds the answer (it has gold documents)."""
        return bool(self.gold_docs)


@dataclass(frozen=True)
class QuestionSet:
    """The questions of one file, in file order, and the sha256 of the file's bytes."""

    path: Path
    sha256: str
    questions: list[Question] = field(repr=False)


class QuestionFileError(ValueError):
    """A question file with problems; `problems` holds them all, each as
    `FILE:LINE: what is wrong`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listed = "\n".join(problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        super().__init__(listed + (f"\n... and {more} more" if more > 0 else ""))


def load_questions(path: str | Path) -> QuestionSet:
    """Reads and validates a JSONL question file (see the module docstring).

    Raises:
        QuestionFileError: the file is missing, unreadable or empty, or has
            problems; every one is listed.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QuestionFileError(
            [f"{path}:1: cannot read the question file: {exc.strerror}"]
        ) from None

    problems: list[str] = []
    questions: list[Question] = []
    first_line_of: dict[str, int] = {}
    blank = True
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            # utf-8-sig: a byte order mark that an editor put first is not an error.
            text = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            blank = False
            problems.append(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not text.strip():
            continue
        blank = False
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:  # its own "line 1" would mislead: give the column
            problems.append(f"{where}: malformed JSON: {exc.msg} at column {exc.colno}")
            continue
        except ValueError as exc:  # e.g. an integer too long to convert
            problems.append(f"{where}: malformed JSON: {exc}")
            continue
        question, line_problems = _question_of(obj, number, first_line_of)
        problems.extend(f"{where}: {p}" for p in line_problems)
        if question is not None:
            questions.append(question)
    if blank:
        problems.append(
            f"{path}:1: the file has no questions; write one JSON object per line, "
            'with "question", "answers" and "gold_docs"'
        )
    if problems:
        raise QuestionFileError(problems)
    return QuestionSet(path, hashlib.sha256(raw).hexdigest(), questions)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _strings(obj: dict, key: str, problems: list[str]) -> tuple[str, ...] | None:
    """obj[key] as a tuple of non-empty strings, or None after adding its problems."""
    value = obj[key]
    if not isinstance(value, list):
        problems.append(f"{key!r} must be a list of strings, got {_json_type(value)}")
        return None
    bad = [
        f"{key}[{i}] must be a non-empty string, got "
        + ("an empty one" if isinstance(item, str) else _json_type(item))
        for i, item in enumerate(value)
        if not isinstance(item, str) or not item.strip()
    ]
    problems.extend(bad)
    return None if bad else tuple(value)


def _question_of(
    obj: Any, number: int, first_line_of: dict[str, int]
) -> tuple[Question | None, list[str]]:
    """The question of line `number`, or None; and what is wrong with the line.

    `first_line_of` maps the ids seen so far to their lines; the line's id joins it
    (when it is a valid id seen for the first time), even if the line has problems.
    """
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {_json_type(obj)}"]
    problems: list[str] = []
    for key in sorted(set(obj) - set(_KEYS)):
        close = difflib.get_close_matches(key, _KEYS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the keys are {', '.join(_KEYS)}"
        problems.append(f"unknown key {key!r}{hint}")

    text = obj.get("question")
    if "question" not in obj:
        problems.append("missing 'question' (the question to ask, a non-empty string)")
    elif not isinstance(text, str):
        problems.append(f"'question' must be a string, got {_json_type(text)}")
    elif not text.strip():
        problems.append("'question' is empty")
    elif len(text) > MAX_QUESTION_CHARS:
        problems.append(
            f"'question' has {len(text)} characters; at most {MAX_QUESTION_CHARS} are allowed"
        )

    answers = gold_docs = None
    if "answers" not in obj:
        problems.append(
            "missing 'answers' (the accepted answers; [] for an unanswerable question)"
        )
    else:
        answers = _strings(obj, "answers", problems)
    if "gold_docs" not in obj:
        problems.append(
            "missing 'gold_docs' (the ids of the documents that hold the answer; "
            "[] for an unanswerable question)"
        )
    else:
        gold_docs = _strings(obj, "gold_docs", problems)
    if answers is not None and gold_docs is not None:
        if gold_docs and not answers:
            problems.append(
                "'answers' is empty, but the question has gold_docs (it is answerable): "
                "give at least one accepted answer"
            )
        elif answers and not gold_docs:
            problems.append(
                "'gold_docs' is empty (the question is unanswerable: only a refusal is "
                "correct), so 'answers' must be empty too"
            )

    qid = obj.get("id", f"line-{number}")
    if not isinstance(qid, str) or not qid.strip():
        problems.append(
            "'id' must be a non-empty string, got "
            + ("an empty one" if isinstance(qid, str) else _json_type(qid))
        )
    elif qid in first_line_of:
        problems.append(f"duplicate id {qid!r} (first on line {first_line_of[qid]})")
    else:
        first_line_of[qid] = number
    if problems:
        return None, problems
    return Question(qid, text, answers, gold_docs, number), []
