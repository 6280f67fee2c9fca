"""Isolation benchmarks: what one tenant (or a client without a key) can learn from,
or take away from, another through what they share.

  cache   : time to first token of a fresh prompt vs the same prompt sent again by
            the same tenant (its own prefix cache) vs the same prompt sent by
            another tenant right after (which must not hit the first tenant's
            cache), interleaved per round, each round a new random prompt. Reports
            TTFT p50 per case, the ratios, and the cached prompt tokens the engine
            reported for each case.
  keyless : a tenant's Generate latency idle vs while clients without a key hold
            health Watch streams and send oversized Upserts, interleaved in rounds,
            and the resident memory of Serve's proxy process(es) before, during
            and after.
  checks  : what the new admission checks cost per call, in process: the proxy
            guard's credential check and counting, and Generate's size and
            sampling checks (no engine).

Usage (against a running platform; an admin key creates the two tenants):
  .venv/bin/python benchmarks/isolation.py --address 127.0.0.1:50051 --api-key-file KEY \
      [--app generation] [--rounds 8] [--prompt-words 600]
  .venv/bin/python benchmarks/isolation.py --smoke --address ... --api-key-file ...

Writes benchmarks/results/isolation.json (isolation-smoke.json with --smoke). Every
load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _p50(values):
    return statistics.median(values) if values else float("nan")


def _tenant_key(admin, name: str) -> str:
    admin.create_tenant(name, allow_base=True, requests_per_minute=0, tokens_per_minute=0,
                        concurrent_streams=0)
    return admin.create_key(name, name="bench").secret


def _ttft(client, prompt: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    first = None
    final = None
    for msg in client.generate_stream(prompt, max_tokens=4, temperature=0.0):
        if first is None and msg.HasField("delta"):
            first = time.perf_counter() - t0
        if msg.HasField("final"):
            final = msg.final
    return (first if first is not None else time.perf_counter() - t0) * 1e3, \
        final.usage.cached_prompt_tokens


def bench_cache(address: str, admin_key: str, app: str, rounds: int, words: int) -> dict:
    """Fresh vs own repeat vs another tenant's identical prompt, per round."""
    from hybridserve.client import HybridServeClient

    tag = uuid.uuid4().hex[:6]
    with HybridServeClient(address, api_key=admin_key) as admin:
        key_a = _tenant_key(admin, f"iso-a-{tag}")
        key_b = _tenant_key(admin, f"iso-b-{tag}")
    cases = {"fresh": [], "same_tenant": [], "other_tenant": []}
    cached = {k: [] for k in cases}
    with HybridServeClient(address, api_key=key_a, application=app) as a, \
            HybridServeClient(address, api_key=key_b, application=app) as b:
        _ttft(a, "warm up the engine")
        for r in range(rounds):
            prompt = " ".join(f"w{uuid.uuid4().hex[:5]}" for _ in range(words))
            # The fresh prompt must come first; the order of the other two alternates.
            order = [("fresh", a)] + ([("same_tenant", a), ("other_tenant", b)] if r % 2 == 0
                                      else [("other_tenant", b), ("same_tenant", a)])
            for case, client in order:
                ms, hit = _ttft(client, prompt)
                cases[case].append(ms)
                cached[case].append(hit)
    fresh = _p50(cases["fresh"])
    return {
        "rounds": rounds, "prompt_words": words, "app": app,
        "ttft_p50_ms": {k: _p50(v) for k, v in cases.items()},
        "cached_prompt_tokens": {k: v for k, v in cached.items()},
        "fresh_over_other_tenant": fresh / _p50(cases["other_tenant"]),
        "fresh_over_same_tenant": fresh / _p50(cases["same_tenant"]),
    }


