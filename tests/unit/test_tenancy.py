"""Tenancy without Serve: key format and digests, credential parsing, the auth cache
and its revocation bound (injected clocks), principals and grants, the tenants file,
the admin service's rules, and the rich error details. The store here is a real
SQLite file; tests/integration/test_tenancy_store.py runs the store on PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import math
import re

import grpc
import pytest
from hybridserve.config import HybridServeConfig
from hybridserve.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from hybridserve.grpc_errors import rich_status
from hybridserve.tenancy import keys, tenants_file
from hybridserve.tenancy.admin import AdminService
from hybridserve.tenancy.auth import MAX_AUTH_HEADER_CHARS, Tenancy, bearer_token
from hybridserve.tenancy.domain import Principal, Quotas, Tenant
from hybridserve.tenancy.quotas import bucket_capacity, quota_exceeded
from hybridserve.tenancy.store import TenancyStore

from .fakes import FakeContext

ADMIN = Principal("admin", "aaaaaaaaaaaa", "test admin")


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- keys -----------------------------------------------------------------------


def test_keys_are_256_bit_random_with_a_visible_kind_and_id():
    made = {keys.generate("tenant").key for _ in range(200)}
    assert len(made) == 200
    key = keys.parse(next(iter(made)))
    assert key.kind == "tenant" and key.key.startswith(f"hst_{key.key_id}_")
    secret = key.key.rsplit("_", 1)[-1] if key.key.count("_") == 2 else key.key[17:]
    assert len(key.key) == keys.KEY_CHARS and len(key.key[17:]) == 43  # 32 bytes, base64url
    assert keys.SECRET_BYTES * 8 >= 256 and secret
    admin = keys.generate("admin")
    assert admin.key.startswith("hsa_") and admin.kind == "admin"
    # Only a digest is kept: fixed-size hex, not the key, different per key.
    assert re.fullmatch(r"[0-9a-f]{64}", key.digest) and key.key not in key.digest
    assert keys.matches(key, key.digest) and not keys.matches(key, admin.digest)


@pytest.mark.parametrize("text", [
    "", " ", "x" * (1 << 20), "hst_" + "é" * 55, "sk-" + "a" * 56,
    "hsx_abcdefghijkl_" + "a" * 43, "hst_ABCDEFGHIJKL_" + "a" * 43,
    "hst_abcdefghijkl_" + "a" * 42 + "'", "hst_abcdefghijkl_' OR '1'='1'; DROP TABLE api_keys;--",
    "hst_abcdefghijkl_" + "a" * 42 + "\x00",
])
def test_malformed_keys_are_refused_before_any_lookup(text):
    with pytest.raises(keys.MalformedKey):
        keys.parse(text)


def test_bearer_token_takes_exactly_one_bearer_header():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    for md, reason in [
        ([], "API_KEY_MISSING"),
        ([("x-api-key", "abc")], "API_KEY_MISSING"),
        ([("authorization", "Basic abc")], "API_KEY_MALFORMED"),
        ([("authorization", "Bearer")], "API_KEY_MALFORMED"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "API_KEY_MALFORMED"),
        ([("authorization", "Bearer " + "a" * MAX_AUTH_HEADER_CHARS)], "API_KEY_MALFORMED"),
        ([("authorization", b"Bearer abc")], "API_KEY_MALFORMED"),
    ]:
        with pytest.raises(Unauthenticated) as e:
            bearer_token(md)
        assert e.value.reason == reason, md


# -- the auth cache and the revocation bound --------------------------------------


@pytest.fixture
def store(tmp_path):
    s = TenancyStore(f"sqlite:///{tmp_path / 'tenancy.db'}")
    s.migrate()
    yield s
    s.close()


def _tenant_key(store, tenant="acme", **kwargs) -> str:
    if not store.tenant_exists(tenant):
        store.create_tenant(Tenant(tenant, **kwargs), actor="test")
    key = keys.generate("tenant")
    store.add_key(key_id=key.key_id, kind="tenant", tenant_id=tenant, name="k", digest=key.digest,
                  expires_at=None, actor="test")
    return key.key


async def test_a_revoked_key_fails_within_the_cache_ttl_and_not_before_a_read(store):
    mono = Clock(0.0)
    tenancy = Tenancy(store, cache_ttl_s=0.5, monotonic=mono)
    key = _tenant_key(store)
    assert (await tenancy.authenticate_token(key)).tenant_id == "acme"
    store.revoke_key(keys.parse(key).key_id, actor="test")
    mono.now = 0.49  # inside the TTL the replica may still trust its read ...
    assert (await tenancy.authenticate_token(key)).tenant_id == "acme"
    mono.now = 0.5  # ... and not a moment longer
    with pytest.raises(Unauthenticated) as e:
        await tenancy.authenticate_token(key)
    assert e.value.reason == "API_KEY_REVOKED"


async def test_the_ttl_is_configured_at_most_one_second():
    assert HybridServeConfig().tenancy.auth_cache_ttl_s <= 1.0
    with pytest.raises(ValueError):
        HybridServeConfig(tenancy={"auth_cache_ttl_s": 1.5})


async def test_expiry_unknown_keys_wrong_secrets_and_deleted_tenants(store):
    wall = Clock()
    tenancy = Tenancy(store, cache_ttl_s=0.5, clock=wall, monotonic=Clock(0.0))
    store.clock = wall
    store.create_tenant(Tenant("acme"), actor="test")
    key = keys.generate("tenant")
    store.add_key(key_id=key.key_id, kind="tenant", tenant_id="acme", name="k", digest=key.digest,
                  expires_at=wall.now + 60, actor="test")
    assert (await tenancy.authenticate_token(key.key)).key_id == key.key_id
    wall.now += 60
    with pytest.raises(Unauthenticated) as e:
        await tenancy.authenticate_token(key.key)
    assert e.value.reason == "API_KEY_EXPIRED"
    # Same key id, another secret: refused like an unknown key.
    forged = key.key[:17] + ("A" if key.key[17] != "A" else "B") + key.key[18:]
    for bad in (forged, keys.generate("tenant").key, "hsa_" + key.key[4:]):
        with pytest.raises(Unauthenticated) as e:
            await tenancy.authenticate_token(bad)
        assert e.value.reason == "API_KEY_INVALID"


async def test_concurrent_misses_share_one_read_and_use_is_recorded_sparingly(store, monkeypatch):
    tenancy = Tenancy(store, cache_ttl_s=0.5)
    key = _tenant_key(store)
    reads = []
    real = store.get_key
    monkeypatch.setattr(store, "get_key", lambda kid: reads.append(kid) or real(kid))
    await asyncio.gather(*(tenancy.authenticate_token(key) for _ in range(20)))
    assert len(reads) == 1
    for _ in range(200):  # the touch runs in a thread: bounded wait, not timing
        info = store.get_key(keys.parse(key).key_id)[0]
        if info.last_used_at is not None:
            break
        await asyncio.sleep(0.01)
    assert info.last_used_at is not None


async def test_a_context_without_a_key_is_unauthenticated(store):
    tenancy = Tenancy(store)
    with pytest.raises(Unauthenticated) as e:
        await tenancy.authenticate(FakeContext())
    assert e.value.reason == "API_KEY_MISSING" and "authorization: Bearer" in e.value.message


# -- principals --------------------------------------------------------------------


def _principal(**kwargs) -> Principal:
    return Principal("tenant", "bbbbbbbbbbbb", "k", Tenant("acme", **kwargs))


def test_a_tenant_key_acts_only_in_its_own_tenant():
    p = _principal()
    assert p.own_tenant("") == "acme" and p.own_tenant("acme") == "acme"
    with pytest.raises(PermissionDenied) as e:
        p.own_tenant("beta")
    assert e.value.reason == "TENANT_MISMATCH"
    with pytest.raises(PermissionDenied):
        p.require_admin("CreateTenant")
    ADMIN.require_admin("CreateTenant")


def test_adapters_need_a_grant_and_the_base_model_needs_allow_base():
    p = _principal(adapters=("a@1", "b@2"), default_adapter="b@2")
    assert p.authorize_adapter("a@1") == "a@1"
    for bad, reason in (("c@3", "ADAPTER_NOT_GRANTED"), ("", "BASE_MODEL_NOT_ALLOWED")):
        with pytest.raises(PermissionDenied) as e:
            p.authorize_adapter(bad)
        assert e.value.reason == reason
    assert p.choose_adapter("") == "b@2" and p.choose_adapter("a@1") == "a@1"
    assert _principal(allow_base=True).authorize_adapter("") == ""
    assert ADMIN.authorize_adapter("anything@1") == "anything@1"


async def test_resolve_tenant_for_admins_checks_it_exists(store):
    tenancy = Tenancy(store)
    store.create_tenant(Tenant("acme"), actor="test")
    assert await tenancy.resolve_tenant(ADMIN, "acme") == "acme"
    with pytest.raises(NotFound):
        await tenancy.resolve_tenant(ADMIN, "ghost")
    with pytest.raises(InvalidArgument):
        await tenancy.resolve_tenant(ADMIN, "")
    with pytest.raises(InvalidArgument):
        await tenancy.resolve_tenant(ADMIN, "a,b")
    with pytest.raises(PermissionDenied):
        await tenancy.resolve_tenant(_principal(), "ghost")


# -- the admin service ---------------------------------------------------------------


@pytest.fixture
def admin(store):
    registered = {"tone@v1", "json@v2"}
    return AdminService(store, lambda a: a in registered, settle_s=0)


async def test_grants_name_registered_adapters_and_one_default(admin, store):
    await admin.create_tenant(ADMIN, Tenant("acme"))
    with pytest.raises(NotFound):
        await admin.grant(ADMIN, "acme", "ghost@v1", False)
    with pytest.raises(InvalidArgument):
        await admin.grant(ADMIN, "acme", "not an id", False)
    await admin.grant(ADMIN, "acme", "tone@v1", True)
    t = await admin.grant(ADMIN, "acme", "json@v2", True)
    assert t.adapters == ("json@v2", "tone@v1") and t.default_adapter == "json@v2"
    t = await admin.revoke_grant(ADMIN, "acme", "json@v2")
    assert t.default_adapter == "" and t.adapters == ("tone@v1",)
    assert store.tenants_granted("tone@v1") == ["acme"]


async def test_every_admin_action_is_audited_also_when_refused(admin, store):
    tenant_caller = _principal()
    with pytest.raises(PermissionDenied):
        await admin.create_tenant(tenant_caller, Tenant("evil"))
    await admin.create_tenant(ADMIN, Tenant("acme"))
    info, secret = await admin.create_key(ADMIN, tenant="acme", name="ci")
    with pytest.raises(NotFound):
        await admin.revoke_key(ADMIN, "nosuchkeyid0")
    entries = store.list_audit(10)
    got = [(e.actor, e.action, e.outcome) for e in reversed(entries)]
    assert got == [
        ("tenant:bbbbbbbbbbbb", "CreateTenant", "PERMISSION_DENIED"),
        ("admin:aaaaaaaaaaaa", "CreateTenant", "OK"),
        ("admin:aaaaaaaaaaaa", "CreateKey", "OK"),
        ("admin:aaaaaaaaaaaa", "RevokeKey", "NOT_FOUND"),
    ]
    assert all(secret not in f"{e.detail}{e.target}" for e in entries)
    assert not store.tenant_exists("evil")


async def test_key_creation_validates_and_quotas_are_partial_updates(admin):
    await admin.create_tenant(ADMIN, Tenant("acme"))
    for kwargs in (dict(tenant="", kind="tenant"), dict(tenant="acme", kind="root"),
                   dict(tenant="acme", kind="admin"), dict(tenant="acme", ttl_s=-1)):
        with pytest.raises((InvalidArgument, NotFound)):
            await admin.create_key(ADMIN, name="x", **kwargs)
    with pytest.raises(NotFound):
        await admin.create_key(ADMIN, tenant="ghost", name="x")
    t = await admin.set_quotas(ADMIN, "acme", requests_per_minute=60)
    t = await admin.set_quotas(ADMIN, "acme", tokens_per_minute=1000)
    assert t.quotas == Quotas(60, 1000, 0)
    with pytest.raises(InvalidArgument):
        await admin.set_quotas(ADMIN, "acme", concurrent_streams=-1)


# -- the tenants file --------------------------------------------------------------------

FILE = """\
tenants:
  - id: acme
    display_name: Acme Orbital
    adapters: [tone@v1, json@v2]
    default_adapter: json@v2
    quotas: {requests_per_minute: 60, tokens_per_minute: 20000, concurrent_streams: 4}
  - id: beta
    allow_base: true
