"""One LoRAAdapter, brought to what its spec asks: the logic, free of transport.

`Reconciler.reconcile(obj)` reads the object (a dict as the API server returns
it) and acts through two interfaces:

- `Kube`: patch the object's finalizers and its status subresource;
- `Platform`: register/unregister an adapter, grant/revoke it to a tenant (the
  admin API; `hybridserve.client.HybridServeClient` is one).

A LoRAAdapter is not an admin key. Whoever may create one in a namespace gets
only what that namespace owns:

- its source is a folder under `<adapter store>/<namespace>/`: `spec.source` is
  relative to it, and a path that leaves it (absolute, `..`) is refused;
- it may grant only to the tenants the platform operator lists for its namespace
  (`--namespace-tenants NS=T1,T2`; the Helm chart's `controller.namespaceTenants`),
  which nothing in the namespace can change;
- what it revokes and unregisters comes from the registry's own record: the
  adapters whose owner tag (adapter metadata `kubernetes: <namespace>/<name>`,
  written at registration) names this resource, and, of those, the grants held by
  the tenants its namespace may grant to. The status is a report for people; a
  status someone wrote by hand can make the controller touch nothing else.

Every step is idempotent, so a reconcile that dies half-way is simply run
again: registering the same bytes under the same id answers `created=False`,
a grant that exists is kept, a revoke of a missing grant is ignored. A
converged object (status.observedGeneration == metadata.generation, Ready)
costs no call at all.

Status: `conditions` (one, `Ready`: True with reason Registered; False with
Failed-style reasons), `observedGeneration`, `adapterId`, `grantedTenants`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from hybridserve import exceptions as exc
from hybridserve.adapters.ids import NAME_RE, NAME_RULE
from hybridserve.controller import FINALIZER

#: Adapter metadata naming the LoRAAdapter that owns a registered adapter.
OWNER_KEY = "kubernetes"

class Kube(Protocol):
    def set_finalizers(self, obj: dict, finalizers: list[str]) -> dict: ...
    def patch_status(self, obj: dict, status: dict) -> dict: ...


class Platform(Protocol):
    def list_adapters(self) -> list[Any]: ...
    def get_tenant(self, tenant: str) -> Any: ...
    def register_adapter(self, name: str, path: str, *, version: str = "",
                         metadata: dict[str, str] | None = None) -> Any: ...
    def unregister_adapter(self, adapter_id: str) -> None: ...
    def grant_adapter(self, tenant: str, adapter: str, *, make_default: bool = False) -> Any: ...
    def revoke_adapter(self, tenant: str, adapter: str) -> Any: ...


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did. `retry`: run again later (with backoff)."""

    kind: str  # skipped | ready | failed | error | deleted | blocked
    retry: bool = False
    adapter_id: str = ""
    message: str = ""


#: Platform errors that the spec (or the world outside the platform) must fix:
#: reported as Failed and retried slowly, never in a tight loop.
_SPEC_ERRORS = (exc.InvalidArgumentError, exc.NotFoundError, exc.AlreadyExistsError,
                exc.FailedPreconditionError, exc.PermissionDeniedError)


def _reason(e: exc.HybridServeAPIError) -> str:
    """A CamelCase condition reason: the platform's ErrorInfo reason, else its status
    code (`InvalidArgument`, `NotFound`, ...)."""
    if e.reason:
        return "".join(p.capitalize() for p in e.reason.lower().split("_"))
    return type(e).__name__.removesuffix("Error")


def store_path(namespace: str, source: str) -> str | None:
    """The adapter store path of `source` for a resource in `namespace`: beneath
    `<namespace>/`, or None when `source` would leave that folder (absolute, `..`,
    empty components, backslashes)."""
    source = source.rstrip("/")
    if not namespace or not source or source.startswith("/") or "\\" in source:
        return None
    if any(p in ("", ".", "..") for p in source.split("/")):
        return None
    return f"{namespace}/{source}"


