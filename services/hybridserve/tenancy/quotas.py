"""Per-tenant quotas that hold across every replica: one shared counter in Redis.

Three limits per tenant, all optional (0 = none):

- **requests per minute**: a token bucket refilled at rpm/60 per second, holding
  at most `burst` requests. Every RPC of a tenant key takes one.
- **tokens per minute** (prompt + completion): a bucket refilled at tpm/60 per
  second. A request is admitted while the balance is above zero; its real usage
  is debited when it ends (also when it is cancelled), so the balance can go
  below zero and then holds new requests back until it has refilled.
- **concurrent streams**: a sorted set of leases, one per open stream, each with an
  expiry (the stream's deadline, at most `stream_lease_s`), so a replica that dies
  mid-stream frees its slots when they expire.

Bursts: over any window of T seconds a tenant is admitted at most
``rpm * T / 60 + burst`` requests, with ``burst = ceil(rpm * burst_s / 60)`` (10 s
worth by default); the same holds for tokens, plus the usage of the requests
already admitted when the balance ran out.

Why Redis: one atomic Lua script per admission checks and takes all three limits in
a single round trip (~0.1 ms on loopback), for any number of replicas on any
number of nodes, and it is what Envoy's global rate limit service and AIBrix use.
A Ray actor would put every request of the platform through one single-threaded
Python process (a hop of ~0.5-1 ms, state lost with the actor); PostgreSQL would
turn every request into a row-locked write.

Time is the caller's clock (`now`), so tests inject one; replicas on different
hosts need synchronised clocks (NTP), which Kubernetes nodes have.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from hybridserve.errors import ResourceExhausted, Unavailable
from hybridserve.tenancy.domain import Quotas

logger = logging.getLogger(__name__)

# KEYS: requests bucket, tokens bucket, stream leases.
# ARGV: now, rpm, rpm_cap, tpm, tpm_cap, streams, lease_id, lease_expiry, ttl.
# Returns {1} when admitted, or {0, quota, retry_after_seconds (text)}.
_ADMIT = """
local now = tonumber(ARGV[1])
local rpm, rpm_cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local tpm, tpm_cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local streams = tonumber(ARGV[6])
local ttl = tonumber(ARGV[9])

-- The bucket's level now, and the time to store with it: never earlier than the
-- stored one, so a replica whose clock is behind cannot refill the same time twice.
local function refill(key, rate, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(v[1]), tonumber(v[2])
  if level == nil then return cap, now end
  if now > at then return math.min(cap, level + (now - at) * rate), now end
  return level, at
end

local r_level, t_level, r_at, t_at
if rpm > 0 then
  r_level, r_at = refill(KEYS[1], rpm / 60.0, rpm_cap)
  if r_level < 1 then
    return {0, 'requests', tostring((1 - r_level) / (rpm / 60.0))}
  end
end
if tpm > 0 then
  t_level, t_at = refill(KEYS[2], tpm / 60.0, tpm_cap)
  if t_level <= 0 then
    return {0, 'tokens', tostring((1 - t_level) / (tpm / 60.0))}
  end
end
if streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= streams then
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {0, 'concurrency', tostring(math.min(1.0, tonumber(first[2]) - now))}
  end
  redis.call('ZADD', KEYS[3], tonumber(ARGV[8]), ARGV[7])
  redis.call('EXPIRE', KEYS[3], ttl)
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(r_level - 1), 'at', tostring(r_at))
  redis.call('EXPIRE', KEYS[1], ttl)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'level', tostring(t_level), 'at', tostring(t_at))
  -- A bucket in debt lives until it has refilled, so the debt is never forgiven.
  redis.call('EXPIRE', KEYS[2], math.max(ttl, math.ceil((tpm_cap - t_level) / (tpm / 60.0)) + 60))
end
return {1}
"""

# KEYS: tokens bucket, stream leases. ARGV: now, tpm, tpm_cap, tokens, lease_id, ttl.
_RELEASE = """
local now = tonumber(ARGV[1])
local tpm, cap, tokens = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
if tpm > 0 and tokens > 0 then
  local v = redis.call('HMGET', KEYS[1], 'level', 'at')
  local level, at = tonumber(v[1]), tonumber(v[2])
  if level == nil then level, at = cap, now end
  if now > at then level = math.min(cap, level + (now - at) * tpm / 60.0) end
  level = level - tokens
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(math.max(now, at)))
  -- A bucket in debt lives until it has refilled, so the debt is never forgiven.
  redis.call('EXPIRE', KEYS[1], math.max(tonumber(ARGV[6]), math.ceil((cap - level) / (tpm / 60.0)) + 60))
end
return 1
"""


def redact_url(url: str) -> str:
    """`url` without its user and password (safe to log or show)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def connect(url: str, timeout_s: float):
    """An asyncio Redis client for the quota counters (every call bounded by `timeout_s`)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                   socket_connect_timeout=timeout_s, decode_responses=True)


@dataclass
class Lease:
    """What one admitted request holds: its stream slot (if any) and its usage."""

    tenant: str
    quotas: Quotas
    lease_id: str = ""
    tokens: int = 0


def bucket_capacity(per_minute: int, burst_s: float) -> int:
    """How much a bucket holds: `burst_s` seconds' worth, at least 1."""
    return max(1, math.ceil(per_minute * burst_s / 60.0))


