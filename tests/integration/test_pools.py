"""The base pool on real Serve + vLLM: one generation deployment whose first replica
runs with LoRA off. Through the unchanged gRPC API, requests that name no adapter
land on it and adapter requests on the LoRA replica, and both stay exact."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hybridserve.client import HybridServeClient
from testkit.tiny import hf_greedy

from .conftest import wait_replicas

pytestmark = pytest.mark.integration

APP = "pools"
PROMPTS = ["the quick brown fox", "once upon a time there was", "in the beginning"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def pools(platform, room_for_two_engines):
    from hybridserve.app import build_generation_app
    from ray import serve

    cfg = platform.main.model_copy(deep=True)
    cfg.generation.replicas = 2
    cfg.generation.base_pool_replicas = 1
    # The session's replicas hold every logical CPU of this 2-core machine.
    cfg.generation.cpus_per_replica = 0.01
    cfg.engine.max_loras, cfg.engine.max_cpu_loras = 1, 2
    cfg.engine.enforce_eager = True  # no torch.compile of the LoRA-off engine: fast start
    serve.run(build_generation_app(type(cfg).model_validate(cfg.model_dump())), name=APP,
              route_prefix=f"/{APP}")
    wait_replicas(APP, 2)
    yield cfg
    serve.delete(APP)


def _replicas(adapter: str) -> tuple[dict, dict]:
    """(stats of the replica a base call reaches, of the one an adapter call reaches).

    This driver's handle is new: until the replicas' first routing report reaches its
    router (every generation.routing_stats_period_s), it cannot tell the pool's replica
    from the other, and a base call may land on either. So a base call is repeated,
    for a bounded time, until it lands in the pool. (The requests through the proxy
    below are checked on their first try.)
    """
    from .conftest import replica_stats

    deadline = time.monotonic() + 30
    base = replica_stats(APP)
    while not base["base_only"] and time.monotonic() < deadline:
        time.sleep(0.5)
        base = replica_stats(APP)
    return base, replica_stats(APP, adapter)


def test_base_requests_go_to_the_base_pool_and_adapters_to_the_lora_pool(platform, pools):
    alpha = platform.ids["alpha"]
    with HybridServeClient(platform.address, application=APP) as c:
        c.generate("hi", adapter=alpha, max_tokens=2)  # a LoRA replica now holds it
    base_stats, lora_stats = _replicas(alpha)
    assert base_stats["base_only"] and not lora_stats["base_only"]
    base, lora = [base_stats["replica_id"]], [lora_stats["replica_id"]]
    ref_base = hf_greedy(platform.assets.base_dir, PROMPTS, MAX_TOKENS)
    ref_alpha = hf_greedy(platform.assets.base_dir, PROMPTS, MAX_TOKENS,
                          adapter_dir=platform.assets.adapters["alpha"])
    jobs = [("", i % 3) for i in range(6)] + [(alpha, i % 3) for i in range(6)]

    def one(job):
        adapter, p = job
        with HybridServeClient(platform.address, application=APP) as c:
            _, ids, final = c.generate(PROMPTS[p], adapter=adapter, max_tokens=MAX_TOKENS,
                                       temperature=0, timeout=300)
            return ids, final

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for (adapter, p), (ids, final) in zip(jobs, results):
        if adapter:
            assert final.replica_id == lora[0] and ids == ref_alpha[p]
        else:
            assert final.replica_id == base[0] and ids == ref_base[p]
    # The base replica's engine has LoRA off, and never loaded an adapter.
    base_after, lora_after = _replicas(alpha)
    assert base_after["replica_id"] == base[0] and base_after["adapter_loads"] == 0
    assert alpha in lora_after["resident_adapters"]
