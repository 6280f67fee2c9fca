"""One LoRAAdapter, brought to what its spec asks: the logic, free of transport.

`Reconciler.reconcile(obj)` reads the object (a dict as the API server returns
it) and acts through two interfaces:

- `Kube`: patch the object's finalizers and its status subresource;
- `Platform`: register/unregister an adapter, grant/revoke it to a tenant (the
  admin API; `hybridserve.client.HybridServeClient` is one).

Every step is idempotent, so a reconcile that dies half-way is simply run
again: registering the same bytes under the same id answers `created=False`,
a grant that exists is kept, a revoke of a missing grant is ignored. A
converged object (status.observedGeneration == metadata.generation, Ready)
costs no call at all.

Status: `conditions` (one, `Ready`: True with reason Registered; False with
Failed-style reasons), `observedGeneration`, `adapterId`, `grantedTenants`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from hybridserve import exceptions as exc
from hybridserve.controller import FINALIZER

#: Adapter metadata naming the LoRAAdapter that owns a registered adapter.
OWNER_KEY = "kubernetes"

#: The registry's rule for adapter names (a Kubernetes name may be longer or hold dots).
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class Kube(Protocol):
    def set_finalizers(self, obj: dict, finalizers: list[str]) -> dict: ...
    def patch_status(self, obj: dict, status: dict) -> dict: ...


class Platform(Protocol):
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
    def __init__(self, kube: Kube, platform: Platform):
        self.kube = kube
        self.platform = platform

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
        status = obj.get("status") or {}
        name = spec.get("name") or meta["name"]
        if not _NAME_RE.fullmatch(name):
            msg = (f"adapter name {name!r} does not match [a-z0-9][a-z0-9._-]{{0,63}}; "
                   "set spec.name")
            self._status(obj, "False", "InvalidName", msg)
            return Outcome("failed", message=msg)
        tenants = list(dict.fromkeys(spec.get("tenants") or []))
        owner = f"{meta.get('namespace', '')}/{meta['name']}"
        registered = self.platform.register_adapter(
            name, spec["source"], version=spec.get("version", ""),
            metadata={**(spec.get("metadata") or {}), OWNER_KEY: owner},
        )
        adapter_id = registered.adapter.id
        other = dict(getattr(registered.adapter, "metadata", None) or {}).get(OWNER_KEY, owner)
        if other != owner:
            # Deleting either resource would take the adapter from the other.
            msg = (f"adapter {adapter_id} belongs to the LoRAAdapter {other}; give this one "
                   "another spec.name or spec.version")
            self._status(obj, "False", "OwnedElsewhere", msg)
            return Outcome("failed", message=msg)
        granted: list[str] = []
        try:
            for tenant in tenants:
                # Before the call: a grant whose reply was lost may still have happened.
                granted.append(tenant)
                self.platform.grant_adapter(tenant, adapter_id,
                                            make_default=bool(spec.get("default")))
        except BaseException:
            # Half-way: remember what exists, so that a deletion cleans it up too.
            self._remember_pending(obj, adapter_id, granted)
            raise
        notes = []
        old_id, old_tenants = status.get("adapterId"), list(status.get("grantedTenants") or [])
        if old_id and old_id != adapter_id:
            # A new version took over: the old one loses this resource's grants and
            # leaves the registry, unless someone else still uses it.
            for tenant in old_tenants:
                self._revoke(tenant, old_id)
            try:
                self.platform.unregister_adapter(old_id)
            except exc.NotFoundError:
                pass
            except exc.FailedPreconditionError as e:
                notes.append(f"the previous version {old_id} stays registered: {e.message}")
        elif old_id == adapter_id:
            for tenant in old_tenants:
                if tenant not in tenants:
                    self._revoke(tenant, adapter_id)
        granted = ", ".join(tenants) or "no tenant"
        message = f"{adapter_id} registered, granted to {granted}" + "".join(f"; {n}" for n in notes)
        self._status(obj, "True", "Registered", message, adapterId=adapter_id,
                     grantedTenants=tenants, pendingAdapterId=None, pendingTenants=None)
        return Outcome("ready", adapter_id=adapter_id, message=message)

    def _remember_pending(self, obj: dict, adapter_id: str, granted: list[str]) -> None:
        status = obj.get("status") or {}
        if status.get("adapterId") == adapter_id and set(granted) <= set(
                status.get("grantedTenants") or []):
            return  # nothing new to remember
        try:
            self._write_status(obj, {"pendingAdapterId": adapter_id, "pendingTenants": granted})
        except Exception:  # noqa: BLE001 - best effort; the original error is raised
            pass

    def _revoke(self, tenant: str, adapter_id: str) -> None:
        try:
            self.platform.revoke_adapter(tenant, adapter_id)
        except exc.NotFoundError:
            pass  # the grant (or the tenant) is gone already

    # -- delete (the finalizer) -------------------------------------------------------

    def _delete(self, obj: dict) -> Outcome:
        meta, status = obj["metadata"], obj.get("status") or {}
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            return Outcome("skipped")
        adapter_id = status.get("adapterId")
        # What a reconcile that failed half-way may have left, too.
        ids = list(dict.fromkeys(i for i in (adapter_id, status.get("pendingAdapterId")) if i))
        tenants = list(dict.fromkeys([*(status.get("grantedTenants") or []),
                                      *(status.get("pendingTenants") or [])]))
        for one in ids:
            try:
                for tenant in tenants:
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
        return Outcome("deleted", adapter_id=adapter_id or "")

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
