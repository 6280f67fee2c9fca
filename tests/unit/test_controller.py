"""The LoRAAdapter controller's logic against fakes of its two interfaces.

The fakes keep the real contracts: the platform fake refuses to unregister a
granted adapter (FAILED_PRECONDITION, as the generation service does), answers
`created=False` for the same bytes, NOT_FOUND for unknown tenants and sources;
the Kubernetes fake bumps resourceVersion and stores status. The same paths run
against a real kube-apiserver and platform in tests/integration/test_k8s.py.
"""

from __future__ import annotations

import copy
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from hybridserve import exceptions as exc
from hybridserve.controller import FINALIZER
from hybridserve.controller.main import DelayQueue
from hybridserve.controller.reconcile import Reconciler, is_converged


class FakePlatform:
    def __init__(self, sources: dict[str, str], tenants: set[str]):
        self.sources = sources  # path -> content hash
        self.tenants = tenants
        self.registry: dict[str, str] = {}
        self.grants: dict[str, set[str]] = {t: set() for t in tenants}
        self.defaults: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        self.calls: list[str] = []

    def list_adapters(self):
        self.calls.append("list")
        return [SimpleNamespace(id=i, metadata={"kubernetes": self.owners[i]} if self.owners.get(i)
                                else {}) for i in sorted(self.registry)]

    def get_tenant(self, tenant):
        self.calls.append("get_tenant")
        if tenant not in self.tenants:
            raise exc.NotFoundError(grpc.StatusCode.NOT_FOUND, f"no tenant {tenant!r}",
                                    reason="TENANT_NOT_FOUND")
        return SimpleNamespace(id=tenant, adapters=sorted(self.grants[tenant]))

    def register_adapter(self, name, path, *, version="", metadata=None):
        self.calls.append("register")
        if path not in self.sources:  # as the registry says it: no ErrorInfo reason
            raise exc.InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"no adapter folder {path!r} in the adapter store")
        adapter_id = f"{name}@{version or self.sources[path]}"
        created = adapter_id not in self.registry
        owner = (metadata or {}).get("kubernetes", "")
        if created:
            self.owners[adapter_id] = owner
        if not created and self.registry[adapter_id] != self.sources[path]:
            raise exc.AlreadyExistsError(grpc.StatusCode.ALREADY_EXISTS, "other bytes")
        self.registry[adapter_id] = self.sources[path]
        owner_tag = {"kubernetes": self.owners[adapter_id]} if self.owners[adapter_id] else {}
        return SimpleNamespace(adapter=SimpleNamespace(id=adapter_id, metadata=owner_tag),
                               created=created)

    def unregister_adapter(self, adapter_id):
        self.calls.append("unregister")
        users = [t for t, g in self.grants.items() if adapter_id in g]
        if users:
            raise exc.FailedPreconditionError(
                grpc.StatusCode.FAILED_PRECONDITION, f"still granted to {', '.join(users)}",
                reason="ADAPTER_IN_USE")
        if adapter_id not in self.registry:
            raise exc.NotFoundError(grpc.StatusCode.NOT_FOUND, "no such adapter")
        del self.registry[adapter_id]
        self.owners.pop(adapter_id, None)

    def grant_adapter(self, tenant, adapter, *, make_default=False):
        self.calls.append("grant")
        if tenant not in self.tenants:
            raise exc.NotFoundError(grpc.StatusCode.NOT_FOUND, f"no tenant {tenant!r}",
                                    reason="TENANT_NOT_FOUND")
        self.grants[tenant].add(adapter)
        if make_default:
            self.defaults[tenant] = adapter

    def revoke_adapter(self, tenant, adapter):
        self.calls.append("revoke")
        if adapter not in self.grants.get(tenant, set()):
            raise exc.NotFoundError(grpc.StatusCode.NOT_FOUND, "no grant")
        self.grants[tenant].discard(adapter)
        if self.defaults.get(tenant) == adapter:
            del self.defaults[tenant]


