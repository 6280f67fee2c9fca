"""The tenancy store: tenants, API key digests, adapter grants, quotas and the
audit log, in SQL through SQLAlchemy 2 (Core).

- SQLite (WAL) under the data dir by default: one file, readers never block on
  the writer, and every Serve replica on the machine opens the same file.
- PostgreSQL through `tenancy.database_url` for clusters: replicas on many nodes.

The schema is versioned with Alembic (`migrations/`). `migrate()` brings a
database from empty (or any older revision) to the current one; it is safe to
call from many replicas at once (a file lock on SQLite, an advisory lock on
PostgreSQL).

Every method is synchronous and short; async callers run them in a thread.
Methods that change something take the audit fields and write the audit entry
in the same transaction, so an action and its record cannot part.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from hybridserve.errors import AlreadyExists, InvalidArgument, NotFound
from hybridserve.tenancy.domain import ApiKeyInfo, AuditEntry, Quotas, Tenant
from hybridserve.tenancy.schema import api_keys, audit_log, grants, tenants

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: pg_advisory_lock key that serialises migrations ("hybr" in ASCII).
_PG_MIGRATION_LOCK = 0x68796272
MAX_AUDIT_DETAIL_CHARS = 4000


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def create_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout.

    NOTE: on SQLite every transaction that writes starts with BEGIN IMMEDIATE
    (connections from `TenancyStore._writer`): a deferred transaction that first
    reads and then writes can fail with "database is locked" when another process
    wrote in between, however long the busy timeout is.
    """
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            immediate = conn.get_execution_options().get("hybridserve_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _tenant_from_row(row, adapters: Iterable[str]) -> Tenant:
    return Tenant(
        id=row.id,
        display_name=row.display_name,
        allow_base=bool(row.allow_base),
        adapters=tuple(sorted(adapters)),
        default_adapter=row.default_adapter or "",
        system_prompt=row.system_prompt,
        quotas=Quotas(row.requests_per_minute, row.tokens_per_minute, row.concurrent_streams),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _key_from_row(row) -> ApiKeyInfo:
    return ApiKeyInfo(
        key_id=row.key_id,
        kind=row.kind,
        tenant=row.tenant_id or "",
        name=row.name,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


class TenancyStore:
    """Tenants, keys, grants, quotas and audit in one SQL database.

    Args:
        url: SQLAlchemy URL (`sqlite:///...` or `postgresql://...`).
        clock: epoch seconds; injected by tests.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time):
        self.url = url
        self.engine = create_engine(url)
        self._writer = self.engine.execution_options(hybridserve_write=True)
        self.clock = clock

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # -- schema -------------------------------------------------------------------

    def _alembic_config(self, connection: Connection):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = connection
        return cfg

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[Connection]:
        if self.dialect == "sqlite":
            db_path = Path(self.engine.url.database or "")
            lock_path = db_path.with_name(db_path.name + ".migrate.lock")
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                with self.engine.connect() as conn:
                    yield conn
            return
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()

    def migrate(self) -> str:
        """Upgrades the schema to the newest revision; returns it."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self._migration_lock() as conn:
            cfg = self._alembic_config(conn)
            head = ScriptDirectory.from_config(cfg).get_current_head()
            current = MigrationContext.configure(conn).get_current_revision()
            if current != head:
                logger.info("migrating the tenancy store %s -> %s", current, head)
                command.upgrade(cfg, "head")
                conn.commit()
            return head

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # -- transactions ---------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (committed at the end, rolled back on error)."""
        with self._writer.begin() as conn:
            yield conn

    def _audit(self, conn: Connection, actor: str, action: str, target: str, outcome: str,
               detail: str = "", tenant: str | None = None) -> None:
        conn.execute(audit_log.insert().values(
            at=self.clock(), actor=actor[:64], action=action[:64], target=target[:300],
            tenant_id=tenant, outcome=outcome[:32], detail=detail[:MAX_AUDIT_DETAIL_CHARS],
        ))

    def record_audit(self, actor: str, action: str, target: str, outcome: str,
                     detail: str = "", tenant: str | None = None) -> None:
        """An audit entry on its own (for actions that failed or live elsewhere)."""
        with self.write() as conn:
            self._audit(conn, actor, action, target, outcome, detail, tenant)

    def list_audit(self, limit: int = 100, tenant: str = "",
                   after_id: int | None = None) -> list[AuditEntry]:
        """The newest `limit` entries, newest first; with `after_id`, the `limit`
        oldest entries whose id is above it, oldest first (for an export that
        resumes where the last one stopped)."""
        if after_id is None:
            q = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        else:
            q = (sa.select(audit_log).where(audit_log.c.id > after_id)
                 .order_by(audit_log.c.id).limit(limit))
        if tenant:
            q = q.where(audit_log.c.tenant_id == tenant)
        with self.engine.connect() as conn:
            return [
                AuditEntry(r.id, r.at, r.actor, r.action, r.target, r.outcome, r.detail,
                           r.tenant_id or "")
                for r in conn.execute(q)
            ]

    def prune_audit(self, *, older_than: float | None = None, keep_rows: int | None = None,
                    batch: int = 5000) -> int:
        """Deletes audit entries older than `older_than` (epoch seconds) and all but the
        newest `keep_rows`; returns how many. In batches of `batch` rows, each its own
        short transaction, so writers are never held up for long."""
        removed = 0
        cut_id = None
        if keep_rows is not None:
            with self.engine.connect() as conn:
                cut_id = conn.execute(
                    sa.select(audit_log.c.id).order_by(audit_log.c.id.desc())
                    .offset(keep_rows).limit(1)
                ).scalar()
        conditions = []
        if older_than is not None:
            conditions.append(audit_log.c.at < older_than)
        if cut_id is not None:
            conditions.append(audit_log.c.id <= cut_id)
        if not conditions:
            return 0
        while True:
            with self.write() as c:
                ids = (sa.select(audit_log.c.id).where(sa.or_(*conditions))
                       .order_by(audit_log.c.id).limit(batch))
                n = c.execute(audit_log.delete().where(audit_log.c.id.in_(ids))).rowcount or 0
            removed += n
            if n < batch:
                return removed

    # -- tenants --------------------------------------------------------------------

    def _grants_of(self, conn: Connection, tenant_ids: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t: [] for t in tenant_ids}
        if tenant_ids:
            rows = conn.execute(
                sa.select(grants.c.tenant_id, grants.c.adapter_id)
                .where(grants.c.tenant_id.in_(list(tenant_ids)))
            )
            for r in rows:
                out[r.tenant_id].append(r.adapter_id)
        return out

    def _get_tenant(self, conn: Connection, tenant_id: str) -> Tenant:
        row = conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).first()
        if row is None:
            raise NotFound(
                f"unknown tenant {tenant_id!r}; create it with "
                f"`hybridserve admin tenants create {tenant_id}`",
                reason="TENANT_NOT_FOUND",
            )
        return _tenant_from_row(row, self._grants_of(conn, [tenant_id])[tenant_id])

    def _get_tenant_or_none(self, conn: Connection, tenant_id: str) -> Tenant | None:
        try:
            return self._get_tenant(conn, tenant_id)
        except NotFound:
            return None

    def get_tenant(self, tenant_id: str) -> Tenant:
        with self.engine.connect() as conn:
            return self._get_tenant(conn, tenant_id)

    def tenant_exists(self, tenant_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(tenants.c.id).where(tenants.c.id == tenant_id)
            ).first() is not None

    def tenant_incarnation(self, tenant_id: str) -> float | None:
        """Which incarnation of `tenant_id` exists now (its creation time), or None.

        A tenant deleted and created again under the same id is another incarnation:
        a write admitted for the old one checks this before each batch, so it can
        never land in the new one's knowledge space.
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(tenants.c.created_at).where(tenants.c.id == tenant_id)
            ).first()
            return None if row is None else float(row.created_at)

    def list_tenants(self) -> list[Tenant]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(tenants).order_by(tenants.c.id)).all()
            by_tenant = self._grants_of(conn, [r.id for r in rows])
            return [_tenant_from_row(r, by_tenant[r.id]) for r in rows]

    def create_tenant(self, tenant: Tenant, *, actor: str, conn: Connection | None = None) -> tuple[Tenant, bool]:
        """Creates `tenant` (its grants must be empty); (stored tenant, created)."""
        with self._maybe_write(conn) as c:
            existing = c.execute(sa.select(tenants.c.id).where(tenants.c.id == tenant.id)).first()
            if existing is not None:
                return self._get_tenant(c, tenant.id), False
            now = self.clock()
            c.execute(tenants.insert().values(
                id=tenant.id, display_name=tenant.display_name, allow_base=tenant.allow_base,
                default_adapter=None, system_prompt=tenant.system_prompt,
                requests_per_minute=tenant.quotas.requests_per_minute,
                tokens_per_minute=tenant.quotas.tokens_per_minute,
                concurrent_streams=tenant.quotas.concurrent_streams,
                created_at=now, updated_at=now,
            ))
            self._audit(c, actor, "CreateTenant", f"tenant/{tenant.id}", "OK", tenant=tenant.id)
            return self._get_tenant(c, tenant.id), True

    @contextlib.contextmanager
    def _maybe_write(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self.write() as c:
                yield c

    def update_tenant(self, tenant_id: str, *, actor: str, conn: Connection | None = None,
                      action: str = "UpdateTenant", **fields) -> Tenant:
        """Sets the given columns (display_name, allow_base, system_prompt, quotas)."""
        values = {}
        for key, value in fields.items():
            if value is None:
                continue
            if key == "quotas":
                values.update(
                    requests_per_minute=value.requests_per_minute,
                    tokens_per_minute=value.tokens_per_minute,
                    concurrent_streams=value.concurrent_streams,
                )
            else:
                values[key] = value
        with self._maybe_write(conn) as c:
            before = self._get_tenant(c, tenant_id)
            if values:
                values["updated_at"] = self.clock()
                c.execute(tenants.update().where(tenants.c.id == tenant_id).values(**values))
            after = self._get_tenant(c, tenant_id)
            self._audit(c, actor, action, f"tenant/{tenant_id}", "OK",
                        tenant_diff(before, after), tenant=tenant_id)
            return after

    def delete_tenant(self, tenant_id: str, *, actor: str, conn: Connection | None = None) -> int:
        """Deletes a tenant with its keys and grants; returns the number of keys removed."""
        with self._maybe_write(conn) as c:
            self._get_tenant(c, tenant_id)
            n_keys = c.execute(
                sa.select(sa.func.count()).select_from(api_keys).where(api_keys.c.tenant_id == tenant_id)
            ).scalar_one()
            # Explicit, not only ON DELETE CASCADE: SQLite enforces it only with
            # foreign_keys=ON, and a key must never outlive its tenant.
            c.execute(api_keys.delete().where(api_keys.c.tenant_id == tenant_id))
            c.execute(grants.delete().where(grants.c.tenant_id == tenant_id))
            c.execute(tenants.delete().where(tenants.c.id == tenant_id))
            self._audit(c, actor, "DeleteTenant", f"tenant/{tenant_id}", "OK",
                        f"{n_keys} keys removed", tenant=tenant_id)
            return int(n_keys)

    # -- grants ---------------------------------------------------------------------

    def grant(self, tenant_id: str, adapter_id: str, *, make_default: bool, actor: str,
              conn: Connection | None = None) -> Tenant:
        with self._maybe_write(conn) as c:
            before = self._get_tenant(c, tenant_id)
            if adapter_id not in before.adapters:
                c.execute(grants.insert().values(
                    tenant_id=tenant_id, adapter_id=adapter_id, created_at=self.clock()))
            if make_default and before.default_adapter != adapter_id:
                c.execute(tenants.update().where(tenants.c.id == tenant_id)
                          .values(default_adapter=adapter_id, updated_at=self.clock()))
            after = self._get_tenant(c, tenant_id)
            self._audit(c, actor, "GrantAdapter", f"tenant/{tenant_id}", "OK",
                        f"adapter {adapter_id}" + (" (default)" if make_default else ""),
                        tenant=tenant_id)
            return after

    def revoke_grant(self, tenant_id: str, adapter_id: str, *, actor: str,
                     conn: Connection | None = None) -> Tenant:
        with self._maybe_write(conn) as c:
            before = self._get_tenant(c, tenant_id)
            if adapter_id not in before.adapters:
                raise NotFound(
                    f"tenant {tenant_id!r} has no grant of adapter {adapter_id!r}",
                    reason="GRANT_NOT_FOUND",
                )
            c.execute(grants.delete().where(
                (grants.c.tenant_id == tenant_id) & (grants.c.adapter_id == adapter_id)))
            if before.default_adapter == adapter_id:
                c.execute(tenants.update().where(tenants.c.id == tenant_id)
                          .values(default_adapter=None, updated_at=self.clock()))
            self._audit(c, actor, "RevokeAdapter", f"tenant/{tenant_id}", "OK",
                        f"adapter {adapter_id}", tenant=tenant_id)
            return self._get_tenant(c, tenant_id)

    def set_default(self, tenant_id: str, adapter_id: str, *, actor: str,
                    conn: Connection | None = None) -> Tenant:
        """Sets the default adapter ("" clears it). It must already be granted."""
        with self._maybe_write(conn) as c:
            before = self._get_tenant(c, tenant_id)
            if adapter_id and adapter_id not in before.adapters:
                raise InvalidArgument(
                    f"the default adapter {adapter_id!r} is not granted to {tenant_id!r}; grant it first",
                    field_violations=[("default_adapter", "must be one of the tenant's adapters")],
                )
            c.execute(tenants.update().where(tenants.c.id == tenant_id)
                      .values(default_adapter=adapter_id or None, updated_at=self.clock()))
            self._audit(c, actor, "SetDefaultAdapter", f"tenant/{tenant_id}", "OK",
                        f"default {before.default_adapter or '-'} -> {adapter_id or '-'}",
                        tenant=tenant_id)
            return self._get_tenant(c, tenant_id)

    def tenants_granted(self, adapter_id: str) -> list[str]:
        """The tenants that have `adapter_id` granted, sorted."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(grants.c.tenant_id).where(grants.c.adapter_id == adapter_id)
                .order_by(grants.c.tenant_id)
            )
            return [r.tenant_id for r in rows]

    # -- keys -----------------------------------------------------------------------

    def add_key(self, *, key_id: str, kind: str, tenant_id: str | None, name: str, digest: str,
                expires_at: float | None, actor: str) -> ApiKeyInfo:
        with self.write() as c:
            if tenant_id is not None:
                self._get_tenant(c, tenant_id)
            try:
                c.execute(api_keys.insert().values(
                    key_id=key_id, kind=kind, tenant_id=tenant_id, name=name, digest=digest,
                    created_at=self.clock(), created_by=actor[:64], expires_at=expires_at,
                ))
            except IntegrityError:
                raise AlreadyExists(f"key id {key_id} exists; create the key again") from None
            self._audit(c, actor, "CreateKey", f"key/{key_id}", "OK",
                        f"{kind} key {name!r}" + (f" for {tenant_id}" if tenant_id else ""),
                        tenant=tenant_id)
            return _key_from_row(c.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).one())

    def get_key(self, key_id: str) -> tuple[ApiKeyInfo, str] | None:
        """(key info, stored digest), or None. The one query behind authentication."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
            return None if row is None else (_key_from_row(row), row.digest)

    def list_keys(self, tenant_id: str = "", include_revoked: bool = False) -> list[ApiKeyInfo]:
        q = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
        if tenant_id:
            q = q.where(api_keys.c.tenant_id == tenant_id)
        if not include_revoked:
            q = q.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key_from_row(r) for r in conn.execute(q)]

    def revoke_key(self, key_id: str, *, actor: str) -> ApiKeyInfo:
        with self.write() as c:
            row = c.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
            if row is None:
                raise NotFound(f"unknown key id {key_id!r}", reason="KEY_NOT_FOUND")
            if row.revoked_at is None:
                c.execute(api_keys.update().where(api_keys.c.key_id == key_id)
                          .values(revoked_at=self.clock()))
            self._audit(c, actor, "RevokeKey", f"key/{key_id}", "OK", tenant=row.tenant_id)
            return _key_from_row(c.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).one())

    def touch_key(self, key_id: str, at: float) -> None:
        """Records that a key was used (callers rate-limit this: it is a write)."""
        with self.write() as c:
            c.execute(api_keys.update().where(api_keys.c.key_id == key_id).values(last_used_at=at))

    def has_admin_key(self) -> bool:
        """Whether any admin key that is not revoked exists."""
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(api_keys.c.key_id)
                .where((api_keys.c.kind == "admin") & api_keys.c.revoked_at.is_(None))
                .limit(1)
            ).first() is not None


def tenant_diff(before: Tenant, after: Tenant) -> str:
    """"field: old -> new" for every field that changed."""
    parts = []
    for name in ("display_name", "allow_base", "system_prompt", "default_adapter"):
        a, b = getattr(before, name), getattr(after, name)
        if a != b:
            parts.append(f"{name}: {_short(a)} -> {_short(b)}")
    for name in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
        a, b = getattr(before.quotas, name), getattr(after.quotas, name)
        if a != b:
            parts.append(f"quotas.{name}: {a} -> {b}")
    return "; ".join(parts) or "no change"


def _short(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."