"""


async def test_apply_is_idempotent_and_dry_run_changes_nothing(admin, store):
    planned = await admin.apply(ADMIN, FILE, dry_run=True)
    assert {(c.action, c.tenant) for c in planned} >= {("create", "acme"), ("create", "beta"),
                                                     ("grant", "acme"), ("default", "acme")}
    assert store.list_tenants() == []
    made = await admin.apply(ADMIN, FILE, dry_run=False)
    assert made == planned
    acme = store.get_tenant("acme")
    assert acme.quotas == Quotas(60, 20000, 4) and acme.default_adapter == "json@v2"
    assert await admin.apply(ADMIN, FILE, dry_run=False) == []  # a second run changes nothing
    # The file is the truth for the tenants it lists: a grant made outside it goes.
    changed = FILE.replace("[tone@v1, json@v2]", "[json@v2]").replace("Acme Orbital", "Acme")
    changes = await admin.apply(ADMIN, changed, dry_run=False)
    assert [(c.action, c.detail) for c in changes] == [
        ("update", "display_name: 'Acme Orbital' -> 'Acme'"), ("revoke", "adapter tone@v1")]


async def test_apply_with_keep_grants_leaves_grants_made_elsewhere(admin, store):
    """What the chart's tenants Job runs: grants from LoRAAdapter resources survive."""
    bare = "tenants:\n  - id: acme\n    display_name: Acme\n"
    await admin.apply(ADMIN, bare, dry_run=False)
    await admin.grant(ADMIN, "acme", "tone@v1", True)  # as the controller does
    assert await admin.apply(ADMIN, bare, dry_run=False, keep_grants=True) == []
    acme = store.get_tenant("acme")
    assert acme.adapters == ("tone@v1",) and acme.default_adapter == "tone@v1"
    # Listed grants are still added; without the flag the file is the truth again.
    listed = bare + "    adapters: [json@v2]\n"
    changes = await admin.apply(ADMIN, listed, dry_run=False, keep_grants=True)
    assert [(c.action, c.detail) for c in changes] == [("grant", "adapter json@v2")]
    assert set(store.get_tenant("acme").adapters) == {"tone@v1", "json@v2"}
    changes = await admin.apply(ADMIN, listed, dry_run=False)
    assert [(c.action, c.detail) for c in changes] == [("revoke", "adapter tone@v1")]
    acme = store.get_tenant("acme")
    assert acme.adapters == ("json@v2",) and acme.default_adapter == ""


