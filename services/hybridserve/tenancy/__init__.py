"""Tenancy: tenants, API keys, adapter grants, quotas and the audit log.

`Tenancy.authenticate` turns a credential into a `Principal` (the tenant context
every servicer uses); `AdminService` is the control plane behind the
AdminService gRPC API, the `hybridserve admin` CLI and the tenants file;
`AdapterRegistration` (registration.py) registers and unregisters adapters for it,
and lists them for GenerationService.
"""

from hybridserve.tenancy.domain import Principal, Quotas, Tenant

__all__ = ["Principal", "Quotas", "Tenant"]