class RedisQuotas:
    """Quota counters in Redis, shared by every replica that uses the same URL.

    Args:
        url: `redis://host:port/db` or `unix:///path/to/socket`.
        burst_s: bucket sizes, in seconds of the per-minute rate.
        stream_lease_s: the longest a stream slot is held without being released.
        fail_open: when Redis cannot be reached, admit (and log) instead of refusing.
        clock: epoch seconds; tests inject one.
    """

    def __init__(
        self,
        url: str,
        *,
        burst_s: float = 10.0,
        stream_lease_s: float = 600.0,
        fail_open: bool = True,
        timeout_s: float = 2.0,
        clock=time.time,
    ):
        self.url = url
        self.burst_s = burst_s
        self.stream_lease_s = stream_lease_s
        self.fail_open = fail_open
        self.clock = clock
        self._redis = connect(url, timeout_s)
        self._admit = self._redis.register_script(_ADMIT)
        self._release = self._redis.register_script(_RELEASE)
        self._last_warning = 0.0
        self._tasks: set[asyncio.Task] = set()
        # How long counters live unused: long enough for a full bucket to refill and
        # for any lease (a bucket in debt lives longer; see the scripts).
        self._ttl_s = int(max(120.0, stream_lease_s, burst_s) + 60)

    @staticmethod
    def _keys(tenant: str) -> tuple[str, str, str]:
        # NOTE: one hash tag per tenant, so a Redis Cluster keeps a tenant's keys
        # (which one script touches together) on one slot.
        base = f"hybridserve:quota:{{{tenant}}}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:streams"


    async def acquire(self, tenant: str, quotas: Quotas, *, stream: bool,
                      lease_s: float | None = None) -> Lease:
        """Admits one request or raises ResourceExhausted (with RetryInfo and
        QuotaFailure details). `stream` requests also take a concurrency slot."""
        lease = Lease(tenant, quotas)
        if not quotas.limited:
            return lease
        now = self.clock()
        streams = quotas.concurrent_streams if stream else 0
        if streams:
            lease.lease_id = uuid.uuid4().hex
        expiry = now + min(lease_s or self.stream_lease_s, self.stream_lease_s)
        try:
            result = await self._admit(
                keys=self._keys(tenant),
                args=[
                    repr(now),
                    quotas.requests_per_minute,
                    bucket_capacity(quotas.requests_per_minute, self.burst_s),
                    quotas.tokens_per_minute,
                    bucket_capacity(quotas.tokens_per_minute, self.burst_s),
                    streams,
                    lease.lease_id,
                    repr(expiry),
                    self._ttl_s,
                ],
            )
        except BaseException as e:
            # NOTE: the script may have taken the stream slot before the call was cut
            # off (a cancel, a timeout): give it back in the background (never delay
            # the caller on a Redis that is down), or it stays taken for stream_lease_s.
            if lease.lease_id:
                self._background(self._drop_lease(tenant, lease.lease_id))
            if not isinstance(e, Exception):
                raise
            return self._unreachable(e, lease)
        if int(result[0]) == 1:
            return lease
        raise quota_exceeded(tenant, quotas, result[1], float(result[2]))

    async def release(self, lease: Lease) -> None:
        """Frees the stream slot and debits the tokens used. Never raises."""
        q = lease.quotas
        if not lease.lease_id and not (q.tokens_per_minute and lease.tokens > 0):
            return
        requests_key, tokens_key, streams_key = self._keys(lease.tenant)
        try:
            await self._release(
                keys=[tokens_key, streams_key],
                args=[repr(self.clock()), q.tokens_per_minute,
                      bucket_capacity(q.tokens_per_minute, self.burst_s),
                      max(0, int(lease.tokens)), lease.lease_id, self._ttl_s],
            )
        except Exception as e:  # noqa: BLE001 - a lease expires by itself; never fail a reply over it
            self._warn(f"could not release a quota lease of {lease.tenant!r} ({type(e).__name__})")

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop_lease(self, tenant: str, lease_id: str) -> None:
        try:
            await self._redis.zrem(self._keys(tenant)[2], lease_id)
        except Exception:  # noqa: BLE001 - the lease expires by itself
            pass

    @property
    def where(self) -> str:
        """The Redis URL without credentials (for messages and logs)."""
        return redact_url(self.url)

    def _unreachable(self, err: Exception, lease: Lease) -> Lease:
        if not self.fail_open:
            raise Unavailable(
                f"the quota store cannot be reached ({type(err).__name__}); retry shortly",
                reason="QUOTA_STORE_UNAVAILABLE", retry_after=1.0,
            ) from err
        self._warn(f"quota store {self.where} unreachable ({type(err).__name__}); "
                   "admitting without quotas")
        lease.lease_id = ""
        return lease

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            logger.warning(message)

    async def ping(self) -> None:
        await self._redis.ping()

    async def reset(self, tenant: str) -> None:
        """Forgets a tenant's counters (tests; tenant deletion)."""
        await self._redis.delete(*self._keys(tenant))

    async def close(self) -> None:
        await self._redis.aclose()


_QUOTA_FIELDS = {
    "requests": ("requests_per_minute", "requests per minute"),
    "tokens": ("tokens_per_minute", "tokens per minute"),
    "concurrency": ("concurrent_streams", "concurrent streams"),
}


def quota_exceeded(tenant: str, quotas: Quotas, quota: str, retry_after: float) -> ResourceExhausted:
    """The rejection: RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure."""
    field, words = _QUOTA_FIELDS[quota]
    limit = getattr(quotas, field)
    retry_after = max(0.001, retry_after)
    return ResourceExhausted(
        f"tenant {tenant!r} is over its quota of {limit} {words}; retry in {retry_after:.2f}s",
        reason="QUOTA_EXCEEDED",
        metadata={"quota": quota, "limit_field": field, "limit": str(limit)},
        retry_after=retry_after,
        quota_violations=[(f"tenant:{tenant}/{field}", f"limit {limit} {words}")],
    )
