"""Admission for the control plane: a per-key rate limit on every AdminService call,
and a gate that keeps refused calls from each costing an audit row.

Both live in the same Redis as the tenants' quotas, so every replica of the admin
app shares them (one Lua script per call, one round trip):

- **calls per minute per key**: a token bucket per API key (admin or tenant),
  refilled at `per_minute/60` per second and holding `burst_s` seconds' worth.
  Every AdminService RPC takes one, before anything else is looked at (a tenant
  key calling admin RPCs is refused with RESOURCE_EXHAUSTED + RetryInfo once its
  bucket is empty, not with one PERMISSION_DENIED and one audit row per call).
- **refused-call audit gate**: for each (key, outcome), at most one audit row per
  `window_s`; the refusals in between are counted, and the count is written into
  the key's next logged refusal ("N more refused since ..."). So a key flooding
  the control plane costs at most one row per outcome per window, however fast it
  calls.

Time is the caller's clock (tests inject one). When Redis cannot be reached the
limit fails open or closed like the quotas (`tenancy.quota_fail_open`), and the
audit gate falls back to one per replica (in memory).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from hybridserve.errors import ResourceExhausted, Unavailable
from hybridserve.tenancy.quotas import connect, redact_url

logger = logging.getLogger(__name__)

# KEYS: the key's bucket. ARGV: now, per_minute, capacity, ttl.
# Returns {1} when admitted, or {0, retry_after_seconds (text)}.
_TAKE = """
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2]) / 60.0
local cap = tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local level, at = tonumber(v[1]), tonumber(v[2])
if level == nil then
  level, at = cap, now
elseif now > at then
  level, at = math.min(cap, level + (now - at) * rate), now
end
if level < 1 then
  return {0, tostring((1 - level) / rate)}
end
redis.call('HSET', KEYS[1], 'level', tostring(level - 1), 'at', tostring(at))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {1}
"""

# KEYS: the gate of one (key, outcome). ARGV: now, window_s, ttl.
# Returns {-1} when this refusal is only counted, or {n, since} when it is to be
# written: n refusals were counted (not written) since `since` (the last written one).
_GATE = """
local now = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'at', 'suppressed')
local at, n = tonumber(v[1]), tonumber(v[2]) or 0
if at ~= nil and now - at < tonumber(ARGV[2]) and now >= at then
  redis.call('HINCRBY', KEYS[1], 'suppressed', 1)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  return {-1, ''}
