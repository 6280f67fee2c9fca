"""The tenancy store's tables (SQLAlchemy Core). The schema itself is created and
changed only by the Alembic migrations in `migrations/versions/`; a unit test
checks that they produce exactly these tables.

Times are epoch seconds (float): the same on SQLite and PostgreSQL, no time zones.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("display_name", String(200), nullable=False, server_default=""),
    Column("allow_base", Boolean, nullable=False, server_default="0"),
    Column("default_adapter", String(200), nullable=True),
    Column("system_prompt", Text, nullable=False, server_default=""),
    Column("requests_per_minute", Integer, nullable=False, server_default="0"),
    Column("tokens_per_minute", Integer, nullable=False, server_default="0"),
    Column("concurrent_streams", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(12), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("tenant_id", String(64), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True),
    Column("name", String(100), nullable=False, server_default=""),
    # hex SHA-256 of the whole key (see keys.py); the key itself is never stored.
    Column("digest", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(64), nullable=False, server_default=""),
    Column("last_used_at", Float, nullable=True),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Index("ix_api_keys_tenant_id", "tenant_id"),
)

grants = Table(
    "grants",
    metadata,
    Column("tenant_id", String(64), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("adapter_id", String(200), primary_key=True),
    Column("created_at", Float, nullable=False),
    Index("ix_grants_adapter_id", "adapter_id"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(300), nullable=False, server_default=""),
    Column("tenant_id", String(64), nullable=True),
    Column("outcome", String(32), nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index("ix_audit_log_at", "at"),
    Index("ix_audit_log_tenant_id", "tenant_id"),
)
