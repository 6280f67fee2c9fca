"""Authentication, tenant resolution and quota admission: the one entry point every
servicer uses.

    principal = await tenancy.authenticate(grpc_context)      # the key -> who
    tenant = await tenancy.resolve_tenant(principal, request.tenant)
    async with tenancy.admit(principal, stream=True) as lease:  # quotas
        ...
        lease.tokens += used

`authenticate` is the only code that reads a credential. It returns a `Principal`
(the caller's kind and tenant context); nothing below the servicers sees a key.

Caching: a key's record (and its tenant's context) is kept per replica for at most
`tenancy.auth_cache_ttl_s` (0.5 s by default, never more than 1 s), so a revoked key,
a removed grant or a changed quota takes effect on every replica within that time,
while a busy key costs one database read per replica per TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from hybridserve import observability as obs
from hybridserve import topology
from hybridserve.config import HybridServeConfig
from hybridserve.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from hybridserve.tenancy import keys
from hybridserve.tenancy.domain import ApiKeyInfo, Principal, Quotas, Tenant, validate_tenant_id
from hybridserve.tenancy.quotas import Lease, RedisQuotas
from hybridserve.tenancy.store import TenancyStore

logger = logging.getLogger(__name__)

#: Longest `authorization` value looked at; anything longer is refused unparsed.
MAX_AUTH_HEADER_CHARS = 256
#: Keys (known or unknown ids) whose lookup a replica remembers.
_CACHE_SIZE = 10_000
#: How often a key's last_used_at is written at most (it is a database write).
TOUCH_INTERVAL_S = 60.0

_NO_QUOTAS = Quotas()
_MISSING = (
    "no API key: send the metadata `authorization: Bearer <key>` (the SDK takes "
    "api_key= or $HYBRIDSERVE_API_KEY)"
)


@dataclass(frozen=True)
class _Cached:
    fetched_at: float
    info: ApiKeyInfo | None  # None: no such key id
    digest: str = ""
    tenant: Tenant | None = None


def bearer_token(metadata) -> str:
    """The token of the one `authorization: Bearer <token>` metadata entry.

    Raises Unauthenticated when there is none, several, or a malformed one.
    """
    values = []
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if isinstance(key, str) and key.lower() == topology.AUTHORIZATION_HEADER:
            values.append(value)
    if not values:
        raise Unauthenticated(_MISSING, reason="API_KEY_MISSING")
    if len(values) > 1:
        raise Unauthenticated("send exactly one `authorization` metadata entry",
                              reason="API_KEY_MALFORMED")
    value = values[0]
    if isinstance(value, bytes):
        raise Unauthenticated("the `authorization` metadata must be text", reason="API_KEY_MALFORMED")
    if len(value) > MAX_AUTH_HEADER_CHARS:
        raise Unauthenticated(
            f"the `authorization` metadata is longer than {MAX_AUTH_HEADER_CHARS} characters; "
            "send `Bearer <key>`", reason="API_KEY_MALFORMED",
        )
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the `authorization` metadata must be `Bearer <key>`",
                              reason="API_KEY_MALFORMED")
    return token.strip()


def store_call(fn, *args):
    """Runs a store read; a store that cannot be reached (SQLite locked past its busy
    timeout, PostgreSQL down) is UNAVAILABLE, which clients retry, not INTERNAL."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        return fn(*args)
    except (OperationalError, DBAPIError) as e:
        logger.warning("the tenancy store failed: %s", type(e).__name__)
        raise Unavailable("the tenancy store cannot be reached right now; retry shortly",
                          reason="TENANCY_STORE_UNAVAILABLE", retry_after=1.0) from None


def setup_servicer(config: HybridServeConfig | dict, tenancy: Tenancy | None,
                   metrics_service: str) -> tuple[HybridServeConfig, Tenancy]:
    """What every servicer does first: the typed config (Serve hands replicas a dict),
    metrics on or off as it says, and its tenancy (the one given, else the config's)."""
    cfg = config if isinstance(config, HybridServeConfig) else HybridServeConfig.model_validate(config)
    obs.set_enabled(cfg.observability.metrics_enabled)
    return cfg, tenancy or Tenancy.from_config(cfg, metrics_service=metrics_service)