end
redis.call('HSET', KEYS[1], 'at', tostring(now), 'suppressed', '0')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {n, tostring(at or '')}
"""

#: How long an idle gate remembers its count of unwritten refusals.
_GATE_TTL_S = 7 * 86400
#: Gates a replica keeps in memory while Redis is unreachable.
_LOCAL_GATES = 10_000


@dataclass(frozen=True)
class AuditTicket:
    """A refusal that is to be written: `suppressed` earlier ones were counted, not
    written, since `since` (epoch seconds; None: none before)."""

    suppressed: int
    since: float | None


class AdminLimits:
    """Per-key call limits and the refused-call audit gate of the control plane.

    Args:
        url: the quotas' Redis (`redis://...` or `unix:///...`).
        admin_per_minute: calls per minute of one admin key (0: no limit).
        tenant_per_minute: calls per minute of one tenant key (0: no limit).
        burst_s: bucket size in seconds of the rate.
        window_s: at most one audit row per key and outcome per this many seconds
            for refused calls (0: every refusal is written).
        fail_open: Redis unreachable: admit (true) or refuse with UNAVAILABLE.
        clock: epoch seconds; tests inject one.
    """

    def __init__(self, url: str, *, admin_per_minute: int, tenant_per_minute: int,
                 burst_s: float = 10.0, window_s: float = 60.0, fail_open: bool = True,
                 timeout_s: float = 2.0, clock=time.time):
        self.url = url
        self.admin_per_minute = admin_per_minute
        self.tenant_per_minute = tenant_per_minute
        self.burst_s = burst_s
        self.window_s = window_s
        self.fail_open = fail_open
        self.clock = clock
        self._redis = connect(url, timeout_s)
        self._take = self._redis.register_script(_TAKE)
        self._gate = self._redis.register_script(_GATE)
        self._local: OrderedDict[str, list[float]] = OrderedDict()  # key -> [at, suppressed]
        self._last_warning = float("-inf")

    @classmethod
    def from_config(cls, config, **kw) -> AdminLimits:
        t = config.tenancy
        return cls(config.tenancy_redis_url, admin_per_minute=t.admin_calls_per_minute,
                   tenant_per_minute=t.tenant_admin_calls_per_minute, burst_s=t.quota_burst_s,
                   window_s=t.audit_refusal_window_s, fail_open=t.quota_fail_open, **kw)

    def per_minute(self, kind: str) -> int:
        return self.admin_per_minute if kind == "admin" else self.tenant_per_minute

    def capacity(self, kind: str) -> int:
        return max(1, math.ceil(self.per_minute(kind) * self.burst_s / 60.0))

    async def take(self, kind: str, key_id: str) -> None:
        """Takes one call of the key's budget, or raises ResourceExhausted (with
        RetryInfo and QuotaFailure)."""
        per_minute = self.per_minute(kind)
        if per_minute <= 0:
            return
        try:
            result = await self._take(
                keys=[f"hybridserve:admin-calls:{{{key_id}}}"],
                args=[repr(self.clock()), per_minute, self.capacity(kind),
                      int(max(120.0, self.burst_s) + 60)],
            )
        except Exception as e:  # noqa: BLE001 - Redis down: the configured failure mode
            if not self.fail_open:
                raise Unavailable(
                    f"the quota store cannot be reached ({type(e).__name__}); retry shortly",
                    reason="QUOTA_STORE_UNAVAILABLE", retry_after=1.0,
                ) from None
            self._warn(f"quota store {redact_url(self.url)} unreachable ({type(e).__name__}); "
                       "control-plane calls admitted without a rate limit")
            return
        if int(result[0]) == 1:
            return
        retry_after = max(0.001, float(result[1]))
        field = "admin_calls_per_minute" if kind == "admin" else "tenant_admin_calls_per_minute"
        raise ResourceExhausted(
            f"{kind} key {key_id} is over the control plane's limit of {per_minute} calls per "
            f"minute per key (tenancy.{field}); retry in {retry_after:.2f}s",
            reason="QUOTA_EXCEEDED",
            metadata={"quota": "admin_calls", "limit_field": field, "limit": str(per_minute)},
            retry_after=retry_after,
            quota_violations=[(f"key:{key_id}/{field}", f"limit {per_minute} calls per minute")],
        )

    async def audit_ticket(self, actor: str, outcome: str) -> AuditTicket | None:
        """Whether this refusal of `actor` gets an audit row (a ticket) or is only
        counted (None). Never raises."""
        if self.window_s <= 0:
            return AuditTicket(0, None)
        gate = f"hybridserve:admin-refusals:{{{actor}}}:{outcome}"
        now = self.clock()
        try:
            n, since = await self._gate(keys=[gate], args=[repr(now), repr(self.window_s),
                                                           _GATE_TTL_S])
        except Exception as e:  # noqa: BLE001 - fall back to this replica's memory
            self._warn(f"quota store {redact_url(self.url)} unreachable ({type(e).__name__}); "
                       "refused control-plane calls are sampled per replica")
            return self._local_ticket(gate, now)
        if int(n) < 0:
            return None
        return AuditTicket(int(n), float(since) if since else None)

    def _local_ticket(self, gate: str, now: float) -> AuditTicket | None:
        entry = self._local.get(gate)
        if entry is not None and 0 <= now - entry[0] < self.window_s:
            entry[1] += 1
            return None
        ticket = AuditTicket(int(entry[1]) if entry else 0, entry[0] if entry else None)
        self._local[gate] = [now, 0]
        self._local.move_to_end(gate)
        while len(self._local) > _LOCAL_GATES:
            self._local.popitem(last=False)
        return ticket

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            logger.warning(message)

    async def reset(self, key_id: str) -> None:
        """Forgets a key's bucket (tests)."""
        await self._redis.delete(f"hybridserve:admin-calls:{{{key_id}}}")

    async def close(self) -> None:
        await self._redis.aclose()
