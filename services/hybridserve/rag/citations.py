"""Citation numbers in an answer: `[2]`, `[1, 3]`, `[1][2]`."""

from __future__ import annotations

import re

#: A citation marker; group 1 holds its numbers.
MARKER = re.compile(r"\[(\s*\d{1,4}\s*(?:[,;]\s*\d{1,4}\s*)*)\]")


def cited_numbers(text: str) -> list[int]:
    """Every number cited in `text`, in the order first cited, without repeats."""
    seen: dict[int, None] = {}
    for group in MARKER.findall(text):
        for part in re.split(r"[,;]", group):
            seen.setdefault(int(part), None)
    return list(seen)


def check(text: str, sources: int) -> tuple[list[int], list[int]]:
    """(the valid citation numbers used, ascending; the cited numbers that match no
    source, ascending). Sources are numbered 1..sources."""
    numbers = cited_numbers(text)
    valid = sorted(n for n in numbers if 1 <= n <= sources)
    invalid = sorted(n for n in numbers if not 1 <= n <= sources)
    return valid, invalid
