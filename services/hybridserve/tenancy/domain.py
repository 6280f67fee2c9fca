"""Tenancy domain types: plain dataclasses, no transport, no database.

`Principal` is the one thing that crosses from authentication into the services:
who is calling (an admin or a tenant), with the tenant's grants, default adapter,
system prompt and quotas. It never holds a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from hybridserve.errors import InvalidArgument, PermissionDenied
from hybridserve.tenancy.keys import KeyKind

#: A tenant id; it is also the tenant's Weaviate tenant name.
TENANT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_DISPLAY_NAME_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 8000
MAX_KEY_NAME_CHARS = 100
#: The largest value of any quota (per minute, or streams).
MAX_QUOTA = 10**9


def validate_tenant_id(tenant: str, field_name: str = "tenant") -> str:
    if not isinstance(tenant, str) or not TENANT_ID_RE.match(tenant):
        raise InvalidArgument(
            f"invalid tenant id {str(tenant)[:80]!r}: use 1-64 characters, letters, digits, "
            "'_' or '-', starting with a letter or digit",
            field_violations=[(field_name, "must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}")],
        )
    return tenant


def rfc3339(ts: float | None) -> str:
    """Epoch seconds as RFC 3339 UTC text ("" for None)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; 0 means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_streams: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.concurrent_streams)

    def validate(self) -> Quotas:
        for name in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= MAX_QUOTA:
                raise InvalidArgument(
                    f"quotas.{name} must be an integer from 0 (no limit) to {MAX_QUOTA}, got {value!r}",
                    field_violations=[(f"quotas.{name}", f"0..{MAX_QUOTA}")],
                )
        return self


@dataclass(frozen=True)
class Tenant:
    id: str
    display_name: str = ""
    allow_base: bool = False
    adapters: tuple[str, ...] = ()
    default_adapter: str = ""
    system_prompt: str = ""
    quotas: Quotas = field(default_factory=Quotas)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class ApiKeyInfo:
    """Everything about a key except its secret (which is never stored)."""

    key_id: str
    kind: KeyKind
    tenant: str
    name: str
    created_at: float
    last_used_at: float | None = None
    expires_at: float | None = None
    revoked_at: float | None = None

    def usable_at(self, now: float) -> str | None:
        """Why the key cannot be used at `now` ("revoked", "expired"), or None."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str = ""
    tenant: str = ""


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, or a tenant with its context.

    The servicers get one from `Tenancy.authenticate`; everything below them
    takes the tenant id or this object, never a credential.
    """

    kind: KeyKind
    key_id: str
    key_name: str = ""
    tenant: Tenant | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def tenant_id(self) -> str | None:
        return self.tenant.id if self.tenant else None

    @property
    def actor(self) -> str:
        """How audit entries name this caller."""
        return f"{self.kind}:{self.key_id}"

    def require_admin(self, what: str) -> None:
        if not self.is_admin:
            raise PermissionDenied(
                f"{what} needs an admin key; this is a tenant key of {self.tenant_id!r}",
                reason="ADMIN_REQUIRED",
            )

    def own_tenant(self, requested: str, field_name: str = "tenant") -> str:
        """The tenant a tenant key acts in: its own. Naming another one is refused.

        For admin keys use `Tenancy.resolve_tenant`, which checks the tenant exists.
        """
        assert self.tenant is not None
        if requested and requested != self.tenant.id:
            raise PermissionDenied(
                f"this key belongs to tenant {self.tenant.id!r} and cannot act in another "
                f"tenant; leave {field_name} empty or set it to {self.tenant.id!r}",
                reason="TENANT_MISMATCH",
            )
        return self.tenant.id

    def authorize_adapter(self, adapter: str) -> str:
        """Checks that this caller may generate with `adapter` ("" is the base model).

        Admin keys may use any adapter; the registry still checks that it exists.
        """
        if self.may_use(adapter):
            return adapter
        assert self.tenant is not None
        t = self.tenant
        if adapter:
            raise PermissionDenied(
                f"adapter {adapter!r} is not granted to tenant {t.id!r}; "
                f"its adapters: {', '.join(t.adapters) or '(none)'}",
                reason="ADAPTER_NOT_GRANTED",
                metadata={"adapter": adapter[:200]},
            )
        raise PermissionDenied(
            f"tenant {t.id!r} may not use the base model; name one of its adapters "
            f"({', '.join(t.adapters) or 'none granted'})",
            reason="BASE_MODEL_NOT_ALLOWED",
        )

    def choose_adapter(self, requested: str) -> str:
        """The adapter an answer runs with: the one named (if granted), else the
        tenant's default, else the base model (if allowed)."""
        if not requested and self.tenant is not None and self.tenant.default_adapter:
            return self.tenant.default_adapter
        return self.authorize_adapter(requested)

    def may_use(self, adapter: str) -> bool:
        if self.is_admin:
            return True
        assert self.tenant is not None
        return adapter in self.tenant.adapters if adapter else self.tenant.allow_base
