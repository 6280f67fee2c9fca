"""The control plane's domain logic: tenants, keys, grants, quotas, the tenants
file and the audit log. Transport-free; `AdminServicer` maps it to gRPC.

Every call is admitted first (`admit`: a per-key rate limit, see `admin_limits`).
Every action needs an admin principal, and every action leaves an audit entry: who,
what, when, the outcome. Refused calls (PERMISSION_DENIED, RESOURCE_EXHAUSTED) are
sampled: at most one entry per key and outcome per `audit_refusal_window_s`, which
counts the refusals in between. The log is pruned in the background to
`audit_retention_days` and `audit_max_rows`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hybridserve.adapters import parse_adapter_id
from hybridserve.errors import HybridServeError, InvalidArgument, NotFound, ResourceExhausted
from hybridserve.tenancy import keys
from hybridserve.tenancy import tenants_file
from hybridserve.tenancy.domain import (
    MAX_DISPLAY_NAME_CHARS,
    MAX_KEY_NAME_CHARS,
    MAX_SYSTEM_PROMPT_CHARS,
    TENANT_ID_RE,
    ApiKeyInfo,
    AuditEntry,
    Principal,
    Quotas,
    Tenant,
    rfc3339,
    validate_tenant_id,
)
from hybridserve.tenancy.admin_limits import AdminLimits, AuditTicket
from hybridserve.tenancy.auth import store_call
from hybridserve.tenancy.store import TenancyStore, tenant_diff

logger = logging.getLogger(__name__)

#: Entries one ListAudit call returns at most: 500 entries of the longest detail stay
#: well under the proxy's message limit (serve.max_message_bytes, 4 MiB).
MAX_AUDIT_LIMIT = 500
MAX_KEY_TTL_S = 10 * 365 * 86400


class Knowledge(Protocol):
    """The retrieval side of a tenant's lifecycle (a Serve handle in production)."""

    async def create(self, tenant: str) -> None: ...

    async def delete(self, tenant: str) -> int: ...


@dataclass(frozen=True)
class Change:
    action: str
    tenant: str
    detail: str = ""


class _RollBack(Exception):
    """Ends a dry run's transaction (rolled back) and carries its plan out."""

    def __init__(self, changes: list[Change]):
        super().__init__("dry run")
        self.changes = changes


def _check_text(value: str, limit: int, name: str) -> str:
    if len(value) > limit:
        raise InvalidArgument(
            f"{name} is longer than {limit} characters",
            field_violations=[(name, f"at most {limit} characters")],
        )
    return value