async def test_a_bad_file_is_rejected_whole_with_line_numbers(admin, store):
    bad = FILE + """\
  - id: bad id
    quotas: {requests_per_minute: -1, bogus: 2}
  - id: gamma
    adapters: [ghost@v1]
    default_adapter: tone@v1
"""
    with pytest.raises(InvalidArgument) as e:
        await admin.apply(ADMIN, bad, dry_run=False)
    assert "line 9: tenants[2].id" in e.value.message
    assert "line 10: tenants[2].quotas.bogus" in e.value.message
    assert "line 10: tenants[2].quotas.requests_per_minute" in e.value.message
    assert store.list_tenants() == []  # nothing, not even the good tenants
    only_refs = FILE + "  - id: gamma\n    adapters: [ghost@v1]\n    default_adapter: tone@v1\n"
    with pytest.raises(InvalidArgument) as e:
        await admin.apply(ADMIN, only_refs, dry_run=False)
    assert "line 10: tenants[2].adapters[0]: adapter 'ghost@v1' is not registered" in e.value.message
    assert "line 11: tenants[2].default_adapter" in e.value.message
    for doc, where in (("tenants: [", "line 1"), ("", "empty"), ("tenants:\n  - id: a\n    id: b\n",
                                                                   "line 3: tenants[0].id: 'id' appears twice")):
        with pytest.raises(InvalidArgument) as e:
            tenants_file.parse(doc)
        assert where in e.value.message
    assert store.list_tenants() == []


