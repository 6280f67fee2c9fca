"""Registering and unregistering adapters are control-plane writes: AdminService
serves them (audited, refusals included, under the same action names as before),
admitted by the per-key call limit like every admin RPC; GenerationService keeps
only ListAdapters; the SDK sends them to the admin app."""

from __future__ import annotations

import pytest
from hybridserve import topology
from hybridserve.client import _Api
from hybridserve.config import HybridServeConfig
from hybridserve.errors import ResourceExhausted
from hybridserve.tenancy.admin_limits import AuditTicket
from hybridserve.tenancy.servicer import AdminServicer
from testkit.tiny import build_lora_adapter, build_tiny_llama
from hybridserve.v1 import admin_pb2, generation_pb2, generation_pb2_grpc

from .fakes import FakeContext, tenancy_for


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("admin-adapters") / "model")


@pytest.fixture
def config(tmp_path, base):
    return HybridServeConfig(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
        model={"path": str(base), "max_model_len": 64},
    )


class _Limits:
    """AdminLimits' interface: admits `allowed` calls, then refuses."""

    def __init__(self, allowed: int):
        self.allowed, self.taken = allowed, []

    async def take(self, kind: str, key_id: str) -> None:
        self.taken.append(key_id)
        if len(self.taken) > self.allowed:
            raise ResourceExhausted("over the control plane's limit", reason="QUOTA_EXCEEDED")

    async def audit_ticket(self, actor: str, outcome: str) -> AuditTicket:
        return AuditTicket(0, None)

    async def close(self) -> None:
        pass


async def test_the_admin_service_registers_and_unregisters_adapters_audited(config, base):
    tenancy, admin_key = tenancy_for(config, service="admin")
    store = tenancy.store
    build_lora_adapter(base, config.adapter_store / "alpha", seed=0, rank=8)
    servicer = AdminServicer(config, tenancy=tenancy)
    ctx = FakeContext(admin_key)
    reply = await servicer.RegisterAdapter(
        generation_pb2.RegisterAdapterRequest(name="alpha", path="alpha", metadata={"k": "v"}), ctx)
    assert ctx.code_name == "OK" and reply.created
    adapter_id = reply.adapter.id
    assert adapter_id.startswith("alpha@") and reply.adapter.source_path == "alpha"
    assert reply.adapter.metadata["k"] == "v"
    # The base model by its folder (as the replicas load it) is accepted: the registry
    # the control plane writes validates as the generation replicas' did.
    assert reply.adapter.base_model
    again = await servicer.RegisterAdapter(
        generation_pb2.RegisterAdapterRequest(name="alpha", path="alpha"), FakeContext(admin_key))
    assert not again.created and again.adapter.id == adapter_id

    # A tenant key is refused, and the refusal is audited.
    await servicer.CreateTenant(admin_pb2.CreateTenantRequest(id="acme"), FakeContext(admin_key))
    secret = (await servicer.CreateKey(admin_pb2.CreateKeyRequest(tenant="acme", name="k"),
                                       FakeContext(admin_key))).secret
    refused = FakeContext(secret)
    await servicer.UnregisterAdapter(generation_pb2.UnregisterAdapterRequest(id=adapter_id),
                                     refused)
    assert refused.code_name == "PERMISSION_DENIED"

    done = FakeContext(admin_key)
    assert isinstance(await servicer.UnregisterAdapter(
        generation_pb2.UnregisterAdapterRequest(id=adapter_id), done),
        generation_pb2.UnregisterAdapterResponse)
    assert done.code_name == "OK"
    entries = [(e.action, e.target, e.outcome) for e in reversed(store.list_audit(20))
               if e.action in ("RegisterAdapter", "UnregisterAdapter")]
    assert entries == [
        ("RegisterAdapter", "adapter/alpha", "OK"),
        ("RegisterAdapter", "adapter/alpha", "OK"),
        ("UnregisterAdapter", f"adapter/{adapter_id}", "PERMISSION_DENIED"),
        ("UnregisterAdapter", f"adapter/{adapter_id}", "OK"),
    ]
    await servicer.shutdown()


async def test_adapter_registration_takes_from_the_per_key_limit(config, base):
    tenancy, admin_key = tenancy_for(config, service="admin")
    build_lora_adapter(base, config.adapter_store / "alpha", seed=0, rank=8)
    limits = _Limits(allowed=1)
    servicer = AdminServicer(config, tenancy=tenancy, limits=limits)
    first = FakeContext(admin_key)
    await servicer.RegisterAdapter(
        generation_pb2.RegisterAdapterRequest(name="alpha", path="alpha"), first)
    assert first.code_name == "OK"
    over = FakeContext(admin_key)
    await servicer.UnregisterAdapter(generation_pb2.UnregisterAdapterRequest(id="alpha@x"), over)
    assert over.code_name == "RESOURCE_EXHAUSTED" and len(limits.taken) == 2
    latest = tenancy.store.list_audit(1)[0]
    assert (latest.action, latest.outcome) == ("UnregisterAdapter", "RESOURCE_EXHAUSTED")
    await servicer.shutdown()


def test_only_listing_stays_on_the_generation_service():
    methods = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].methods_by_name
    assert "ListAdapters" in methods
    assert "RegisterAdapter" not in methods and "UnregisterAdapter" not in methods
    assert not hasattr(generation_pb2_grpc.GenerationServiceServicer, "RegisterAdapter")
    admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name
    assert admin["RegisterAdapter"].input_type.full_name == "hybridserve.v1.RegisterAdapterRequest"
    assert admin["UnregisterAdapter"].output_type.full_name == (
        "hybridserve.v1.UnregisterAdapterResponse")


def test_the_sdk_sends_registration_to_the_admin_app_and_listing_to_generation():
    calls = []

    class Recorder(_Api):
        application = "my-generation"

        def _invoke(self, stub, method, request, app, timeout, post=lambda r: r):
            calls.append((stub, method, app, type(request).__name__))

    sdk = Recorder()
    sdk.register_adapter("alpha", "alpha")
    sdk.unregister_adapter("alpha@v1")
    sdk.list_adapters()
    assert calls == [
        ("admin", "RegisterAdapter", topology.ADMIN.name, "RegisterAdapterRequest"),
        ("admin", "UnregisterAdapter", topology.ADMIN.name, "UnregisterAdapterRequest"),
        ("gen", "ListAdapters", "my-generation", "ListAdaptersRequest"),
    ]
