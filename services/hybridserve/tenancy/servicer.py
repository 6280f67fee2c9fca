"""The AdminService gRPC servicer: protobuf in, `AdminService` calls, protobuf out.

A plain class; `hybridserve.app` deploys it as the `admin` Serve app and gives it
the knowledge hooks (handles to the retrieval deployment).
"""

from __future__ import annotations

import logging
from typing import Any

from grpc_health.v1 import health_pb2

from hybridserve import topology
from hybridserve.adapters import AdapterRegistry
from hybridserve.adapters.proto import adapter_to_proto
from hybridserve.config import HybridServeConfig
from hybridserve.grpc_errors import grpc_unary
from hybridserve.models import model_dir_for
from hybridserve.tenancy.admin import AdminService, Knowledge
from hybridserve.tenancy.admin_limits import AdminLimits
from hybridserve.tenancy.auth import Tenancy, setup_servicer
from hybridserve.tenancy.domain import ApiKeyInfo, AuditEntry, Quotas, Tenant, rfc3339
from hybridserve.tenancy.keys import display_prefix
from hybridserve.tenancy.registration import AdapterRegistration
from hybridserve.v1 import admin_pb2, generation_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = topology.ADMIN.service


def quotas_to_proto(q: Quotas) -> admin_pb2.Quotas:
    return admin_pb2.Quotas(
        requests_per_minute=q.requests_per_minute,
        tokens_per_minute=q.tokens_per_minute,
        concurrent_streams=q.concurrent_streams,
    )


def tenant_to_proto(t: Tenant) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(
        id=t.id, display_name=t.display_name, allow_base=t.allow_base, adapters=list(t.adapters),
        default_adapter=t.default_adapter, system_prompt=t.system_prompt,
        quotas=quotas_to_proto(t.quotas), created_at=rfc3339(t.created_at),
        updated_at=rfc3339(t.updated_at),
    )


def key_to_proto(k: ApiKeyInfo) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=k.key_id, kind=k.kind, tenant=k.tenant, name=k.name,
        created_at=rfc3339(k.created_at), last_used_at=rfc3339(k.last_used_at),
        expires_at=rfc3339(k.expires_at), revoked_at=rfc3339(k.revoked_at),
        prefix=display_prefix(k.kind, k.key_id),
    )


def audit_to_proto(e: AuditEntry) -> admin_pb2.AuditEntry:
    return admin_pb2.AuditEntry(id=e.id, at=rfc3339(e.at), actor=e.actor, action=e.action,
                                target=e.target, outcome=e.outcome, detail=e.detail,
                                tenant=e.tenant)


