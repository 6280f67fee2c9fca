"""Adapter registration as the GenerationService API serves it: listing what a
principal may use, and the admin-only register / unregister, each audited (also
when refused). Transport-free; `GenerationServicer` maps it to gRPC.

NOTE: these admin writes are still served by the generation replicas (the RPCs are
on GenerationService), not by the control plane's AdminService: moving them there
changes the API (protos, SDK, CLI, the LoRAAdapter controller) and how the calls
are admitted (the AdminService's per-key call limit and sampled refusal audits).
This object holds the whole logic, so that move is a matter of calling it from
another servicer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from hybridserve.errors import FailedPrecondition, HybridServeError
from hybridserve.adapters import AdapterRecord, AdapterRegistry
from hybridserve.tenancy.domain import Principal
from hybridserve.tenancy.store import TenancyStore

T = TypeVar("T")


class AdapterRegistration:
    """Args:
        registry: the adapter registry (shared by every replica).
        store: the tenancy store (grants, and the audit log).
    """

    def __init__(self, registry: AdapterRegistry, store: TenancyStore):
        self.registry = registry
        self.store = store

    async def list_for(self, principal: Principal) -> list[AdapterRecord]:
        """The registered adapters `principal` may use (a tenant sees only those)."""
        records = await _off_loop(self.registry.list)
        return [r for r in records if principal.may_use(r.id)]

    async def register(self, principal: Principal, name: str, path: str, *,
                       version: str = "", metadata: Mapping[str, str] | None = None,
                       ) -> tuple[AdapterRecord, bool]:
        """Registers the adapter folder `path` (inside the adapter store) as `name`;
        returns its record and whether it is new. Admin only; audited."""

        def register():
            # The registry validates name and path (empty ones included) with its own messages.
            return self.registry.register(
                name, path, version=version or None, metadata=dict(metadata or {}),
            )

        return await self._admin_action(
            principal, "RegisterAdapter", f"adapter/{name[:64]}", register,
            lambda result: f"{result[0].id} ({'new' if result[1] else 'already registered'})",
        )

    async def unregister(self, principal: Principal, adapter_id: str) -> None:
        """Unregisters `adapter_id`, refused while a tenant is granted it. Admin
        only; audited."""

        def unregister():
            granted = self.store.tenants_granted(adapter_id)
            if granted:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} is still granted to {', '.join(granted)}; revoke "
                    "those grants first (`hybridserve admin grants revoke TENANT ADAPTER`)",
                    reason="ADAPTER_IN_USE", metadata={"tenants": ",".join(granted)[:500]},
                )
            self.registry.unregister(adapter_id)

        await self._admin_action(principal, "UnregisterAdapter", f"adapter/{adapter_id[:200]}",
                                 unregister)

    async def _admin_action(self, principal: Principal, action: str, target: str,
                            fn: Callable[[], T],
                            describe: Callable[[T], str] | None = None) -> T:
        """Runs an admin-only registry action off the loop and audits it (also when refused)."""
        store = self.store
        try:
            principal.require_admin(action)
            result = await _off_loop(fn)
        except HybridServeError as e:
            await _off_loop(store.record_audit, principal.actor, action, target, e.code,
                            e.message)
            raise
        await _off_loop(store.record_audit, principal.actor, action, target, "OK",
                        describe(result) if describe else "")
        return result


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    # Registry calls hash and copy files, store calls wait on the database: keep them
    # off the event loop that streams tokens.
    return await asyncio.to_thread(fn, *args)