# -- quotas and rich errors ------------------------------------------------------------


def test_bucket_sizes_and_the_rejection_details():
    assert bucket_capacity(60, 10) == 10 and bucket_capacity(2, 10) == 1
    err = quota_exceeded("acme", Quotas(60, 0, 0), "requests", 0.25)
    assert isinstance(err, ResourceExhausted) and err.retry_after == 0.25
    status = rich_status(err)
    kinds = [d.type_url.rsplit("/", 1)[-1] for d in status.details]
    assert kinds == ["google.rpc.ErrorInfo", "google.rpc.RetryInfo", "google.rpc.QuotaFailure"]
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_sdk_exceptions_parse_the_rich_details():
    from hybridserve.exceptions import (
        InvalidArgumentError,
        PermissionDeniedError,
        RateLimitError,
        _rich,
    )

    def roundtrip(err):
        trailer = [("grpc-status-details-bin", rich_status(err).SerializeToString())]
        return _rich(grpc.StatusCode[err.code], err.message, trailer)

    limited = roundtrip(quota_exceeded("acme", Quotas(60, 0, 0), "requests", 1.5))
    assert isinstance(limited, RateLimitError) and isinstance(limited, grpc.RpcError)
    assert math.isclose(limited.retry_after, 1.5) and limited.reason == "QUOTA_EXCEEDED"
    assert limited.quota_violations == [("tenant:acme/requests_per_minute", "limit 60 requests per minute")]
    bad = roundtrip(InvalidArgument("bad", field_violations=[("top_k", "1..100")]))
    assert isinstance(bad, InvalidArgumentError) and bad.field_violations == [("top_k", "1..100")]
    denied = roundtrip(PermissionDenied("no", reason="ADAPTER_NOT_GRANTED"))
    assert isinstance(denied, PermissionDeniedError) and denied.code() == grpc.StatusCode.PERMISSION_DENIED


