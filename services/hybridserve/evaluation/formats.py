"""The answer-format checks of `hybridserve eval` (--format-regex, --json-schema).

A check is a function of the answer text that says whether it has the format, given to
`hybridserve.scoring.score` as `format_check`.

--json-schema checks a small, documented subset of JSON Schema with the stdlib (the
server constrains the output with the whole schema; this only measures whether the
answers came out in the shape asked for):

- the stripped answer parses as JSON;
- its value has the schema's top-level "type" (a name or a list of names; "integer"
  and "number" never match a boolean);
- for an object: every key of "required" is present, and every top-level property of
  "properties" that is present has that property's "type".

Anything else in the schema (nested properties, enum, patterns, lengths, $ref, ...) is
not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from hybridserve.evaluation.runner import EvalInputError

FormatCheck = Callable[[str], bool]

_JSON_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def regex_check(pattern: str) -> FormatCheck:
    """A check that the stripped answer matches `pattern` as a whole (re.fullmatch).

    Raises:
        EvalInputError: the pattern does not compile.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise EvalInputError(f"--format-regex {pattern!r} is not a valid regular expression: {e}") \
            from None
    return lambda answer: compiled.fullmatch(answer.strip()) is not None


def load_json_schema(path: str | Path) -> tuple[str, dict]:
    """(the schema's text as sent to the server, the parsed schema).

    Raises:
        EvalInputError: the file is missing or unreadable, not JSON, or not an object.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"cannot read the --json-schema file {path}: {e}") from None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise EvalInputError(f"the --json-schema file {path} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise EvalInputError(f"the --json-schema file {path} must hold a JSON object (a schema)")
    return text, schema


def _has_type(value: object, spec: object) -> bool:
    # An absent or unknown type constrains nothing we check.
    names = spec if isinstance(spec, list) else [spec]
    known = [n for n in names if isinstance(n, str) and n in _JSON_TYPES]
    if not known:
        return True
    return any(_JSON_TYPES[n](value) for n in known)


def matches_schema(value: object, schema: dict) -> bool:
    """Whether a parsed JSON value passes the subset of `schema` this module checks."""
    if not _has_type(value, schema.get("type")):
        return False
    if not isinstance(value, dict):
        return True
    required = schema.get("required")
    if isinstance(required, list) and any(k not in value for k in required if isinstance(k, str)):
        return False
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for key, prop in properties.items():
            if key in value and isinstance(prop, dict) and \
                    not _has_type(value[key], prop.get("type")):
                return False
    return True


def schema_check(schema: dict) -> FormatCheck:
    """A check that the answer is JSON in the shape of `schema` (the subset above)."""

    def check(answer: str) -> bool:
        try:
            value = json.loads(answer.strip())
        except ValueError:
            return False
        return matches_schema(value, schema)

    return check
