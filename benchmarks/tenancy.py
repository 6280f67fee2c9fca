"""Tenancy benchmarks: what authentication, authorization and quotas add to a request,
and how accurately two replicas hold one shared rate limit.

  overhead : the same RPC (RerankService.Rerank, a trivial backend, called on the
             servicer in this process with a servicer context) with the real
             Tenancy (key parsed, digest compared, tenant context from the
             per-replica cache refreshed every auth_cache_ttl_s, one Redis
             round trip for the tenant's requests/min quota) vs a test build with
             authentication off; and a tenant without quotas (no Redis call). Interleaved in rounds, on SQLite and on a real
             PostgreSQL (temp dir, loopback), against a real redis-server.
             Reports p50/p99 of each side and of the added latency.
  rate     : two replica processes, each with its own quota client on the same
             Redis, offer 3x a tenant's requests/min for a fixed window; the
             admitted rate after the initial burst is compared with the limit.

Usage:
  .venv/bin/python benchmarks/tenancy.py [--calls 4000] [--rounds 8] [--rate-seconds 30]
  .venv/bin/python benchmarks/tenancy.py --smoke    # one short round (the test suite runs it)

Writes benchmarks/results/tenancy.json (tenancy-smoke.json with --smoke). Every
load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for testkit/

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class _LengthBackend:
    name = "length"

    def score(self, pairs):
        return np.array([len(p) for _, p in pairs], dtype=np.float32)


def _auth_off_tenancy(real):
    """The test build with authentication off: a fixed principal, no quota."""
    from hybridserve.tenancy.auth import Tenancy
    from hybridserve.tenancy.quotas import Lease

    class AuthOff(Tenancy):
        async def authenticate(self, grpc_context):
            return self._principal

        @asynccontextmanager
        async def admit(self, principal, *, stream=False, lease_s=None):
            yield Lease(principal.tenant_id or "", principal.tenant.quotas)

    off = AuthOff(real.store, None)
    return off


async def _overhead(store_url: str, redis_url: str, calls: int, rounds: int) -> dict:
    from hybridserve.config import HybridServeConfig
    from hybridserve.rerank.backends import RerankBackend
    from hybridserve.rerank.servicer import RerankServicer
    from hybridserve.tenancy.admin import AdminService
    from hybridserve.tenancy.auth import Tenancy
    from hybridserve.tenancy.domain import Principal, Tenant
    from hybridserve.tenancy.quotas import RedisQuotas
    from hybridserve.tenancy.store import TenancyStore
    from hybridserve.v1 import rerank_pb2

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.unit.fakes import FakeContext

    class Backend(_LengthBackend, RerankBackend):
        pass

    store = TenancyStore(store_url)
    store.migrate()
    admin = AdminService(store, lambda a: True)
    root = Principal("admin", "benchbenchben")
    tenant = f"bench-{int(time.time() * 1000)}"
    await admin.create_tenant(root, Tenant(tenant))
    # A quota that is never hit, so every request makes its Redis round trip.
    await admin.set_quotas(root, tenant, requests_per_minute=10**8)
    _, key = await admin.create_key(root, tenant=tenant, name="bench")
    # A tenant without quotas: authentication and authorization only, no Redis.
    await admin.create_tenant(root, Tenant(f"{tenant}-free"))
    _, free_key = await admin.create_key(root, tenant=f"{tenant}-free", name="bench")
    cfg = HybridServeConfig(data_dir=tempfile.mkdtemp(prefix="hs-bench-"))
    real = Tenancy(store, RedisQuotas(redis_url), cache_ttl_s=cfg.tenancy.auth_cache_ttl_s,
                   metrics_service="rerank")
    off = _auth_off_tenancy(real)
    off._principal = await real.authenticate_token(key)
    with_auth = RerankServicer(cfg, backend=Backend(), tenancy=real)
    sides = {
        "auth": (with_auth, key),
        "auth_no_quota": (with_auth, free_key),
        "off": (RerankServicer(cfg, backend=Backend(), tenancy=off), key),
    }
    request = rerank_pb2.RerankRequest(query="q", passages=["a", "bb"])
    lat: dict[str, list[float]] = {side: [] for side in sides}
    per_round = []
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        medians = {}
        for side in order:
            servicer, side_key = sides[side]
            got = []
            for _ in range(calls):
                ctx = FakeContext(side_key)
                t0 = time.perf_counter()
                await servicer.Rerank(request, ctx)
                got.append(time.perf_counter() - t0)
                assert ctx.code() is None, ctx.details()
            lat[side].extend(got)
            medians[side] = statistics.median(got)
        per_round.append((medians["auth"] - medians["off"]) * 1e3)
    await real.close()
    return {
        "store": store.dialect,
        "calls_per_side": calls * rounds,
        "auth_p50_ms": _pct(lat["auth"], 50) * 1e3, "auth_p99_ms": _pct(lat["auth"], 99) * 1e3,
        "off_p50_ms": _pct(lat["off"], 50) * 1e3, "off_p99_ms": _pct(lat["off"], 99) * 1e3,
        "added_p50_ms": (_pct(lat["auth"], 50) - _pct(lat["off"], 50)) * 1e3,
        "added_p99_ms": (_pct(lat["auth"], 99) - _pct(lat["off"], 99)) * 1e3,
        "auth_only_added_p50_ms": (_pct(lat["auth_no_quota"], 50) - _pct(lat["off"], 50)) * 1e3,
        "auth_only_added_p99_ms": (_pct(lat["auth_no_quota"], 99) - _pct(lat["off"], 99)) * 1e3,
        "added_p50_ms_per_round": per_round,
    }


def _replica(redis_url, tenant, rpm, offered_per_s, seconds, start_at, out):
    """One replica process: offers `offered_per_s` requests a second, evenly."""
    from hybridserve.errors import ResourceExhausted
    from hybridserve.tenancy.domain import Quotas
    from hybridserve.tenancy.quotas import RedisQuotas

    async def run():
        q = RedisQuotas(redis_url)
        quotas = Quotas(requests_per_minute=rpm)
        admitted = []
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        n = int(offered_per_s * seconds)
        for i in range(n):
            due = start_at + i / offered_per_s
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await q.acquire(tenant, quotas, stream=False)
                admitted.append(time.time() - start_at)
            except ResourceExhausted:
                pass
        await q.close()
        return admitted, n

    out.put(asyncio.run(run()))


def _rate(redis_url: str, rpm: int, seconds: float, burst_s: float = 10.0) -> dict:
    tenant = f"rate-{int(time.time() * 1000)}"
    per_replica = 3 * rpm / 60.0 / 2  # the two together offer 3x the limit
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [ctx.Process(target=_replica, args=(redis_url, tenant, rpm, per_replica, seconds,
                                                start_at, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(60)
    admitted = sorted(t for times, _ in results for t in times)
    offered = sum(n for _, n in results)
    burst = max(1, -(-rpm * burst_s // 60))
    # Once the bucket's initial burst is spent, the admitted rate must be the
    # limit: measured over the second half of the window.
    half = seconds / 2
    steady = [t for t in admitted if t >= half]
    steady_rate = len(steady) / (seconds - half) * 60
    return {
        "limit_per_min": rpm, "offered": offered, "offered_per_min": offered / seconds * 60,
        "admitted": len(admitted), "burst": int(burst), "seconds": seconds,
        "steady_admitted_per_min": steady_rate,
        "steady_error": abs(steady_rate - rpm) / rpm,
        "total_bound": rpm * seconds / 60 + burst,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per side per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--rate-seconds", type=float, default=30.0)
    p.add_argument("--rate-limit", type=int, default=600, help="requests/min of the rate test")
    p.add_argument("--smoke", action="store_true", help="one short round of each (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.calls, args.rounds, args.rate_seconds, args.rate_limit = 50, 2, 4.0, 60

    from hybridserve.tenancy.redis_server import RedisServer
    from testkit.postgres import PostgresServer

    work = Path(tempfile.mkdtemp(prefix="hs-tenancy-bench-"))
    redis = RedisServer(work / "redis")
    redis.start()
    pg = PostgresServer.start()
    try:
        results = {"overhead": [], "args": vars(args)}
        for url in (f"sqlite:///{work / 'tenancy.db'}", pg.url):
            row = asyncio.run(_overhead(url, redis.url, args.calls, args.rounds))
            print(json.dumps(row), flush=True)
            results["overhead"].append(row)
        results["rate"] = _rate(redis.url, args.rate_limit, args.rate_seconds)
        print(json.dumps(results["rate"]), flush=True)
    finally:
        pg.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    name = "tenancy-smoke.json" if args.smoke else "tenancy.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
