"""Adapter ids: `name@version`, the rules for each part, and their parsing.

An id is checked here before it touches the filesystem, so an id can never name a path.
"""

from __future__ import annotations

import re

from hybridserve.errors import InvalidArgument

NAME_RULE = "[a-z0-9][a-z0-9._-]{0,63}"
VERSION_RULE = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RE = re.compile(NAME_RULE)
VERSION_RE = re.compile(VERSION_RULE)
#: A whole id; group 1 is the name, group 2 the version.
ID_RE = re.compile(f"({NAME_RULE})@({VERSION_RULE})")


def parse_adapter_id(adapter_id: str) -> tuple[str, str]:
    """Splits `name@version`, raising InvalidArgument for anything else.

    Checked before the id touches the filesystem, so an id can never name a path.
    """
    match = ID_RE.fullmatch(adapter_id) if isinstance(adapter_id, str) else None
    if match is None:
        raise InvalidArgument(
            f"invalid adapter id {adapter_id!r}: expected `name@version` where name matches "
            f"{NAME_RULE} and version matches {VERSION_RULE}"
        )
    return match.group(1), match.group(2)


def check_name(name: str) -> None:
    """Raises InvalidArgument unless `name` is a valid adapter name."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"invalid adapter name {name!r}: it must match {NAME_RULE}")


def check_version(version: str | None) -> None:
    """Raises InvalidArgument unless `version` is None or a valid adapter version."""
    if version is not None and (
        not isinstance(version, str) or not VERSION_RE.fullmatch(version)
    ):
        raise InvalidArgument(
            f"invalid adapter version {version!r}: it must match {VERSION_RULE}"
        )
