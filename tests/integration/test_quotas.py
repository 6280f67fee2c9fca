"""Quotas against a real redis-server (Debian's package): requests, tokens and
concurrent streams per tenant, shared by every "replica" (each replica is its own
`RedisQuotas` client), with an injected clock, never sleeps."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from hybridserve.errors import ResourceExhausted, Unavailable
from hybridserve.tenancy.domain import Quotas
from hybridserve.tenancy.quotas import RedisQuotas
from hybridserve.tenancy.redis_server import RedisServer

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server():
    root = Path(tempfile.mkdtemp(prefix="hs-redis-"))
    server = RedisServer(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def replicas(redis_server, request):
    clock = Clock()
    made = [RedisQuotas(redis_server.url, burst_s=10, stream_lease_s=600, clock=clock)
            for _ in range(2)]
    tenant = f"q-{request.node.name[-40:]}".replace("[", "-").replace("]", "")
    await made[0].reset(tenant)
    yield made, clock, tenant
    for q in made:
        await q.close()


async def _admitted(q, tenant, quotas, n, stream=False) -> int:
    ok = 0
    for _ in range(n):
        try:
            await q.acquire(tenant, quotas, stream=stream)
            ok += 1
        except ResourceExhausted:
            pass
    return ok


async def test_requests_per_minute_burst_then_retry_after_then_refill(replicas):
    (a, b), clock, tenant = replicas
    quotas = Quotas(requests_per_minute=60)
    # The bucket holds 10 s worth (10 requests); both replicas draw from it.
    assert await _admitted(a, tenant, quotas, 6) + await _admitted(b, tenant, quotas, 6) == 10
    with pytest.raises(ResourceExhausted) as e:
        await b.acquire(tenant, quotas, stream=False)
    assert e.value.reason == "QUOTA_EXCEEDED" and e.value.metadata["quota"] == "requests"
    assert e.value.retry_after == pytest.approx(1.0)  # one request per second refills
    assert e.value.quota_violations[0][0] == f"tenant:{tenant}/requests_per_minute"
    clock.now += 0.5
    with pytest.raises(ResourceExhausted) as e:
        await a.acquire(tenant, quotas, stream=False)
    assert e.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    await a.acquire(tenant, quotas, stream=False)  # the promised retry works
    clock.now += 60  # a full window: the bucket is full again, never more
    assert await _admitted(b, tenant, quotas, 20) == 10


async def test_tokens_are_debited_with_real_usage(replicas):
    (a, b), clock, tenant = replicas
    quotas = Quotas(tokens_per_minute=600)  # 10 tokens/s, bucket of 100
    lease = await a.acquire(tenant, quotas, stream=True)
    lease.tokens = 150  # the request used more than the bucket held
    await a.release(lease)
    with pytest.raises(ResourceExhausted) as e:
        await b.acquire(tenant, quotas, stream=True)
    assert e.value.metadata["quota"] == "tokens"
    assert e.value.retry_after == pytest.approx(5.1)  # from -50 back above 0
    clock.now += 5.1
    await b.acquire(tenant, quotas, stream=True)


async def test_concurrent_streams_are_capped_across_replicas(replicas):
    (a, b), clock, tenant = replicas
    quotas = Quotas(concurrent_streams=3)
    results = await asyncio.gather(
        *(q.acquire(tenant, quotas, stream=True) for q in (a, b) * 10), return_exceptions=True)
    leases = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(leases) == 3 and len(refused) == 17
    assert all(r.metadata["quota"] == "concurrency" for r in refused)
    # A unary call takes no stream slot.
    await a.acquire(tenant, quotas, stream=False)
    await b.release(leases[0])
    await a.acquire(tenant, quotas, stream=True)
    # A replica that died holding slots: they expire with their lease.
    clock.now += 601
    assert await _admitted(b, tenant, quotas, 5, stream=True) == 3


async def test_an_unreachable_redis_fails_open_or_closed_as_configured(tmp_path):
    missing = f"unix://{tmp_path}/nothing.sock"
    quotas = Quotas(requests_per_minute=1)
    open_ = RedisQuotas(missing, fail_open=True, timeout_s=0.5)
    closed = RedisQuotas(missing, fail_open=False, timeout_s=0.5)
    try:
        for _ in range(3):
            await open_.acquire("t", quotas, stream=False)
        with pytest.raises(Unavailable) as e:
            await closed.acquire("t", quotas, stream=False)
        assert e.value.reason == "QUOTA_STORE_UNAVAILABLE" and e.value.retry_after
    finally:
        await open_.close()
        await closed.close()


async def test_tenants_without_quotas_never_touch_redis(tmp_path):
    q = RedisQuotas(f"unix://{tmp_path}/nothing.sock", fail_open=False, timeout_s=0.5)
    try:
        lease = await q.acquire("t", Quotas(), stream=True)
        lease.tokens = 10**6
        await q.release(lease)
    finally:
        await q.close()


async def test_a_replica_with_a_slow_clock_cannot_refill_twice(replicas):
    (a, b), clock, tenant = replicas
    quotas = Quotas(requests_per_minute=60)  # 1/s, bucket of 10
    assert await _admitted(a, tenant, quotas, 5) == 5  # level 5 at T
    slow = Clock(clock.now - 4)  # b's clock is 4 s behind
    b.clock = slow
    await b.acquire(tenant, quotas, stream=False)  # level 4; time stays at T
    b.clock = clock
    # Had b stored its own (earlier) time, a would now refill those 4 s again.
    assert await _admitted(a, tenant, quotas, 10) == 4


async def test_token_debt_outlives_the_default_expiry(replicas, redis_server):
    import redis as sync_redis

    (a, _), clock, tenant = replicas
    quotas = Quotas(tokens_per_minute=60)  # 1 token/s, bucket of 10
    lease = await a.acquire(tenant, quotas, stream=True)
    lease.tokens = 1000  # 990 below zero: 990 s to refill
    await a.release(lease)
    r = sync_redis.Redis(unix_socket_path=str(redis_server.socket_path))
    assert r.ttl(f"hybridserve:quota:{{{tenant}}}:tokens") >= 990
    with pytest.raises(ResourceExhausted) as e:
        await a.acquire(tenant, quotas, stream=True)
    assert e.value.retry_after == pytest.approx(991.0)
