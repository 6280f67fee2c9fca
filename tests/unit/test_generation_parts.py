"""The parts the generation servicer delegates to, on their own: the routing report
a replica gives and the router reads (one typed report, a dict only on Serve's
wire), and adapter registration (admin only, audited also when refused)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition, PermissionDenied
from hybridserve.adapters import AdapterRegistry
from hybridserve.generation.registration import AdapterRegistration
from hybridserve.generation.residency import RoutingReport
from hybridserve.generation.routing import SlotAwareRouter
from hybridserve.generation.servicer import GenerationServicer
from hybridserve.tenancy.domain import Principal, Tenant
from testkit.tiny import build_lora_adapter, build_tiny_llama
from hybridserve.v1 import generation_pb2

from .fakes import FakeContext, FakeEngine, tenancy_for


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("parts") / "model")


@pytest.fixture
def config(tmp_path, base):
    return HybridServeConfig(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
        model={"path": str(base), "max_model_len": 64},
    )


@pytest.fixture
def admin(config):
    return tenancy_for(config)


def test_a_report_that_was_never_sent_reads_as_the_defaults():
    assert RoutingReport.from_wire(None) == RoutingReport.from_wire({}) == RoutingReport()
    report = RoutingReport(at=5.0, slots=2, resident=("a@v1", "b@v1"),
                           active={"a@v1": 2, "": 1}, ongoing=4)
    wire = report.to_wire()
    assert wire == {"at": 5.0, "slots": 2, "resident": ["a@v1", "b@v1"],
                    "active": {"a@v1": 2, "": 1}, "ongoing": 4}
    assert RoutingReport.from_wire(wire) == report


async def test_the_router_sees_what_the_replica_reports(config, base, admin):
    build_lora_adapter(base, config.adapter_store / "alpha", seed=0, rank=8)
    adapter = AdapterRegistry.from_config(config, base).register("alpha", "alpha")[0].id
    engine = FakeEngine(max_model_len=64, step_s=0.01)
    servicer = GenerationServicer(config, engine=engine, tenancy=admin[0])
    req = generation_pb2.GenerateRequest(prompt="hi there", adapter=adapter)
    req.sampling.max_tokens = 40
    on_adapter = servicer.Generate(req, FakeContext(admin[1]))
    await on_adapter.__anext__()
    base_req = generation_pb2.GenerateRequest(prompt="hi there")
    base_req.sampling.max_tokens = 40
    on_base = servicer.Generate(base_req, FakeContext(admin[1]))
    await on_base.__anext__()

    report = servicer.routing_report()
    assert isinstance(report, RoutingReport)
    assert report.slots == config.engine.max_loras and report.resident == (adapter,)
    assert report.active == {adapter: 1, "": 1} and report.ongoing == 2

    router = SlotAwareRouter.__new__(SlotAwareRouter)  # the routing logic only
    router.initialize_state()
    replica = SimpleNamespace(replica_id=SimpleNamespace(unique_id="r1"),
                              multiplexed_model_ids=set(), routing_stats=report.to_wire())
    (view,) = router.views([replica])
    assert view.adapters == {adapter} and view.active == {adapter: 1, "": 1}
    assert view.slots == config.engine.max_loras and view.ongoing == 2

    servicer.base_only = True  # a base-pool replica reports no slots
    assert servicer.routing_report().slots == 0
    for stream in (on_adapter, on_base):
        await stream.aclose()
    await servicer.shutdown()


def _tenant_principal(tenant="acme") -> Principal:
    return Principal(kind="tenant", key_id="k1", tenant=Tenant(tenant))


async def test_registration_is_admin_only_and_audited_also_when_refused(config, base, admin):
    tenancy, _ = admin
    store = tenancy.store
    build_lora_adapter(base, config.adapter_store / "alpha", seed=0, rank=8)
    registration = AdapterRegistration(AdapterRegistry.from_config(config, base), store)
    root = Principal(kind="admin", key_id="a1")

    record, created = await registration.register(root, "alpha", "alpha")
    again, created_again = await registration.register(root, "alpha", "alpha")
    assert created and not created_again and again.id == record.id
    with pytest.raises(PermissionDenied):
        await registration.register(_tenant_principal(), "evil", "alpha")
    with pytest.raises(PermissionDenied):
        await registration.unregister(_tenant_principal(), record.id)
    entries = [(e.actor, e.action, e.target, e.outcome, e.detail)
               for e in reversed(store.list_audit(10))]
    assert entries[-4:] == [
        ("admin:a1", "RegisterAdapter", "adapter/alpha", "OK", f"{record.id} (new)"),
        ("admin:a1", "RegisterAdapter", "adapter/alpha", "OK",
         f"{record.id} (already registered)"),
        ("tenant:k1", "RegisterAdapter", "adapter/evil", "PERMISSION_DENIED",
         entries[-2][4]),
        ("tenant:k1", "UnregisterAdapter", f"adapter/{record.id}", "PERMISSION_DENIED",
         entries[-1][4]),
    ]
    assert "admin key" in entries[-1][4]
    # What a tenant lists is what it may use.
    assert [r.id for r in await registration.list_for(root)] == [record.id]
    assert await registration.list_for(_tenant_principal()) == []

    # A granted adapter stays until its grants are revoked.
    await asyncio.to_thread(store.create_tenant, Tenant("acme"), actor="test")
    await asyncio.to_thread(store.grant, "acme", record.id, make_default=False, actor="test")
    with pytest.raises(FailedPrecondition) as refused:
        await registration.unregister(root, record.id)
    assert refused.value.reason == "ADAPTER_IN_USE"
    assert store.list_audit(1)[0].outcome == "FAILED_PRECONDITION"
    await asyncio.to_thread(store.revoke_grant, "acme", record.id, actor="test")
    await registration.unregister(root, record.id)
    assert store.list_audit(1)[0].action == "UnregisterAdapter"
    assert store.list_audit(1)[0].outcome == "OK"
    assert await registration.list_for(root) == []