def test_unregister_refusal_names_the_tenants():
    err = FailedPrecondition("adapter 'x@1' is still granted to acme, beta", reason="ADAPTER_IN_USE")
    assert rich_status(err).message.endswith("acme, beta")


async def test_a_new_tenant_never_inherits_a_deleted_one_s_documents(store):
    """A deleted tenant's straggling write (a request admitted on a stale cache entry)
    could leave a knowledge space under its id: creating the id again clears it."""
    calls = []

    class Knowledge:
        async def create(self, tenant):
            calls.append(("create", tenant))

        async def delete(self, tenant):
            calls.append(("delete", tenant))
            return 0

    forgotten = []

    async def forget(tenant):
        forgotten.append(tenant)

    admin = AdminService(store, lambda a: True, Knowledge(), settle_s=0, forget_quotas=forget)
    await admin.create_tenant(ADMIN, Tenant("acme"))
    await admin.create_tenant(ADMIN, Tenant("acme"))  # exists: nothing is purged
    await admin.delete_tenant(ADMIN, "acme")
    await admin.apply(ADMIN, "tenants:\n  - id: acme\n", dry_run=False)
    assert calls == [("delete", "acme"), ("create", "acme"), ("create", "acme"),
                     ("delete", "acme"), ("delete", "acme"), ("create", "acme")]
    assert forgotten == ["acme"]


def test_adapter_conversion_for_a_tenant_hides_server_paths_and_metadata():
    from hybridserve.adapters import AdapterRecord
    from hybridserve.generation.servicer import adapter_to_proto

    def record(base: str) -> AdapterRecord:
        return AdapterRecord(
            id="bot@v1", name="bot", version="v1", content_sha256="0" * 64, rank=8,
            target_modules=("q_proj",), base_model=base, size_bytes=10,
            source_path="team-x/bot", registered_at="2025-01-01T00:00:00Z",
            metadata={"owner": "ns/team-x"}, snapshot_dir="/srv/registry/snapshots/bot/v1",
        )

    full = adapter_to_proto(record("/srv/models/tiny-llama"))
    assert full.source_path == "team-x/bot" and full.metadata["owner"] == "ns/team-x"
    assert full.base_model == "/srv/models/tiny-llama"
    for base, shown in (("/srv/models/tiny-llama", "tiny-llama"), ("~/m/tiny", "tiny"),
                        ("./tiny", "tiny"), ("C:\\models\\tiny", "tiny"),
                        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                        ("tiny-llama", "tiny-llama")):
        lean = adapter_to_proto(record(base), full=False)
        assert lean.base_model == shown, base
        assert lean.source_path == "" and dict(lean.metadata) == {}
        assert (lean.id, lean.rank, list(lean.target_modules)) == ("bot@v1", 8, ["q_proj"])


async def test_the_audit_log_is_pruned_in_the_background_to_its_bounds(store):
    """AdminService prunes at once when its pruning starts (the first RPC), then
    every interval: entries past the age bound, then all but the newest N."""
    import asyncio

    now = [2_000_000.0]
    store.clock = lambda: now[0]
    for i in range(12):
        now[0] = 2_000_000.0 + i * 86400  # one a day
        store.record_audit("admin:x", "SetQuotas", f"tenant/t{i}", "OK")
    admin = AdminService(store, lambda a: False, settle_s=0, audit_retention_s=5 * 86400,
                         audit_max_rows=4, prune_interval_s=3600)
    admin.ensure_pruning()
    for _ in range(200):  # bounded: the first pass runs in a worker thread
        await asyncio.sleep(0.01)
        if len(store.list_audit(100)) == 4:
            break
    assert [e.target for e in store.list_audit(100)] == [f"tenant/t{i}" for i in (11, 10, 9, 8)]
    first = admin._pruner
    admin.ensure_pruning()  # once: a second call starts nothing
    assert admin._pruner is first and not first.done()
    await admin.close()
    await asyncio.sleep(0)
    assert first.cancelled() or first.done()