class Tenancy:
    """Turns credentials into principals, resolves tenants, admits under quotas.

    Args:
        store: the tenancy store.
        quotas: the shared quota counters; None enforces no quotas (tests of
            servicers that are not about quotas).
        cache_ttl_s: how long a replica trusts what it read about a key.
        clock: epoch seconds (key expiry, last use); tests inject one.
        monotonic: the cache's clock; tests inject one.
        metrics_service: the `service` label of the auth/quota stage timings.
    """

    def __init__(
        self,
        store: TenancyStore,
        quotas: RedisQuotas | None = None,
        *,
        cache_ttl_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        metrics_service: str = "other",
    ):
        self.store = store
        self.quotas = quotas
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self.monotonic = monotonic
        self.metrics_service = metrics_service
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._tenants: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    @classmethod
    def from_config(cls, config, *, metrics_service: str = "other", migrate: bool = True) -> Tenancy:
        """The store and quota counters the config names (the platform's defaults
        under the data dir when unset). Migrates the store unless told not to."""
        store = TenancyStore(config.tenancy_database_url)
        if migrate:
            store.migrate()
        t = config.tenancy
        quotas = RedisQuotas(
            config.tenancy_redis_url,
            burst_s=t.quota_burst_s,
            stream_lease_s=t.stream_lease_s,
            fail_open=t.quota_fail_open,
        )
        return cls(store, quotas, cache_ttl_s=t.auth_cache_ttl_s, metrics_service=metrics_service)

    async def close(self) -> None:
        if self.quotas is not None:
            await self.quotas.close()
        await asyncio.to_thread(self.store.close)

    # -- authentication ------------------------------------------------------------

    async def authenticate(self, grpc_context) -> Principal:
        """The caller of an RPC, from its `authorization` metadata.

        Raises Unauthenticated (ErrorInfo reason API_KEY_MISSING, API_KEY_MALFORMED,
        API_KEY_INVALID, API_KEY_REVOKED or API_KEY_EXPIRED); never anything else
        for a bad credential.
        """
        start = time.perf_counter()
        try:
            metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
            return await self.authenticate_token(bearer_token(metadata))
        finally:
            obs.observe_stage("auth", time.perf_counter() - start, service=self.metrics_service)

    async def authenticate_token(self, token: str) -> Principal:
        try:
            parsed = keys.parse(token)
        except keys.MalformedKey as e:
            raise Unauthenticated(f"{e}; check the key you sent", reason="API_KEY_MALFORMED") from None
        entry = await self._lookup(parsed.key_id)
        if entry.info is None or not keys.matches(parsed, entry.digest) or entry.info.kind != parsed.kind:
            raise Unauthenticated(
                f"unknown API key {keys.display_prefix(parsed.kind, parsed.key_id)}: it does not "
                "exist or was deleted; ask an admin for a key", reason="API_KEY_INVALID",
            )
        now = self.clock()
        if why := entry.info.usable_at(now):
            raise Unauthenticated(
                f"API key {keys.display_prefix(parsed.kind, parsed.key_id)} is {why}; ask an admin "
                "for a new one", reason=f"API_KEY_{why.upper()}",
            )
        if parsed.kind == "tenant" and entry.tenant is None:
            raise Unauthenticated("the key's tenant no longer exists", reason="API_KEY_INVALID")
        self._maybe_touch(entry, now)
        return Principal(parsed.kind, parsed.key_id, entry.info.name, entry.tenant)

    async def _lookup(self, key_id: str) -> _Cached:
        entry = self._cache.get(key_id)
        now = self.monotonic()
        if entry is not None and now - entry.fetched_at < self.cache_ttl_s:
            self._cache.move_to_end(key_id)  # LRU: busy keys stay cached
            return entry
        # One read per key id at a time: concurrent misses share it.
        pending = self._inflight.get(key_id)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(store_call, self._fetch, key_id))
            self._inflight[key_id] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(key_id, None))
        entry = await asyncio.shield(pending)
        self._cache[key_id] = entry
        self._cache.move_to_end(key_id)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return entry

    def _fetch(self, key_id: str) -> _Cached:
        # NOTE: the time is taken before the read, so an entry never claims to be
        # fresher than the data it holds.
        fetched_at = self.monotonic()
        found = self.store.get_key(key_id)
        if found is None:
            return _Cached(fetched_at, None)
        info, digest = found
        tenant = None
        if info.tenant:
            try:
                tenant = self.store.get_tenant(info.tenant)
            except NotFound:
                tenant = None
        return _Cached(fetched_at, info, digest, tenant)

    def _maybe_touch(self, entry: _Cached, now: float) -> None:
        info = entry.info
        if info is None or (info.last_used_at is not None and now - info.last_used_at < TOUCH_INTERVAL_S):
            return
        # Remember at once, so only one write goes out per interval and replica.
        fresh = replace(entry, info=replace(info, last_used_at=now))
        self._cache[info.key_id] = fresh

        def touch() -> None:
            try:
                self.store.touch_key(info.key_id, now)
            except Exception:  # noqa: BLE001 - bookkeeping must never fail a request
                logger.warning("could not record the use of key %s", info.key_id, exc_info=True)

        with contextlib.suppress(RuntimeError):  # no running loop: skip the bookkeeping
            asyncio.get_running_loop().run_in_executor(None, touch)

    def invalidate(self, key_id: str | None = None) -> None:
        """Drops cached lookups (all, or one key's): the next call reads the store."""
        if key_id is None:
            self._cache.clear()
            self._tenants.clear()
        else:
            self._cache.pop(key_id, None)

    # -- tenants ---------------------------------------------------------------------

    async def resolve_tenant(self, principal: Principal, requested: str, field: str = "tenant") -> str:
        """The tenant a data-plane call acts in.

        A tenant key: its own (an empty field means it; naming another is
        PERMISSION_DENIED). An admin key: the one it names, which must exist.
        """
        if not principal.is_admin:
            return principal.own_tenant(requested, field)
        if not requested:
            raise InvalidArgument(
                f"an admin key must name the tenant: set {field}",
                field_violations=[(field, "required with an admin key")],
            )
        validate_tenant_id(requested, field)
        if not await self._tenant_exists(requested):
            raise NotFound(
                f"unknown tenant {requested!r}; create it with "
                f"`hybridserve admin tenants create {requested}`", reason="TENANT_NOT_FOUND",
            )
        return requested

    async def _tenant_exists(self, tenant: str) -> bool:
        cached = self._tenants.get(tenant)
        now = self.monotonic()
        if cached is not None and now - cached[0] < self.cache_ttl_s:
            return cached[1]
        exists = await asyncio.to_thread(store_call, self.store.tenant_exists, tenant)
        self._tenants[tenant] = (now, exists)
        while len(self._tenants) > _CACHE_SIZE:
            self._tenants.popitem(last=False)
        return exists

    # -- quotas ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(
        self, principal: Principal, *, stream: bool = False, lease_s: float | None = None
    ) -> AsyncIterator[Lease]:
        """Admits one request of `principal` under its tenant's quotas, or raises
        ResourceExhausted. Add the tokens the request used to `lease.tokens`; they
        are debited when the block ends, however it ends (also on cancel)."""
        tenant = principal.tenant
        if principal.is_admin or tenant is None or self.quotas is None or not tenant.quotas.limited:
            yield Lease(principal.tenant_id or "", tenant.quotas if tenant else _NO_QUOTAS)
            return
        start = time.perf_counter()
        try:
            lease = await self.quotas.acquire(tenant.id, tenant.quotas, stream=stream, lease_s=lease_s)
        except Exception as e:
            if getattr(e, "code", "") == "RESOURCE_EXHAUSTED":
                obs.quota_rejected(tenant.id, e.metadata.get("quota", "requests"))
            raise
        finally:
            obs.observe_stage("quota", time.perf_counter() - start, service=self.metrics_service)
        try:
            yield lease
        finally:
            # NOTE: shielded: a cancelled stream must still free its slot and pay
            # for the tokens it used.
            await asyncio.shield(self.quotas.release(lease))