class FakeKube:
    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.calls: list[str] = []
        self._rv = 0

    def _bump(self, obj):
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def create(self, name, spec, namespace="ns"):
        obj = {"metadata": {"name": name, "namespace": namespace, "generation": 1,
                            "finalizers": []}, "spec": spec}
        self._bump(obj)
        self.objects[name] = obj
        return copy.deepcopy(obj)

    def update_spec(self, name, spec):
        obj = self.objects[name]
        obj["spec"] = spec
        obj["metadata"]["generation"] += 1
        self._bump(obj)
        return copy.deepcopy(obj)

    def delete(self, name):
        obj = self.objects[name]
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self._bump(obj)
        return copy.deepcopy(obj)

    def get(self, name):
        return copy.deepcopy(self.objects[name]) if name in self.objects else None

    def set_finalizers(self, obj, finalizers):
        self.calls.append("finalizers")
        stored = self.objects[obj["metadata"]["name"]]
        if stored["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise RuntimeError("409 conflict")
        stored["metadata"]["finalizers"] = list(finalizers)
        self._bump(stored)
        if not finalizers and stored["metadata"].get("deletionTimestamp"):
            del self.objects[obj["metadata"]["name"]]
        return copy.deepcopy(stored)

    def patch_status(self, obj, status):
        self.calls.append("status")
        stored = self.objects[obj["metadata"]["name"]]
        if stored["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise RuntimeError("409 conflict")  # the real client sends the resourceVersion
        # A JSON merge patch: keys it does not name stay, null removes one.
        merged = {**stored.get("status", {}), **copy.deepcopy(status)}
        stored["status"] = {k: v for k, v in merged.items() if v is not None}
        self._bump(stored)
        return copy.deepcopy(stored)


@pytest.fixture
def world():
    kube = FakeKube()
    platform = FakePlatform({"ns/formal/v1": "aaaa11112222", "ns/formal/v2": "bbbb33334444",
                             "victims/secret": "cccc55556666", "ns/victims/secret": "dddd77778888"},
                            {"acme", "globex", "victim"})
    # The operator's list: namespace `ns` may grant to these (initech does not exist).
    allowed = {"ns": frozenset({"acme", "globex", "initech"})}
    return kube, platform, Reconciler(kube, platform, allowed)


def _ready(obj):
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


def test_create_registers_grants_and_reports_ready(world):
    kube, platform, rec = world
    kube.create("support-formal", {"source": "formal/v1", "tenants": ["acme"], "default": True})
    out = rec.reconcile(kube.get("support-formal"))
    assert out.kind == "ready" and out.adapter_id == "support-formal@aaaa11112222"
    obj = kube.get("support-formal")
    assert FINALIZER in obj["metadata"]["finalizers"]
    assert _ready(obj)["status"] == "True" and _ready(obj)["reason"] == "Registered"
    assert obj["status"]["adapterId"] == out.adapter_id
    assert obj["status"]["observedGeneration"] == 1
    assert platform.grants["acme"] == {out.adapter_id}
    assert platform.defaults["acme"] == out.adapter_id
    assert is_converged(obj)


def test_a_converged_object_costs_no_call(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme"]})
    rec.reconcile(kube.get("a"))
    kube.calls.clear()
    platform.calls.clear()
    for _ in range(5):
        assert rec.reconcile(kube.get("a")).kind == "skipped"
    assert kube.calls == [] and platform.calls == []


def test_a_crash_half_way_converges_without_a_second_registration(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme", "globex"]})

    class Dies(Exception):
        pass

    real = platform.grant_adapter
    seen = []

    def grant_then_die(tenant, adapter, **kw):
        real(tenant, adapter, **kw)
        seen.append(tenant)
        if len(seen) == 1:
            raise Dies()

    platform.grant_adapter = grant_then_die
    with pytest.raises(Dies):
        rec.reconcile(kube.get("a"))
    # Nothing was written to the status: what exists is in the registry's own record.
    assert "adapterId" not in (kube.get("a").get("status") or {})
    out = rec.reconcile(kube.get("a"))
    assert out.kind == "ready"
    assert list(platform.registry) == [out.adapter_id]
    assert platform.grants == {"acme": {out.adapter_id}, "globex": {out.adapter_id}, "victim": set()}


def test_deleting_after_a_crash_half_way_leaves_nothing(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme", "globex"]})
    real = platform.grant_adapter

    def grant_then_die(tenant, adapter, **kw):
        real(tenant, adapter, **kw)
        raise ConnectionError("the reply was lost")

    platform.grant_adapter = grant_then_die
    with pytest.raises(ConnectionError):
        rec.reconcile(kube.get("a"))
    platform.grant_adapter = real
    kube.delete("a")
    assert rec.reconcile(kube.get("a")).kind == "deleted"
    assert platform.registry == {} and platform.grants["acme"] == set()


def test_deleting_after_a_half_way_failure_leaves_nothing(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme", "initech"]})
    out = rec.reconcile(kube.get("a"))  # registered, acme granted, then TenantNotFound
    assert out.kind == "failed" and platform.grants["acme"]
    kube.delete("a")
    assert rec.reconcile(kube.get("a")).kind == "deleted"
    assert platform.registry == {} and platform.grants["acme"] == set()


def test_two_resources_cannot_own_one_adapter(world):
    kube, platform, rec = world
    kube.create("a", {"name": "shared", "source": "formal/v1", "tenants": ["acme"]})
    assert rec.reconcile(kube.get("a")).kind == "ready"
    kube.create("b", {"name": "shared", "source": "formal/v1", "tenants": ["globex"]})
    out = rec.reconcile(kube.get("b"))
    assert out.kind == "failed" and _ready(kube.get("b"))["reason"] == "OwnedElsewhere"
    assert "ns/a" in _ready(kube.get("b"))["message"]
    assert platform.grants["globex"] == set()


def test_a_status_written_from_stale_data_is_refused(world):
    """The worker may hold an older version than the server (its own last write not
    yet seen through the watch): that write conflicts instead of overwriting."""
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme"]})
    rec.reconcile(kube.get("a"))
    stale = kube.get("a")
    kube.update_spec("a", {"source": "formal/v2", "tenants": ["acme"]})
    stale["metadata"]["generation"] = 2
    stale["spec"] = {"source": "formal/v2", "tenants": ["acme"]}
    with pytest.raises(RuntimeError, match="409"):
        rec.reconcile(stale)
    out = rec.reconcile(kube.get("a"))  # the retry, on fresh data, retires v1
    assert out.kind == "ready" and list(platform.registry) == [out.adapter_id]


def test_a_new_spec_makes_a_new_version_and_retires_the_old(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme"], "default": True})
    v1 = rec.reconcile(kube.get("a")).adapter_id
    kube.update_spec("a", {"source": "formal/v2", "tenants": ["acme"], "default": True})
    v2 = rec.reconcile(kube.get("a")).adapter_id
    assert v1 != v2 and v2 == "a@bbbb33334444"
    assert platform.grants["acme"] == {v2} and platform.defaults["acme"] == v2
    assert list(platform.registry) == [v2]
    assert kube.get("a")["status"]["observedGeneration"] == 2


def test_dropping_a_tenant_revokes_only_its_grant(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme", "globex"]})
    v1 = rec.reconcile(kube.get("a")).adapter_id
    kube.update_spec("a", {"source": "formal/v1", "tenants": ["globex"]})
    assert rec.reconcile(kube.get("a")).adapter_id == v1
    assert platform.grants == {"acme": set(), "globex": {v1}, "victim": set()}
    assert kube.get("a")["status"]["grantedTenants"] == ["globex"]


def test_bad_source_and_unknown_tenant_are_failed_with_a_reason(world):
    kube, platform, rec = world
    kube.create("a", {"source": "nowhere", "tenants": ["acme"]})
    out = rec.reconcile(kube.get("a"))
    assert out.kind == "failed" and out.retry
    cond = _ready(kube.get("a"))
    assert cond["status"] == "False" and cond["reason"] == "InvalidArgument"
    assert "nowhere" in cond["message"]
    assert not is_converged(kube.get("a"))
    kube.create("b", {"source": "formal/v1", "tenants": ["initech"]})
    rec.reconcile(kube.get("b"))
    assert _ready(kube.get("b"))["reason"] == "TenantNotFound"


# -- a LoRAAdapter is not an admin key --------------------------------------------------


@pytest.mark.parametrize("source", ["../victims/secret", "/victims/secret", "a/../../victims/secret",
                                    "./x", "a//b", "a\\..\\b", ""])
def test_a_source_outside_the_namespaces_folder_is_refused(world, source):
    kube, platform, rec = world
    kube.create("a", {"source": source, "tenants": ["acme"]})  # "": the CRD refuses it too
    out = rec.reconcile(kube.get("a"))
    assert out.kind == "failed" and _ready(kube.get("a"))["reason"] == "SourceOutsideNamespace"
    assert "register" not in platform.calls and platform.registry == {}


def test_a_source_is_read_beneath_the_namespaces_folder(world):
    """`victims/secret` from namespace `ns` is ns/victims/secret: another namespace's
    folder (victims/) cannot be named."""
    kube, platform, rec = world
    kube.create("a", {"source": "victims/secret", "tenants": ["acme"]})
    out = rec.reconcile(kube.get("a"))
    assert out.adapter_id == "a@dddd77778888"  # the bytes of ns/victims/secret
    assert "a@cccc55556666" not in platform.registry


def test_only_the_tenants_listed_for_the_namespace_may_be_granted(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme", "victim"], "default": True})
    out = rec.reconcile(kube.get("a"))
    cond = _ready(kube.get("a"))
    assert out.kind == "failed" and cond["reason"] == "TenantNotAllowed"
    assert "victim" in cond["message"] and "acme" not in cond["message"]
    assert platform.grants["victim"] == set() and platform.grants["acme"] == set()
    assert "victim" not in platform.defaults
    # Another namespace, not listed at all, may grant to no one.
    kube.create("b", {"source": "formal/v1", "tenants": ["acme"]}, namespace="other")
    assert rec.reconcile(kube.get("b")).kind == "failed"
    assert _ready(kube.get("b"))["reason"] == "TenantNotAllowed"


def _victim(platform) -> str:
    """An adapter another party registered and granted (owned by no resource of `ns`)."""
    out = platform.register_adapter("victim-skill", "victims/secret",
                                    metadata={"kubernetes": "victims/skill"})
    platform.grant_adapter("victim", out.adapter.id, make_default=True)
    return out.adapter.id


@pytest.mark.parametrize("fake", [
    {"adapterId": "VICTIM", "grantedTenants": ["victim"]},
    {"pendingAdapterId": "VICTIM", "pendingTenants": ["victim"]},
])
def test_a_faked_status_never_decides_what_is_revoked_or_unregistered(world, fake):
    kube, platform, rec = world
    victim = _victim(platform)
    kube.create("a", {"source": "formal/v1", "tenants": ["acme"]})
    mine = rec.reconcile(kube.get("a")).adapter_id
    forged = {k: ([victim] if v == "VICTIM" else v) if isinstance(v, list) else
              (victim if v == "VICTIM" else v) for k, v in fake.items()}
    kube.patch_status(kube.get("a"), forged)  # whoever may write the status subresource
    # A new generation (the path that retires an old version) ...
    kube.update_spec("a", {"source": "formal/v2", "tenants": ["acme"]})
    assert rec.reconcile(kube.get("a")).kind == "ready"
    kube.patch_status(kube.get("a"), forged)
    # ... and the finalizer.
    kube.delete("a")
    assert rec.reconcile(kube.get("a")).kind == "deleted"
    assert victim in platform.registry and platform.grants["victim"] == {victim}
    assert platform.defaults["victim"] == victim
    assert mine not in platform.registry and platform.registry.keys() == {victim}


def test_an_adapter_registered_by_hand_is_not_adopted(world):
    kube, platform, rec = world
    by_hand = platform.register_adapter("support", "ns/formal/v1")  # no owner tag
    kube.create("support", {"source": "formal/v1", "tenants": ["acme"]})
    out = rec.reconcile(kube.get("support"))
    assert out.kind == "failed" and _ready(kube.get("support"))["reason"] == "OwnedElsewhere"
    assert platform.grants["acme"] == set()
    kube.delete("support")
    assert rec.reconcile(kube.get("support")).kind == "deleted"
    assert by_hand.adapter.id in platform.registry


def test_a_name_the_registry_refuses_is_failed_not_retried(world):
    kube, platform, rec = world
    kube.create("Support.Formal", {"source": "formal/v1"})
    out = rec.reconcile(kube.get("Support.Formal"))
    assert out.kind == "failed" and not out.retry
    assert _ready(kube.get("Support.Formal"))["reason"] == "InvalidName"
    assert platform.calls == []


def test_delete_runs_the_finalizer(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme"]})
    rec.reconcile(kube.get("a"))
    kube.delete("a")
    assert rec.reconcile(kube.get("a")).kind == "deleted"
    assert kube.get("a") is None
    assert platform.registry == {} and platform.grants["acme"] == set()


def test_delete_is_blocked_while_another_grant_depends_on_it(world):
    kube, platform, rec = world
    kube.create("a", {"source": "formal/v1", "tenants": ["acme"]})
    adapter = rec.reconcile(kube.get("a")).adapter_id
    # By hand, outside the resource, to a tenant its namespace may not grant to (a grant
    # held by one it may grant to counts as the resource's own, and is revoked).
    platform.grant_adapter("victim", adapter)
    kube.delete("a")
    out = rec.reconcile(kube.get("a"))
    assert out.kind == "blocked" and out.retry
    obj = kube.get("a")
    assert FINALIZER in obj["metadata"]["finalizers"]
    assert _ready(obj)["reason"] == "DeletionBlocked" and "victim" in _ready(obj)["message"]
    platform.revoke_adapter("victim", adapter)
    assert rec.reconcile(kube.get("a")).kind == "deleted"
    assert kube.get("a") is None and platform.registry == {}


def test_delay_queue_dedupes_backs_off_and_runs_events_at_once():
    now = [0.0]
    q = DelayQueue(base_s=1, max_s=8, clock=lambda: now[0])
    q.add(("ns", "a"))
    q.add(("ns", "a"))
    assert len(q) == 1
    assert q.get(timeout=0) == ("ns", "a")
    assert [q.retry(("ns", "a")) for _ in range(5)] == [1, 2, 4, 8, 8]
    assert q.get(timeout=0) is None  # due in 1 s (the earliest retry)
    q.add(("ns", "a"))  # an event: now, not in 1 s
    assert q.get(timeout=0) == ("ns", "a")
    q.forget(("ns", "a"))
    assert q.retry(("ns", "a")) == 1


def test_delay_queue_wakes_a_waiting_worker():
    q = DelayQueue()
    got = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    t.start()
    time.sleep(0.05)
    q.add(("ns", "b"))
    t.join(2)
    assert got == [("ns", "b")]
    q.close()
    assert q.get(timeout=1) is None


def test_the_watch_echo_of_our_own_writes_costs_no_reconcile(world):
    """Our finalizer patch comes back as a MODIFIED event older than our status write;
    reconciling it again would register and grant a second time."""
    from hybridserve.controller.main import Controller, Metrics

    kube, platform, rec = world
    metrics = Metrics()
    ctl = Controller(kube, platform, metrics, namespace_tenants=rec.namespace_tenants)
    obj = kube.create("a", {"source": "formal/v1", "tenants": ["acme"]})
    obj["metadata"]["uid"] = "u1"
    ctl._store(obj)
    assert ctl.queue.get(timeout=0) == ("ns", "a")
    ctl.process(("ns", "a"), obj)
    calls = list(platform.calls)
    echo = copy.deepcopy(obj)  # the finalizer patch's event: finalizer, no status yet
    echo["metadata"]["finalizers"] = [FINALIZER]
    ctl._store(echo)
    assert len(ctl.queue) == 0 and platform.calls == calls
    # A new generation, or a deletion, is work again.
    changed = copy.deepcopy(echo)
    changed["metadata"]["generation"] = 2
    ctl._store(changed)
    assert ctl.queue.get(timeout=0) == ("ns", "a")
    deleting = copy.deepcopy(echo)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ctl._store(deleting)
    assert ctl.queue.get(timeout=0) == ("ns", "a")


def test_any_error_in_a_reconcile_is_retried_not_fatal(world):
    """An API server that is down raises urllib3's errors (not OSError, not
    ApiException): the worker must survive them and retry the key."""
    from urllib3.exceptions import MaxRetryError

    from hybridserve.controller.main import Controller, Metrics

    kube, platform, _ = world
    ctl = Controller(kube, platform, Metrics())
    obj = kube.create("a", {"source": "formal/v1", "tenants": ["acme"]})

    def down(*a, **k):
        raise MaxRetryError(None, "/apis", "connection refused")

    kube.set_finalizers = down
    ctl.process(("ns", "a"), obj)  # does not raise
    assert len(ctl.queue) == 1  # retried later, with backoff
    assert ctl.queue.get(timeout=0) is None
