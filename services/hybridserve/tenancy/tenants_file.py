"""The declarative tenants file (`hybridserve admin apply -f tenants.yaml`).

    tenants:
      - id: acme
        display_name: Acme Orbital
        allow_base: false
        system_prompt: You answer for Acme's support desk.
        adapters: [support-formal@3f2a1b9c0d4e]
        default_adapter: support-formal@3f2a1b9c0d4e
        quotas: {requests_per_minute: 60, tokens_per_minute: 20000, concurrent_streams: 4}

Each listed tenant is made to match the file exactly: a field left out takes its
default (no display name, no base model, no system prompt, the platform's default
quotas `tenancy.default_quotas` for each quota left out, no adapters), and grants not
listed are removed.
Write `quotas: {requests_per_minute: 0, tokens_per_minute: 0, concurrent_streams: 0}`
for a tenant without limits. Tenants that are not in the file
are left alone. Keys never appear in the file.

The whole file is checked before anything changes; every problem is reported
with its line number, and one bad entry rejects the file.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hybridserve.errors import InvalidArgument
from hybridserve.tenancy.domain import (
    MAX_DISPLAY_NAME_CHARS,
    MAX_QUOTA,
    MAX_SYSTEM_PROMPT_CHARS,
    TENANT_ID_RE,
    Quotas,
    Tenant,
)

MAX_FILE_BYTES = 1024 * 1024
MAX_TENANTS = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QuotasSpec(_Strict):
    """A tenant's quotas; a field left out takes the platform's default (0: no limit)."""

    requests_per_minute: int | None = Field(None, ge=0, le=MAX_QUOTA)
    tokens_per_minute: int | None = Field(None, ge=0, le=MAX_QUOTA)
    concurrent_streams: int | None = Field(None, ge=0, le=MAX_QUOTA)


class TenantSpec(_Strict):
    id: str = Field(pattern=TENANT_ID_RE.pattern)
    display_name: str = Field("", max_length=MAX_DISPLAY_NAME_CHARS)
    allow_base: bool = False
    system_prompt: str = Field("", max_length=MAX_SYSTEM_PROMPT_CHARS)
    adapters: list[str] = Field(default_factory=list)
    default_adapter: str = ""
    #: None: the platform's default quotas.
    quotas: QuotasSpec | None = None

    def to_tenant(self, default_quotas: Quotas = Quotas()) -> Tenant:
        q, d = self.quotas or QuotasSpec(), default_quotas
        return Tenant(
            id=self.id, display_name=self.display_name, allow_base=self.allow_base,
            adapters=tuple(sorted(set(self.adapters))), default_adapter=self.default_adapter,
            system_prompt=self.system_prompt,
            quotas=Quotas(*(d_ if q_ is None else q_ for q_, d_ in (
                (q.requests_per_minute, d.requests_per_minute),
                (q.tokens_per_minute, d.tokens_per_minute),
                (q.concurrent_streams, d.concurrent_streams)))),
        )


class TenantsFile(_Strict):
    tenants: list[TenantSpec] = Field(default_factory=list, max_length=MAX_TENANTS)


class _Lines:
    """Converts a composed YAML node tree to Python, remembering each path's line."""

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}
        self.problems: list[tuple[str, int, str]] = []
        self._seen: set[int] = set()

    def value(self, node: yaml.Node, path: tuple) -> Any:
        self.lines[path] = node.start_mark.line + 1
        # NOTE: an alias is the same node object again: refusing them stops both
        # recursive documents and exponential expansion ("billion laughs").
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self._seen:
                self.problems.append((_dotted(path), node.start_mark.line + 1,
                                      "YAML anchors and aliases are not allowed"))
                return None
            self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            out: dict = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    self.problems.append((_dotted(path), key_node.start_mark.line + 1,
                                          "keys must be plain strings"))
                    continue
                if key in out:
                    self.problems.append((_dotted(path + (key,)), key_node.start_mark.line + 1,
                                          f"{key!r} appears twice"))
                    continue
                out[key] = self.value(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(n, path + (i,)) for i, n in enumerate(node.value)]
        # Scalars: YAML's own (safe) resolution types them: int, bool, str, null.
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)

    def line_of(self, loc: tuple) -> int:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 1)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def _reject(problems: list[tuple[str, int, str]]) -> InvalidArgument:
    problems = sorted(problems, key=lambda p: (p[1], p[0]))
    text = "; ".join(f"line {line}: {field}: {msg}" for field, line, msg in problems[:50])
    more = f" (and {len(problems) - 50} more)" if len(problems) > 50 else ""
    return InvalidArgument(
        f"the tenants file has {len(problems)} problem(s), nothing was changed: {text}{more}",
        reason="TENANTS_FILE_INVALID",
        field_violations=[(f"{field} (line {line})", msg) for field, line, msg in problems],
    )


def parse(document: str, adapter_exists=None, default_quotas: Quotas = Quotas()) -> list[Tenant]:
    """Parses and checks a tenants file; InvalidArgument lists every problem with
    its line. `adapter_exists(id) -> bool` checks that granted adapters are registered;
    a tenant without `quotas` gets `default_quotas`."""
    if len(document.encode()) > MAX_FILE_BYTES:
        raise InvalidArgument(f"the tenants file is larger than {MAX_FILE_BYTES} bytes")
    try:
        node = yaml.compose(document, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise _reject([("(document)", line, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if node is None:
        raise _reject([("(document)", 1, "the file is empty; it needs a `tenants:` list")])
    conv = _Lines()
    data = conv.value(node, ())
    problems = list(conv.problems)
    parsed = None
    try:
        parsed = TenantsFile.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            problems.append((_dotted(loc), conv.line_of(loc), err["msg"]))
    if parsed is None or problems:
        raise _reject(problems)
    seen: dict[str, int] = {}
    for i, spec in enumerate(parsed.tenants):
        where = ("tenants", i)
        if spec.id in seen:
            problems.append((_dotted(where + ("id",)), conv.line_of(where + ("id",)),
                             f"tenant {spec.id!r} is listed twice (first at tenants[{seen[spec.id]}])"))
        seen.setdefault(spec.id, i)
        for j, adapter in enumerate(spec.adapters):
            loc = where + ("adapters", j)
            if spec.adapters.index(adapter) != j:
                problems.append((_dotted(loc), conv.line_of(loc), f"{adapter!r} is listed twice"))
            elif adapter_exists is not None and not adapter_exists(adapter):
                problems.append((_dotted(loc), conv.line_of(loc),
                                 f"adapter {adapter!r} is not registered"))
        if spec.default_adapter and spec.default_adapter not in spec.adapters:
            loc = where + ("default_adapter",)
            problems.append((_dotted(loc), conv.line_of(loc),
                             "the default adapter must be one of the tenant's adapters"))
    if problems:
        raise _reject(problems)
    return [spec.to_tenant(default_quotas) for spec in parsed.tenants]
