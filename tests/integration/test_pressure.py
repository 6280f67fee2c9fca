"""Generation under pressure, on the session's real Ray Serve + vLLM (tiny model):
evictions and reloads stay exact, mixed batches really batch, a burst for a new
adapter loads it once, cancels and deadlines show in vLLM's own state, and a
replica killed under load ends its streams UNAVAILABLE while the rest carry on.

Nothing here passes or fails on speed: where a deadline must fire, it is set
relative to a generation timed just before, and re-measured if the machine sped
up in between.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hybridserve.client import HybridServeClient
from hybridserve.exceptions import HybridServeAPIError
from testkit.tiny import build_lora_adapter

from .conftest import AFFINITY_APP, MAIN_APP, replica_actor, replica_stats, wait_replicas
# The same prompts and HF+PEFT reference as the generation tests (one definition).
from .test_generation_serve import LONG_PROMPT, MAX_TOKENS, PROMPTS, reference  # noqa: F401

pytestmark = pytest.mark.integration

def _run_jobs(platform, app: str, jobs):
    """jobs: (adapter name or '', prompt index) -> [(token ids, final)], all at once."""

    def one(job):
        name, p = job
        with HybridServeClient(platform.address, application=app) as c:
            _, ids, final = c.generate(PROMPTS[p], adapter=platform.ids[name] if name else "",
                                       max_tokens=MAX_TOKENS, temperature=0, timeout=300)
            return ids, final

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(one, jobs))


def _wrong(jobs, results, reference):
    return [(name or "(base)", PROMPTS[p]) for (name, p), (ids, _) in zip(jobs, results)
            if ids != reference[name][p]]


def _both_replicas(app: str = AFFINITY_APP) -> dict[str, dict]:
    """replica id -> stats, for both replicas of `app` (bounded retries: a handle call
    lands on either)."""
    out = {}
    for _ in range(50):
        s = replica_stats(app)
        out[s["replica_id"]] = s
        if len(out) == 2:
            return out
    raise AssertionError(f"only saw replicas {sorted(out)}")


def _apart(platform) -> tuple[str, str, str, str]:
    """(adapter X, its replica, adapter Y, its replica): two adapters resident on the two
    different replicas of the affinity app (one slot each)."""
    with HybridServeClient(platform.address, application=AFFINITY_APP) as c:
        for _ in range(10):
            for name in platform.assets.adapters:
                c.generate("hi", adapter=platform.ids[name], max_tokens=2)
            held = {rid: s["resident_adapters"] for rid, s in _both_replicas().items()}
            if all(len(v) == 1 for v in held.values()) and len({v[0] for v in held.values()}) == 2:
                (r1, (x,)), (r2, (y,)) = held.items()
                return x, r1, y, r2
    raise AssertionError(f"could not place two adapters apart: {held}")


def test_evictions_and_reloads_under_concurrency_stay_exact(platform, reference):
    """3 adapters and the base over 2 replicas with one adapter slot each: requests
    in flight force evictions and reloads; every output still equals HF+PEFT."""
    names = [*platform.assets.adapters]
    before = {rid: s["evictions"] for rid, s in _both_replicas().items()}
    jobs = [(name, i % len(PROMPTS)) for i, name in enumerate((names + [""]) * 4)]
    results = _run_jobs(platform, AFFINITY_APP, jobs)
    assert not _wrong(jobs, results, reference)
    # It really churned: more adapters than slots, and both replicas served.
    assert len({final.replica_id for _, final in results}) == 2
    evictions = 0
    for rid in {final.replica_id for _, final in results}:
        evictions += replica_stats(AFFINITY_APP, replica_id=rid)["evictions"] - before.get(rid, 0)
    assert evictions >= 1


def test_mixed_batches_are_really_batched(platform, reference):
    """The engine's own scheduler runs several requests, of several adapters, at once."""
    replica_stats(MAIN_APP)  # any replica: the main app has one
    from ray import serve

    serve.get_app_handle(MAIN_APP).stats.remote(reset_peak=True).result(timeout_s=60)
    names = ["", *platform.assets.adapters]
    jobs = [(name, i % len(PROMPTS)) for i, name in enumerate(names * 3)]
    results = _run_jobs(platform, MAIN_APP, jobs)
    assert not _wrong(jobs, results, reference)
    peak = replica_stats(MAIN_APP)["engine_running_max"]
    assert peak > 1, f"vLLM's scheduler never ran more than {peak} request at once"


def test_a_burst_for_a_new_adapter_loads_it_on_one_replica(platform, tmp_path):
    name = f"burst{uuid.uuid4().hex[:6]}"
    build_lora_adapter(platform.assets.base_dir, platform.assets.store / name, seed=77, rank=8,
                       base_model_name="tiny-llama")
    with HybridServeClient(platform.address, application=AFFINITY_APP) as admin:
        new_id = admin.register_adapter(name, name).adapter.id
    replicas = {rid: s["adapter_loads"] for rid, s in _both_replicas().items()}

    def one(_):
        with HybridServeClient(platform.address, application=AFFINITY_APP) as c:
            return c.generate("hello there", adapter=new_id, max_tokens=8, temperature=0)[2]

    with ThreadPoolExecutor(max_workers=8) as pool:
        finals = list(pool.map(one, range(8)))
    assert {f.adapter for f in finals} == {new_id}
    served = {f.replica_id for f in finals}
    assert len(served) == 1, f"the burst loaded {new_id} on {served}"
    loads = sum(replica_stats(AFFINITY_APP, replica_id=rid)["adapter_loads"] - n
                for rid, n in replicas.items())
    assert loads == 1