def _proxy_rss() -> int:
    """Resident bytes of the processes running Serve's proxy actor on this host."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("ProxyActor" in part for part in proc.info["cmdline"] or ()):
                total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _attack(address: str, app: str, watchers: int, message_bytes: int, stop, out) -> None:
    """The keyless attacker, in a process of its own (its CPU and GIL are not the
    measuring client's): holds `watchers` health Watch streams and sends oversized
    Upserts in a loop until `stop` is set; puts its outcome counts on `out`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from hybridserve.v1 import retrieval_pb2, retrieval_pb2_grpc

    counts = {"watch_refused": 0, "watch_open": 0, "oversized_refused": 0, "other": 0}

    async def run():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            calls = [stub.Watch(health_pb2.HealthCheckRequest(), metadata=[("application", app)])
                     for _ in range(watchers)]

            async def hold(call):
                try:
                    async for _ in call:
                        counts["watch_open"] += 1
                        return
                except grpc.aio.AioRpcError as e:
                    counts["watch_refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                           else "other"] += 1

            await asyncio.gather(*(hold(c) for c in calls))
            up = retrieval_pb2_grpc.RetrievalServiceStub(ch)
            big = retrieval_pb2.UpsertRequest(tenant="x", documents=[
                retrieval_pb2.Document(id="big", text="x" * message_bytes)])
            while not stop.is_set():
                try:
                    await up.Upsert(big, metadata=[("application", "retrieval")], timeout=30)
                except grpc.aio.AioRpcError as e:
                    counts["oversized_refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                           else "other"] += 1
            for c in calls:
                c.cancel()

    asyncio.run(run())
    out.put(counts)


def bench_keyless(address: str, admin_key: str, app: str, rounds: int, calls: int,
                  watchers: int, message_bytes: int) -> dict:
    """A tenant's Generate latency idle vs under a keyless attack (another process),
    and the proxy's RSS."""
    import multiprocessing

    from hybridserve.client import HybridServeClient

    tag = uuid.uuid4().hex[:6]
    with HybridServeClient(address, api_key=admin_key) as admin:
        key = _tenant_key(admin, f"iso-k-{tag}")
    ctx = multiprocessing.get_context("spawn")
    outcomes = {"watch_refused": 0, "watch_open": 0, "oversized_refused": 0, "other": 0}
    rss = {"before": _proxy_rss(), "peak": 0}
    idle, attacked = [], []
    with HybridServeClient(address, api_key=key, application=app) as c:
        c.generate("warm up", max_tokens=2, temperature=0.0)
        for r in range(rounds):
            for side in (("idle", "attacked") if r % 2 == 0 else ("attacked", "idle")):
                proc = stop = queue = None
                if side == "attacked":
                    stop, queue = ctx.Event(), ctx.Queue()
                    proc = ctx.Process(target=_attack, args=(address, app, watchers,
                                                             message_bytes, stop, queue))
                    proc.start()
                    time.sleep(3.0)  # the watchers are open, the upserts flowing
                out = idle if side == "idle" else attacked
                for _ in range(calls):
                    t0 = time.perf_counter()
                    c.generate("hello there, how are you?", max_tokens=8, temperature=0.0)
                    out.append((time.perf_counter() - t0) * 1e3)
                    if proc is not None:
                        rss["peak"] = max(rss["peak"], _proxy_rss())
                if proc is not None:
                    stop.set()
                    for k, v in queue.get(timeout=120).items():
                        outcomes[k] += v
                    proc.join(timeout=60)
    rss["after"] = _proxy_rss()
    return {
        "rounds": rounds, "calls_per_side": calls, "watchers": watchers,
        "oversized_bytes": message_bytes,
        "generate_p50_ms": {"idle": _p50(idle), "attacked": _p50(attacked)},
        "attacked_over_idle": _p50(attacked) / _p50(idle),
        "outcomes": outcomes,
        "proxy_rss_bytes": rss,
    }


def bench_checks(n: int) -> dict:
    """Per-call cost of the new checks, in process."""
    from hybridserve.config import HybridServeConfig
    from hybridserve.generation.service import GenerateInput, GenerationService, validate_sampling
    from hybridserve.proxy_guard import GuardLimits, ProxyGuard
    from hybridserve.tenancy import keys

    key = keys.generate("tenant").key

    class Ctx:
        def invocation_metadata(self):
            return [("application", "generation"), ("authorization", f"Bearer {key}")]

        def peer(self):
            return "ipv4:127.0.0.1:5000"

    guard, ctx = ProxyGuard(GuardLimits()), Ctx()
    t0 = time.perf_counter()
    for _ in range(n):
        _, keyless, peer = guard.enter(ctx, False)
        guard.exit(keyless, peer)
    guard_us = (time.perf_counter() - t0) / n * 1e6

    class _Engine:
        max_model_len = 2048

    svc = GenerationService.__new__(GenerationService)
    svc.config, svc.engine = HybridServeConfig(), _Engine()
    inp = GenerateInput(prompt="hello " * 500, temperature=0.7, top_p=0.9, stop=("\n\n",))
    t0 = time.perf_counter()
    for _ in range(n):
        svc.check_sizes(inp)
        validate_sampling(inp.temperature, inp.top_p, inp.stop, "", inp.seed)
    checks_us = (time.perf_counter() - t0) / n * 1e6
    return {"calls": n, "proxy_guard_us": guard_us, "generate_checks_us": checks_us}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the platform's gRPC address")
    p.add_argument("--api-key-file", required=True, help="an admin key (creates two tenants)")
    p.add_argument("--app", default="generation", help="the generation app to measure")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=600)
    p.add_argument("--calls", type=int, default=10, help="keyless: Generates per side and round")
    p.add_argument("--watchers", type=int, default=256, help="keyless: Watch streams opened")
    p.add_argument("--oversized-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--parts", default="cache,keyless,checks")
    p.add_argument("--smoke", action="store_true", help="one short round of each part")
    ns = p.parse_args(argv)
    if ns.smoke:
        ns.rounds, ns.prompt_words, ns.calls, ns.watchers = 1, 120, 2, 40
    from hybridserve.client import resolve_api_key

    admin_key = resolve_api_key(None, ns.api_key_file)
    parts = set(ns.parts.split(","))
    out: dict = {"smoke": ns.smoke}
    if "cache" in parts:
        out["cache"] = bench_cache(ns.address, admin_key, ns.app, ns.rounds, ns.prompt_words)
        print("cache", json.dumps(out["cache"]), flush=True)
    if "keyless" in parts:
        out["keyless"] = bench_keyless(ns.address, admin_key, ns.app, ns.rounds, ns.calls,
                                       ns.watchers, ns.oversized_bytes)
        print("keyless", json.dumps(out["keyless"]), flush=True)
    if "checks" in parts:
        out["checks"] = bench_checks(200 if ns.smoke else 20_000)
        print("checks", json.dumps(out["checks"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("isolation-smoke.json" if ns.smoke else "isolation.json")).write_text(
        json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