class AdminService:
    """Args:
        store: the tenancy store.
        adapter_exists: whether an adapter id is registered (the adapter registry).
        knowledge: creates / deletes a tenant's knowledge space; None when the
            retrieval service does not run.
        settle_s: how long a deletion waits, after the tenant is gone from the
            store, before its documents are deleted: twice the replicas' auth cache
            TTL plus a second, so a request admitted on a stale cache entry has
            landed first.
        forget_quotas: drops a tenant's quota counters (on deletion).
        default_quotas: the quotas of a tenant created without any.
        limits: the per-key call limit and the refused-call audit gate; None: no
            limit, and every refusal is audited.
        audit_retention_s: audit entries older than this are pruned (0: kept).
        audit_max_rows: at most this many entries are kept (0: no bound).
        prune_interval_s: how often the background pruning runs.
    """

    def __init__(
        self,
        store: TenancyStore,
        adapter_exists: Callable[[str], bool],
        knowledge: Knowledge | None = None,
        *,
        settle_s: float = 0.5,
        forget_quotas: Callable[[str], Any] | None = None,
        default_quotas: Quotas = Quotas(),
        limits: AdminLimits | None = None,
        audit_retention_s: float = 0.0,
        audit_max_rows: int = 0,
        prune_interval_s: float = 300.0,
    ):
        self.store = store
        self.adapter_exists = adapter_exists
        self.knowledge = knowledge
        self.settle_s = settle_s
        self.forget_quotas = forget_quotas
        #: what a tenant created without quotas (RPC or tenants file) gets
        self.default_quotas = default_quotas
        self.limits = limits
        self.audit_retention_s = audit_retention_s
        self.audit_max_rows = audit_max_rows
        self.prune_interval_s = prune_interval_s
        self._pruner: asyncio.Task | None = None

    # -- admission and audit ------------------------------------------------------------

    async def admit(self, p: Principal, action: str) -> None:
        """Takes one call of the caller's per-key budget; every RPC calls this first.
        Raises ResourceExhausted (audited, sampled) past the limit."""
        if self.limits is None:
            return
        try:
            await self.limits.take(p.kind, p.key_id)
        except ResourceExhausted as e:
            await self._audit_refusal(p, action, "admin", e)
            raise

    async def _require_admin(self, p: Principal, action: str, target: str,
                             tenant: str | None = None) -> None:
        try:
            p.require_admin(action)
        except HybridServeError as e:
            await self._audit_refusal(p, action, target, e, tenant)
            raise

    async def _audit_refusal(self, p: Principal, action: str, target: str,
                             e: HybridServeError, tenant: str | None = None) -> None:
        """Audits a refused call, sampled: at most one entry per key and outcome per
        window; the entry counts the refusals that were not written before it."""
        ticket = (AuditTicket(0, None) if self.limits is None
                  else await self.limits.audit_ticket(p.actor, e.code))
        if ticket is None:
            return
        detail = e.message
        if ticket.suppressed:
            detail += (f" [+{ticket.suppressed} more refused call(s) of this key with "
                       f"{e.code} since {rfc3339(ticket.since)}, counted, not logged]")
        await self._audit_failure(p, action, target, e.code, detail, tenant)

    async def prune_audit(self) -> int:
        """Deletes audit entries past the retention bounds; returns how many."""
        if not self.audit_retention_s and not self.audit_max_rows:
            return 0
        older_than = (self.store.clock() - self.audit_retention_s
                      if self.audit_retention_s else None)
        removed = await asyncio.to_thread(
            store_call, lambda: self.store.prune_audit(
                older_than=older_than, keep_rows=self.audit_max_rows or None))
        if removed:
            logger.info("audit log: %d entries past the retention bounds removed", removed)
        return removed

    def ensure_pruning(self) -> None:
        """Starts the background pruning on the running event loop (once; again if it
        ended). The first run is at once, then every `prune_interval_s`."""
        if (not self.audit_retention_s and not self.audit_max_rows) or (
                self._pruner is not None and not self._pruner.done()):
            return
        self._pruner = asyncio.get_running_loop().create_task(self._prune_forever())

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune_audit()
            except Exception:  # noqa: BLE001 - try again next interval
                logger.warning("could not prune the audit log", exc_info=True)
            await asyncio.sleep(self.prune_interval_s)

    async def close(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
        if self.limits is not None:
            await self.limits.close()

    async def _run(self, p: Principal, action: str, target: str, fn: Callable[[], Any],
                   tenant: str | None = None) -> Any:
        """Runs one admin action off the event loop; a refused or failed one is
        audited here (successful ones audit themselves in their transaction)."""
        await self._require_admin(p, action, target, tenant)
        try:
            return await asyncio.to_thread(store_call, fn)
        except HybridServeError as e:
            await self._audit_failure(p, action, target, e.code, e.message, tenant)
            raise
        except Exception as e:
            await self._audit_failure(p, action, target, "INTERNAL", type(e).__name__, tenant)
            raise

    async def _audit_failure(self, p, action, target, code, message, tenant) -> None:
        try:
            await asyncio.to_thread(self.store.record_audit, p.actor, action, target, code,
                                    message, tenant if tenant and TENANT_ID_RE.match(tenant) else None)
        except Exception:  # noqa: BLE001 - the original error matters more
            logger.warning("could not audit a failed %s", action, exc_info=True)

    def _require_adapter(self, adapter: str, field_name: str = "adapter") -> None:
        try:
            parse_adapter_id(adapter)
        except HybridServeError as e:
            raise InvalidArgument(e.message, field_violations=[(field_name, e.message)]) from None
        if not self.adapter_exists(adapter):
            raise NotFound(
                f"adapter {adapter!r} is not registered; register it first "
                "(`hybridserve adapters register`)", reason="ADAPTER_NOT_FOUND",
            )

    # -- tenants --------------------------------------------------------------------

    async def create_tenant(self, p: Principal, t: Tenant) -> tuple[Tenant, bool]:
        def create():
            validate_tenant_id(t.id, "id")
            _check_text(t.display_name, MAX_DISPLAY_NAME_CHARS, "display_name")
            _check_text(t.system_prompt, MAX_SYSTEM_PROMPT_CHARS, "system_prompt")
            t.quotas.validate()
            return self.store.create_tenant(t, actor=p.actor)

        tenant, created = await self._run(p, "CreateTenant", f"tenant/{t.id}", create, t.id)
        await self._new_knowledge(tenant.id, fresh=created)
        return tenant, created

    async def _new_knowledge(self, tenant_id: str, *, fresh: bool) -> None:
        """Creates the tenant's knowledge space. For a new tenant, anything left under
        its id (a deleted tenant's straggling write) is removed first, so a new tenant
        never sees an old one's documents. Upsert creates the space too, so a failure
        here only delays it."""
        if self.knowledge is None:
            return
        try:
            if fresh:
                await self.knowledge.delete(tenant_id)
            await self.knowledge.create(tenant_id)
        except Exception as e:  # noqa: BLE001
            logger.warning("tenant %s: knowledge space not created yet (%s)", tenant_id, e)

    async def get_tenant(self, p: Principal, tenant_id: str) -> Tenant:
        await self._require_admin(p, "GetTenant", f"tenant/{tenant_id[:64]}")
        return await asyncio.to_thread(self.store.get_tenant, tenant_id)

    async def list_tenants(self, p: Principal) -> list[Tenant]:
        await self._require_admin(p, "ListTenants", "tenants")
        return await asyncio.to_thread(self.store.list_tenants)

    async def update_tenant(self, p: Principal, tenant_id: str, *, display_name: str | None = None,
                            allow_base: bool | None = None, system_prompt: str | None = None) -> Tenant:
        def update():
            if display_name is not None:
                _check_text(display_name, MAX_DISPLAY_NAME_CHARS, "display_name")
            if system_prompt is not None:
                _check_text(system_prompt, MAX_SYSTEM_PROMPT_CHARS, "system_prompt")
            return self.store.update_tenant(tenant_id, actor=p.actor, display_name=display_name,
                                            allow_base=allow_base, system_prompt=system_prompt)

        return await self._run(p, "UpdateTenant", f"tenant/{tenant_id}", update, tenant_id)

    async def delete_tenant(self, p: Principal, tenant_id: str) -> tuple[int, int]:
        """Deletes the tenant and its keys, then its documents; (chunks, keys) removed."""
        n_keys = await self._run(
            p, "DeleteTenant", f"tenant/{tenant_id}",
            lambda: self.store.delete_tenant(tenant_id, actor=p.actor), tenant_id,
        )
        chunks = 0
        if self.forget_quotas is not None:
            try:
                await self.forget_quotas(tenant_id)
            except Exception as e:  # noqa: BLE001 - counters expire by themselves
                logger.warning("tenant %s: quota counters not reset (%s)", tenant_id, e)
        if self.knowledge is not None:
            # NOTE: after the settle time, so a request a replica admitted on a stale
            # cache entry just before the deletion has written before the documents go
            # (and a straggler after it is removed when the id is created again).
            await asyncio.sleep(self.settle_s)
            chunks = await self.knowledge.delete(tenant_id)
        return chunks, n_keys

    async def set_quotas(self, p: Principal, tenant_id: str, *, requests_per_minute: int | None = None,
                         tokens_per_minute: int | None = None,
                         concurrent_streams: int | None = None) -> Tenant:
        def set_quotas():
            current = self.store.get_tenant(tenant_id).quotas
            quotas = Quotas(
                current.requests_per_minute if requests_per_minute is None else requests_per_minute,
                current.tokens_per_minute if tokens_per_minute is None else tokens_per_minute,
                current.concurrent_streams if concurrent_streams is None else concurrent_streams,
            ).validate()
            return self.store.update_tenant(tenant_id, actor=p.actor, action="SetQuotas",
                                            quotas=quotas)

        return await self._run(p, "SetQuotas", f"tenant/{tenant_id}", set_quotas, tenant_id)

    # -- grants ---------------------------------------------------------------------

    async def grant(self, p: Principal, tenant_id: str, adapter: str, make_default: bool) -> Tenant:
        def grant():
            validate_tenant_id(tenant_id)
            self._require_adapter(adapter)
            return self.store.grant(tenant_id, adapter, make_default=make_default, actor=p.actor)

        return await self._run(p, "GrantAdapter", f"tenant/{tenant_id}", grant, tenant_id)

    async def revoke_grant(self, p: Principal, tenant_id: str, adapter: str) -> Tenant:
        return await self._run(
            p, "RevokeAdapter", f"tenant/{tenant_id}",
            lambda: self.store.revoke_grant(tenant_id, adapter, actor=p.actor), tenant_id,
        )

    # -- keys -----------------------------------------------------------------------

    async def create_key(self, p: Principal, *, tenant: str, name: str, kind: str = "tenant",
                         ttl_s: float = 0) -> tuple[ApiKeyInfo, str]:
        """A new key; (its info, the whole key). The key is returned once, never stored."""
        kind = kind or "tenant"

        def create():
            if kind not in ("tenant", "admin"):
                raise InvalidArgument(f"kind must be 'tenant' or 'admin', got {kind!r}",
                                      field_violations=[("kind", "tenant or admin")])
            if kind == "tenant":
                validate_tenant_id(tenant)
            elif tenant:
                raise InvalidArgument("an admin key belongs to no tenant: leave tenant empty",
                                      field_violations=[("tenant", "must be empty for an admin key")])
            _check_text(name, MAX_KEY_NAME_CHARS, "name")
            if not 0 <= ttl_s <= MAX_KEY_TTL_S:
                raise InvalidArgument(f"ttl_seconds must be 0 (never expires) to {MAX_KEY_TTL_S}",
                                      field_violations=[("ttl_seconds", f"0..{MAX_KEY_TTL_S}")])
            key = keys.generate(kind)  # type: ignore[arg-type]
            expires = self.store.clock() + ttl_s if ttl_s else None
            info = self.store.add_key(key_id=key.key_id, kind=kind, tenant_id=tenant or None,
                                      name=name, digest=key.digest, expires_at=expires, actor=p.actor)
            return info, key.key

        return await self._run(p, "CreateKey", f"tenant/{tenant}" if tenant else "admin", create,
                               tenant or None)

    async def list_keys(self, p: Principal, tenant: str = "", include_revoked: bool = False) -> list[ApiKeyInfo]:
        await self._require_admin(p, "ListKeys", f"tenant/{tenant[:64]}" if tenant else "keys")
        return await asyncio.to_thread(self.store.list_keys, tenant, include_revoked)

    async def revoke_key(self, p: Principal, key_id: str) -> ApiKeyInfo:
        return await self._run(p, "RevokeKey", f"key/{key_id[:40]}",
                               lambda: self.store.revoke_key(key_id, actor=p.actor))

    # -- the tenants file -----------------------------------------------------------

    async def apply(self, p: Principal, document: str, dry_run: bool,
                    keep_grants: bool = False) -> list[Change]:
        """Makes the file's tenants exist exactly as described, in one transaction.
        `keep_grants`: grants are only added, never removed, and the default adapter
        changes only where the file names one (grants managed elsewhere survive)."""

        def apply():
            wanted = tenants_file.parse(document, self.adapter_exists, self.default_quotas)
            try:
                with self.store.write() as conn:
                    changes = self._plan_and_apply(conn, p, wanted, dry_run, keep_grants)
                    if dry_run:
                        raise _RollBack(changes)
            except _RollBack as planned:
                changes = planned.changes
                self.store.record_audit(p.actor, "Apply", "tenants-file", "OK",
                                        f"dry run: {len(changes)} change(s) planned, none made")
            return changes

        changes = await self._run(p, "Apply", "tenants-file", apply)
        if not dry_run:
            for c in changes:
                if c.action == "create":
                    await self._new_knowledge(c.tenant, fresh=True)
        return changes

    def _plan_and_apply(self, conn, p: Principal, wanted: list[Tenant], dry_run: bool,
                        keep_grants: bool = False) -> list[Change]:
        changes: list[Change] = []
        store = self.store
        # NOTE: changes are made inside the caller's transaction; a dry run rolls
        # it back, so planning and applying share one code path.
        for t in wanted:
            exists = store._get_tenant_or_none(conn, t.id)
            if exists is None:
                store.create_tenant(t, actor=p.actor, conn=conn)
                changes.append(Change("create", t.id, "tenant"))
                before = store._get_tenant(conn, t.id)
            else:
                before = exists
            fields = {}
            for name in ("display_name", "allow_base", "system_prompt"):
                if getattr(before, name) != getattr(t, name):
                    fields[name] = getattr(t, name)
            if before.quotas != t.quotas:
                fields["quotas"] = t.quotas
            if fields:
                after = store.update_tenant(t.id, actor=p.actor, conn=conn, action="Apply", **fields)
                if exists is not None:
                    changes.append(Change("update", t.id, tenant_diff(before, after)))
            for adapter in sorted(set(before.adapters) - set(t.adapters)) if not keep_grants else ():
                store.revoke_grant(t.id, adapter, actor=p.actor, conn=conn)
                changes.append(Change("revoke", t.id, f"adapter {adapter}"))
            for adapter in sorted(set(t.adapters) - set(before.adapters)):
                store.grant(t.id, adapter, make_default=False, actor=p.actor, conn=conn)
                changes.append(Change("grant", t.id, f"adapter {adapter}"))
            current = store._get_tenant(conn, t.id)
            if current.default_adapter != t.default_adapter and not (
                    keep_grants and not t.default_adapter):
                store.set_default(t.id, t.default_adapter, actor=p.actor, conn=conn)
                changes.append(Change(
                    "default", t.id, f"{current.default_adapter or '-'} -> {t.default_adapter or '-'}"))
        if changes and not dry_run:
            store._audit(conn, p.actor, "Apply", "tenants-file", "OK",
                         f"{len(changes)} change(s) to {len({c.tenant for c in changes})} tenant(s)")
        return changes

    # -- audit ----------------------------------------------------------------------

    async def list_audit(self, p: Principal, limit: int = 100, tenant: str = "",
                         after_id: int | None = None) -> list[AuditEntry]:
        """Newest first; with `after_id`, the oldest entries above that id first
        (an export resumes from the last id it has)."""
        await self._require_admin(p, "ListAudit", "audit")
        limit = limit or 100
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise InvalidArgument(f"limit must be 1..{MAX_AUDIT_LIMIT}",
                                  field_violations=[("limit", f"1..{MAX_AUDIT_LIMIT}")])
        return await asyncio.to_thread(store_call, self.store.list_audit, limit, tenant, after_id)