class AdminServicer:
    """Implements hybridserve.v1.AdminService and grpc.health.v1.Health: `admin`
    (`AdminService`: tenants, keys, grants, quotas, the audit log) and `registration`
    (`AdapterRegistration`: registering and unregistering adapters in the registry the
    generation replicas read).

    Args:
        config: platform config (a dict is accepted, as Serve passes it).
        tenancy: authentication; default: the store the config names.
        knowledge: creates / deletes tenants' knowledge spaces (None: retrieval
            does not run, tenants get no knowledge space until their first write).
        limits: the per-key call limit and refused-call audit gate; default: on the
            quotas' Redis, as the config sets them (none when `tenancy` has no quotas).
    """

    metrics_service = "admin"
    grpc_service = SERVICE_NAME

    def __init__(self, config: HybridServeConfig | dict, tenancy: Tenancy | None = None,
                 knowledge: Knowledge | None = None, limits: AdminLimits | None = None):
        cfg, self.tenancy = setup_servicer(config, tenancy, self.metrics_service)
        self.config = cfg
        quotas = self.tenancy.quotas
        if limits is None and quotas is not None:
            limits = AdminLimits.from_config(cfg)
        t = cfg.tenancy
        # The base model's folder as the generation replicas load it: adapters trained
        # against it by path are accepted too (a path only; nothing is loaded here).
        registry = AdapterRegistry.from_config(cfg, model_dir_for(cfg))
        self.registration = AdapterRegistration(registry, self.tenancy.store)
        self.admin = AdminService(
            self.tenancy.store, registry.exists, knowledge,
            settle_s=2 * cfg.tenancy.auth_cache_ttl_s + 1.0,
            forget_quotas=quotas.reset if quotas is not None else None,
            default_quotas=Quotas(**cfg.tenancy.default_quotas.model_dump()),
            limits=limits,
            audit_retention_s=t.audit_retention_days * 86400.0,
            audit_max_rows=t.audit_max_rows,
            prune_interval_s=t.audit_prune_interval_s,
        )

    async def shutdown(self) -> None:
        await self.admin.close()
        await self.tenancy.close()

    async def _caller(self, grpc_context, action: str):
        """The caller, admitted: every RPC takes one call of its key's control-plane
        budget (refused calls too), and a tenant key's call counts against its
        tenant's requests_per_minute like any other RPC of its keys."""
        p = await self.tenancy.authenticate(grpc_context)
        self.admin.ensure_pruning()
        await self.admin.admit(p, action)
        if not p.is_admin:
            async with self.tenancy.admit(p):
                pass
        return p

    @grpc_unary
    async def WhoAmI(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "WhoAmI")
        reply = admin_pb2.WhoAmIResponse(kind=p.kind, key_id=p.key_id, key_name=p.key_name)
        if p.tenant is not None:
            reply.tenant.CopyFrom(tenant_to_proto(p.tenant))
        return reply

    @grpc_unary
    async def CreateTenant(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "CreateTenant")
        q, d = request.quotas, self.admin.default_quotas
        # Unset quotas are the platform's defaults: "no limit" (0) must be asked for.
        quotas = Quotas(*(getattr(q, f) if q.HasField(f) else getattr(d, f)
                          for f in ("requests_per_minute", "tokens_per_minute",
                                    "concurrent_streams")))
        tenant, created = await self.admin.create_tenant(p, Tenant(
            id=request.id, display_name=request.display_name, allow_base=request.allow_base,
            system_prompt=request.system_prompt, quotas=quotas,
        ))
        return admin_pb2.CreateTenantResponse(tenant=tenant_to_proto(tenant), created=created)

    @grpc_unary
    async def GetTenant(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "GetTenant")
        return tenant_to_proto(await self.admin.get_tenant(p, request.id))

    @grpc_unary
    async def ListTenants(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "ListTenants")
        tenants = await self.admin.list_tenants(p)
        return admin_pb2.ListTenantsAdminResponse(tenants=[tenant_to_proto(t) for t in tenants])

    @grpc_unary
    async def UpdateTenant(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "UpdateTenant")

        def opt(name):
            return getattr(request, name) if request.HasField(name) else None

        tenant = await self.admin.update_tenant(
            p, request.id, display_name=opt("display_name"), allow_base=opt("allow_base"),
            system_prompt=opt("system_prompt"),
        )
        return tenant_to_proto(tenant)

    @grpc_unary
    async def DeleteTenant(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "DeleteTenant")
        chunks, n_keys = await self.admin.delete_tenant(p, request.id)
        return admin_pb2.DeleteTenantAdminResponse(deleted_chunks=chunks, deleted_keys=n_keys)

    @grpc_unary
    async def CreateKey(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "CreateKey")
        info, secret = await self.admin.create_key(
            p, tenant=request.tenant, name=request.name, kind=request.kind or "tenant",
            ttl_s=float(request.ttl_seconds),
        )
        return admin_pb2.CreateKeyResponse(key=key_to_proto(info), secret=secret)

    @grpc_unary
    async def ListKeys(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "ListKeys")
        found = await self.admin.list_keys(p, request.tenant, request.include_revoked)
        return admin_pb2.ListKeysResponse(keys=[key_to_proto(k) for k in found])

    @grpc_unary
    async def RevokeKey(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "RevokeKey")
        return key_to_proto(await self.admin.revoke_key(p, request.key_id))

    @grpc_unary
    async def GrantAdapter(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "GrantAdapter")
        return tenant_to_proto(
            await self.admin.grant(p, request.tenant, request.adapter, request.make_default))

    @grpc_unary
    async def RevokeAdapter(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "RevokeAdapter")
        return tenant_to_proto(await self.admin.revoke_grant(p, request.tenant, request.adapter))

    @grpc_unary
    async def RegisterAdapter(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "RegisterAdapter")
        record, created = await self.registration.register(
            p, request.name, request.path, version=request.version,
            metadata=dict(request.metadata))
        return generation_pb2.RegisterAdapterResponse(adapter=adapter_to_proto(record),
                                                      created=created)

    @grpc_unary
    async def UnregisterAdapter(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "UnregisterAdapter")
        await self.registration.unregister(p, request.id)
        return generation_pb2.UnregisterAdapterResponse()

    @grpc_unary
    async def SetQuotas(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "SetQuotas")

        def opt(name):
            return getattr(request, name) if request.HasField(name) else None

        return tenant_to_proto(await self.admin.set_quotas(
            p, request.tenant, requests_per_minute=opt("requests_per_minute"),
            tokens_per_minute=opt("tokens_per_minute"), concurrent_streams=opt("concurrent_streams"),
        ))

    @grpc_unary
    async def Apply(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "Apply")
        changes = await self.admin.apply(p, request.document, request.dry_run,
                                         keep_grants=request.keep_grants)
        return admin_pb2.ApplyResponse(
            changes=[admin_pb2.Change(action=c.action, tenant=c.tenant, detail=c.detail)
                     for c in changes],
            dry_run=request.dry_run,
        )

    @grpc_unary
    async def ListAudit(self, request, grpc_context: Any = None):
        p = await self._caller(grpc_context, "ListAudit")
        entries = await self.admin.list_audit(
            p, request.limit, request.tenant,
            after_id=request.after_id if request.HasField("after_id") else None)
        return admin_pb2.ListAuditResponse(entries=[audit_to_proto(e) for e in entries])

    # -- grpc.health.v1.Health ---------------------------------------------------------

    async def Check(self, request, grpc_context: Any = None):
        if request.service not in ("", SERVICE_NAME):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