def parse_namespace_tenants(items: list[str]) -> dict[str, frozenset[str]]:
    """`NS=T1,T2` items (repeatable; one namespace may appear several times) into a map."""
    out: dict[str, set[str]] = {}
    for item in items:
        ns, sep, tenants = item.partition("=")
        if not sep or not ns.strip():
            raise ValueError(f"{item!r} is not NAMESPACE=TENANT[,TENANT...]")
        out.setdefault(ns.strip(), set()).update(t.strip() for t in tenants.split(",") if t.strip())
    return {ns: frozenset(ts) for ns, ts in out.items()}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(obj: dict) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c
    return None


def is_converged(obj: dict) -> bool:
    """Nothing to do: the status describes this generation, and it is Ready."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return False
    cond = ready_condition(obj)
    return (status.get("observedGeneration") == meta.get("generation")
            and cond is not None and cond.get("status") == "True"
            and FINALIZER in (meta.get("finalizers") or []))


class Reconciler:
    """Args:
        kube / platform: the two sides.
        namespace_tenants: the tenants each namespace's LoRAAdapters may grant to
            (a namespace that is not listed may grant to none).
    """

    def __init__(self, kube: Kube, platform: Platform,
                 namespace_tenants: Mapping[str, frozenset[str]] | None = None):
        self.kube = kube
        self.platform = platform
        self.namespace_tenants = dict(namespace_tenants or {})

    def _allowed(self, obj: dict) -> frozenset[str]:
        return self.namespace_tenants.get(obj["metadata"].get("namespace", ""), frozenset())

    def _owned(self, owner: str) -> list[str]:
        """Ids of the registered adapters whose owner tag names this resource (the
        registry's record, never the status)."""
        return sorted(a.id for a in self.platform.list_adapters()
                      if dict(getattr(a, "metadata", None) or {}).get(OWNER_KEY) == owner)

    def _holders(self, adapter_id: str, tenants: frozenset[str]) -> list[str]:
        """Of `tenants`, those that hold a grant of `adapter_id` (the tenancy store's record)."""
        out = []
        for tenant in sorted(tenants):
            try:
                if adapter_id in self.platform.get_tenant(tenant).adapters:
                    out.append(tenant)
            except exc.NotFoundError:
                pass  # a listed tenant that does not exist (yet) holds nothing
        return out

    def reconcile(self, obj: dict) -> Outcome:
        meta = obj.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return self._delete(obj)
        if is_converged(obj):
            return Outcome("skipped", adapter_id=(obj.get("status") or {}).get("adapterId", ""))
        return self._apply(obj)

    # -- create / update --------------------------------------------------------------

    def _apply(self, obj: dict) -> Outcome:
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            # NOTE: before anything is registered: an object deleted from here on
            # always passes through the finalizer.
            obj = self.kube.set_finalizers(obj, [*finalizers, FINALIZER])
        try:
            return self._register_and_grant(obj)
        except _SPEC_ERRORS as e:
            # `obj` is the latest version this reconcile wrote (status writes carry
            # its resourceVersion: a stale one is a conflict, retried on fresh data).
            self._status(obj, "False", _reason(e), e.message)
            return Outcome("failed", retry=True, message=e.message)

    def _register_and_grant(self, obj: dict) -> Outcome:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        namespace = meta.get("namespace", "")
        name = spec.get("name") or meta["name"]
        # The registry's rule for adapter names (a Kubernetes name may be longer or hold dots).
        if not NAME_RE.fullmatch(name):
            msg = f"adapter name {name!r} does not match {NAME_RULE}; set spec.name"
            self._status(obj, "False", "InvalidName", msg)
            return Outcome("failed", message=msg)
        path = store_path(namespace, spec.get("source", ""))
        if path is None:
            msg = (f"spec.source {spec.get('source', '')!r} leaves this namespace's folder of the "
                   f"adapter store: give a relative path inside {namespace}/ (no '..', no leading '/')")
            self._status(obj, "False", "SourceOutsideNamespace", msg)
            return Outcome("failed", message=msg)
        tenants = list(dict.fromkeys(spec.get("tenants") or []))
        allowed = self._allowed(obj)
        refused = [t for t in tenants if t not in allowed]
        if refused:
            msg = (f"namespace {namespace!r} may not grant adapters to {', '.join(refused)}: the "
                   "platform operator lists the tenants each namespace may grant to "
                   "(controller.namespaceTenants in the Helm chart)")
            self._status(obj, "False", "TenantNotAllowed", msg)
            return Outcome("failed", retry=True, message=msg)
        owner = f"{namespace}/{meta['name']}"
        registered = self.platform.register_adapter(
            name, path, version=spec.get("version", ""),
            metadata={**(spec.get("metadata") or {}), OWNER_KEY: owner},
        )
        adapter_id = registered.adapter.id
        other = dict(getattr(registered.adapter, "metadata", None) or {}).get(OWNER_KEY, "")
        if other != owner:
            # Deleting either resource would take the adapter from the other; and an
            # adapter registered by hand is not this resource's to grant or unregister.
            where = f"the LoRAAdapter {other}" if other else "no LoRAAdapter (it was registered by hand)"
            msg = (f"adapter {adapter_id} belongs to {where}; give this one another "
                   "spec.name or spec.version")
            self._status(obj, "False", "OwnedElsewhere", msg)
            return Outcome("failed", message=msg)
        for tenant in tenants:
            self.platform.grant_adapter(tenant, adapter_id, make_default=bool(spec.get("default")))
        notes = []
        # What this resource owns besides, from the registry: earlier versions lose its
        # grants and leave the registry; the current one loses the tenants the spec dropped.
        for owned in self._owned(owner):
            if owned == adapter_id:
                for tenant in self._holders(owned, allowed):
                    if tenant not in tenants:
                        self._revoke(tenant, owned)
                continue
            for tenant in self._holders(owned, allowed):
                self._revoke(tenant, owned)
            try:
                self.platform.unregister_adapter(owned)
            except exc.NotFoundError:
                pass
            except exc.FailedPreconditionError as e:
                notes.append(f"the previous version {owned} stays registered: {e.message}")
        granted = ", ".join(tenants) or "no tenant"
        message = f"{adapter_id} registered, granted to {granted}" + "".join(f"; {n}" for n in notes)
        self._status(obj, "True", "Registered", message, adapterId=adapter_id,
                     grantedTenants=tenants)
        return Outcome("ready", adapter_id=adapter_id, message=message)

    def _revoke(self, tenant: str, adapter_id: str) -> None:
        try:
            self.platform.revoke_adapter(tenant, adapter_id)
        except exc.NotFoundError:
            pass  # the grant (or the tenant) is gone already

    # -- delete (the finalizer) -------------------------------------------------------

    def _delete(self, obj: dict) -> Outcome:
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            return Outcome("skipped")
        owner = f"{meta.get('namespace', '')}/{meta['name']}"
        allowed = self._allowed(obj)
        owned = self._owned(owner)
        for one in owned:
            try:
                for tenant in self._holders(one, allowed):
                    self._revoke(tenant, one)
                self.platform.unregister_adapter(one)
            except exc.NotFoundError:
                pass
            except exc.FailedPreconditionError as e:
                # Someone granted it by hand (or by a tenants file): the adapter stays
                # until they revoke, and the resource waits, saying why.
                self._status(obj, "False", "DeletionBlocked", e.message)
                return Outcome("blocked", retry=True, adapter_id=one, message=e.message)
        self.kube.set_finalizers(obj, [f for f in finalizers if f != FINALIZER])
        return Outcome("deleted", adapter_id=owned[-1] if owned else "")

    # -- status -----------------------------------------------------------------------

    def _status(self, obj: dict, ready: str, reason: str, message: str, **fields: Any) -> None:
        meta = obj["metadata"]
        before = ready_condition(obj) or {}
        changed = before.get("status") != ready or before.get("reason") != reason
        condition = {
            "type": "Ready", "status": ready, "reason": reason, "message": message[:1024],
            "observedGeneration": meta.get("generation"),
            "lastTransitionTime": _now() if changed or not before.get("lastTransitionTime")
            else before["lastTransitionTime"],
        }
        status = {"observedGeneration": meta.get("generation"), "conditions": [condition], **fields}
        self._write_status(obj, status)

    def _write_status(self, obj: dict, status: dict) -> None:
        """Patches the status; `obj` then holds what the server has (its new
        resourceVersion and status), so a later write in this reconcile is not stale."""
        written = self.kube.patch_status(obj, status)
        obj["metadata"]["resourceVersion"] = written["metadata"]["resourceVersion"]
        obj["status"] = written.get("status") or {}
