"""The tenancy store on both engines it supports: SQLite (WAL, the default) and a real
PostgreSQL server (Debian's package, `initdb` into a temp dir, run as an
unprivileged user). The same tests run against each; the migrations build the
schema from empty on each.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from hybridserve.errors import AlreadyExists, InvalidArgument, NotFound
from hybridserve.tenancy import keys
from hybridserve.tenancy.domain import Quotas, Tenant
from hybridserve.tenancy.schema import metadata
from hybridserve.tenancy.store import TenancyStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres():
    from testkit.postgres import PostgresServer

    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path, postgres):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tenancy.db'}"
    # A fresh database per test: migrations always start from empty.
    name = f"t{abs(hash(request.node.name)) % 10**9}"
    postgres.psql(f"DROP DATABASE IF EXISTS {name}")
    postgres.psql(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def store(url):
    s = TenancyStore(url)
    yield s
    s.close()


def test_migrations_build_the_declared_schema_from_empty(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    assert store.revision() is None
    head = store.migrate()
    assert store.revision() == head == "0001"
    assert store.migrate() == head  # idempotent
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == [], diff


def test_concurrent_migrations_from_many_replicas(url):
    stores = [TenancyStore(url) for _ in range(4)]
    errors = []

    def run(s):
        try:
            s.migrate()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and {s.revision() for s in stores} == {"0001"}
    for s in stores:
        s.close()


def test_tenants_grants_keys_and_audit(store):
    store.migrate()
    t, created = store.create_tenant(Tenant("acme", display_name="Acme", quotas=Quotas(60, 0, 2)),
                                     actor="admin:x")
    assert created and t.quotas == Quotas(60, 0, 2)
    assert store.create_tenant(Tenant("acme"), actor="admin:x") == (t, False)
    store.grant("acme", "tone@v1", make_default=True, actor="admin:x")
    store.grant("acme", "json@v1", make_default=False, actor="admin:x")
    assert store.get_tenant("acme").adapters == ("json@v1", "tone@v1")
    assert store.get_tenant("acme").default_adapter == "tone@v1"
    with pytest.raises(InvalidArgument):
        store.set_default("acme", "other@v1", actor="admin:x")
    store.revoke_grant("acme", "tone@v1", actor="admin:x")
    assert store.get_tenant("acme").default_adapter == ""
    assert store.tenants_granted("json@v1") == ["acme"]

    key = keys.generate("tenant")
    info = store.add_key(key_id=key.key_id, kind="tenant", tenant_id="acme", name="ci",
                         digest=key.digest, expires_at=None, actor="admin:x")
    assert info.tenant == "acme" and info.revoked_at is None
    with pytest.raises(AlreadyExists):
        store.add_key(key_id=key.key_id, kind="tenant", tenant_id="acme", name="dup",
                      digest=key.digest, expires_at=None, actor="admin:x")
    with pytest.raises(NotFound):
        store.add_key(key_id=keys.new_key_id(), kind="tenant", tenant_id="ghost", name="",
                      digest="0" * 64, expires_at=None, actor="admin:x")
    found, digest = store.get_key(key.key_id)
    assert digest == key.digest and found.name == "ci"
    store.touch_key(key.key_id, 123.0)
    assert store.get_key(key.key_id)[0].last_used_at == 123.0
    assert store.revoke_key(key.key_id, actor="admin:x").revoked_at is not None
    assert store.list_keys("acme") == [] and len(store.list_keys("acme", include_revoked=True)) == 1

    updated = store.update_tenant("acme", actor="admin:x", system_prompt="Be brief.",
                                  quotas=Quotas(0, 500, 0))
    assert updated.system_prompt == "Be brief." and updated.quotas == Quotas(0, 500, 0)
    assert store.delete_tenant("acme", actor="admin:x") == 1
    assert store.get_key(key.key_id) is None and store.tenants_granted("json@v1") == []
    with pytest.raises(NotFound):
        store.get_tenant("acme")
    actions = [e.action for e in reversed(store.list_audit(100))]
    assert actions == ["CreateTenant", "GrantAdapter", "GrantAdapter", "RevokeAdapter",
                       "CreateKey", "RevokeKey", "UpdateTenant", "DeleteTenant"]
    assert [e.action for e in store.list_audit(100, tenant="acme")][0] == "DeleteTenant"


def test_a_failed_transaction_leaves_nothing(store):
    store.migrate()
    with pytest.raises(RuntimeError):
        with store.write() as conn:
            store.create_tenant(Tenant("half"), actor="admin:x", conn=conn)
            raise RuntimeError("crash midway")
    assert not store.tenant_exists("half")
    assert store.list_audit(10) == []


def test_no_key_plaintext_anywhere_in_the_store(store, url, tmp_path):
    store.migrate()
    store.create_tenant(Tenant("acme"), actor="admin:x")
    made = [keys.generate("tenant") for _ in range(5)] + [keys.generate("admin")]
    for k in made:
        store.add_key(key_id=k.key_id, kind=k.kind, tenant_id="acme" if k.kind == "tenant" else None,
                      name="n", digest=k.digest, expires_at=None, actor="admin:x")
        store.record_audit("admin:x", "CreateKey", f"key/{k.key_id}", "OK")
    dump = []
    with store.engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                dump.append(" ".join(str(v) for v in row))
    text = "\n".join(dump)
    secrets = [k.key for k in made] + [k.key[17:] for k in made]
    assert all(s not in text for s in secrets)
    assert all(k.key_id in text for k in made)  # the key ids are there: the probe can fail
    if url.startswith("sqlite"):
        store.close()
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("tenancy.db*"))
        assert raw and all(s.encode() not in raw for s in secrets)


def test_audit_retention_by_age_and_rows_and_the_export_order(store):
    """prune_audit on the real database: by age, then to the newest N rows; what is
    left pages oldest first from an id (the export) and newest first without one."""
    store.migrate()
    now = [1_000_000.0]
    store.clock = lambda: now[0]
    for i in range(30):
        now[0] = 1_000_000.0 + i * 100
        store.record_audit("admin:x", "CreateTenant", f"tenant/t{i}", "OK", tenant=f"t{i}")
    assert store.prune_audit() == 0  # no bound given: nothing
    assert store.prune_audit(older_than=1_000_000.0 + 10 * 100, batch=4) == 10
    left = store.list_audit(1000)
    assert len(left) == 20 and min(e.at for e in left) == 1_000_000.0 + 1000
    assert store.prune_audit(keep_rows=8, batch=3) == 12
    newest = store.list_audit(1000)
    assert [e.target for e in newest] == [f"tenant/t{i}" for i in range(29, 21, -1)]
    page = store.list_audit(5, after_id=0)
    assert [e.target for e in page] == [f"tenant/t{i}" for i in range(22, 27)]
    rest = store.list_audit(5, after_id=page[-1].id)
    assert [e.target for e in rest] == ["tenant/t27", "tenant/t28", "tenant/t29"]
    assert store.list_audit(5, after_id=rest[-1].id) == []
    assert [e.tenant for e in store.list_audit(5, tenant="t28", after_id=0)] == ["t28"]