def _engine_state(client_id: str, settle_polls: int = 50) -> dict:
    """Stats of the main replica once vLLM no longer holds the client's request (or
    after a bounded wait)."""
    stats = {}
    for _ in range(settle_polls):
        stats = replica_stats(MAIN_APP)
        if client_id in stats["request_ids"] and stats["unfinished_requests"] == 0:
            return stats
        time.sleep(0.1)
    return stats


def _vllm_finished(stats: dict, request_id: str):
    return [f for f in stats["engine_finished"] if f[0] == request_id]


def test_a_cancel_is_an_abort_in_vllms_own_state(client):
    """After a cancel vLLM holds the request no more, and vLLM itself never reported
    it finished: it was aborted (vLLM reports every request that ends on its own)."""
    attempts = []
    for _ in range(5):
        client_id = f"cancel-{uuid.uuid4().hex[:8]}"
        stream = client.generate_stream(LONG_PROMPT, max_tokens=1000, temperature=0,
                                        client_request_id=client_id)
        assert next(stream).HasField("delta")
        stream.cancel()
        with pytest.raises(grpc.RpcError):
            for _ in stream:
                pass
        stats = _engine_state(client_id)
        request_id = stats["request_ids"][client_id]
        finished = _vllm_finished(stats, request_id)
        attempts.append((request_id, finished, stats["unfinished_requests"]))
        if not finished and stats["unfinished_requests"] == 0:
            return  # gone from vLLM, never finished there: aborted
        # It ran to its end before the cancel arrived (vLLM says so): try again.
        assert finished and finished[0][2] == 1000, attempts
    raise AssertionError(f"every request ran to its end before the cancel: {attempts}")


def test_a_deadline_relative_to_the_measured_run_aborts_in_vllm(client):
    """The deadline is a fifth of a 1000-token run timed just before, so the
    request cannot finish within it on any machine state; vLLM then holds it no
    more and never finished it."""
    for _ in range(3):
        start = time.monotonic()
        _, ids, _ = client.generate(LONG_PROMPT, max_tokens=1000, temperature=0, timeout=300)
        full = time.monotonic() - start
        assert len(ids) == 1000
        client_id = f"deadline-{uuid.uuid4().hex[:8]}"
        finished_early = False
        with pytest.raises(grpc.RpcError) as e:
            for msg in client.generate_stream(LONG_PROMPT, max_tokens=1000, temperature=0,
                                              client_request_id=client_id, timeout=full / 5):
                finished_early = finished_early or msg.HasField("final")
        if finished_early:
            continue  # the machine sped up fivefold: measure again
        assert e.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        stats = _engine_state(client_id)
        request_id = stats["request_ids"][client_id]
        assert stats["unfinished_requests"] == 0
        assert not _vllm_finished(stats, request_id), stats["engine_finished"][-3:]
        return
    raise AssertionError("three runs finished within a fifth of their own measured time")


def test_a_killed_replica_ends_its_streams_unavailable_and_the_rest_carry_on(platform):
    a, ra, b, rb = _apart(platform)
    actor, dead = replica_actor(AFFINITY_APP, a)
    outcomes: dict[str, list] = {a: [], b: []}
    streaming = threading.Barrier(5)  # 4 streams + this thread
    deadline_s = 120

    def stream(adapter: str):
        start = time.monotonic()
        with HybridServeClient(platform.address, application=AFFINITY_APP) as c:
            first = True
            try:
                for msg in c.generate_stream(LONG_PROMPT, adapter=adapter, max_tokens=1000,
                                             temperature=0, timeout=deadline_s):
                    if first:
                        first = False
                        streaming.wait(timeout=60)
                outcomes[adapter].append(("OK", time.monotonic() - start))
            except HybridServeAPIError as e:
                outcomes[adapter].append((e.status.name, time.monotonic() - start, e.reason,
                                          e.retry_after))

    threads = [threading.Thread(target=stream, args=(ad,)) for ad in (a, a, b, b)]
    try:
        for t in threads:
            t.start()
        streaming.wait(timeout=60)  # every stream has its first tokens
        import ray

        ray.kill(actor, no_restart=False)
        for t in threads:
            t.join(timeout=deadline_s + 30)
        assert not any(t.is_alive() for t in threads), "a stream hung"
        print("outcomes:", outcomes)
        # The dead replica's streams: UNAVAILABLE with a retry delay, or done before it died.
        killed = [o for o in outcomes[a] if o[0] != "OK"]
        assert killed, f"no stream of the killed replica saw it die: {outcomes}"
        for o in killed:
            assert o[0] == "UNAVAILABLE" and o[2] == "REPLICA_UNAVAILABLE" and o[3] > 0, o
            assert o[1] < deadline_s
        # The other replica's streams ran to their end.
        assert [o[0] for o in outcomes[b]] == ["OK", "OK"], outcomes
        # New requests succeed: b where it was, a on the surviving replica (or the new one).
        with HybridServeClient(platform.address, application=AFFINITY_APP) as c:
            assert c.generate("hi", adapter=b, max_tokens=2)[2].replica_id == rb
            assert c.generate("hi", adapter=a, max_tokens=2)[2].replica_id != dead
    finally:
        # Serve restarts the dead replica.
        wait_replicas(AFFINITY_APP, 2)
