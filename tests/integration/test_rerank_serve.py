"""RerankService over gRPC: ordering, errors, and Serve batching across callers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hybridserve.client import HybridServeClient

pytestmark = pytest.mark.integration

PASSAGES = [
    "The central bank raised interest rates to fight inflation.",
    "Tomato plants need deep watering two or three times a week.",
    "Water the soil around tomatoes early in the morning, not the leaves.",
    "A bicycle chain should be oiled every 300 kilometres.",
]


@pytest.fixture(scope="module")
def rc(platform):
    with HybridServeClient(platform.address) as c:
        yield c


def test_rerank_orders_by_relevance(rc):
    reply = rc.rerank("how should I water my tomato plants", PASSAGES)
    order = [r.index for r in reply.results]
    assert set(order[:2]) == {1, 2}
    assert [r.score for r in reply.results] == sorted((r.score for r in reply.results), reverse=True)
    assert reply.model == "bi-encoder:all-MiniLM-L6-v2"
    top = rc.rerank("how should I water my tomato plants", PASSAGES, top_n=1)
    assert [r.index for r in top.results] == order[:1]


def test_rerank_bad_input(rc, platform):
    limit = platform.main.rerank.max_passages
    for kwargs in (dict(query="", passages=["a"]), dict(query="q", passages=[]),
                   dict(query="q", passages=["a"] * (limit + 1)), dict(query="q", passages=["a"], top_n=2)):
        with pytest.raises(grpc.RpcError) as e:
            rc.rerank(**kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert e.value.details()


def test_concurrent_calls_are_batched_and_match_single_calls(rc):
    from ray import serve

    queries = [f"question {i} about watering tomatoes or oiling chains" for i in range(24)]
    single = {q: [(r.index, round(r.score, 4)) for r in rc.rerank(q, PASSAGES).results] for q in queries[:4]}
    handle = serve.get_app_handle("rerank")
    before = handle.stats.remote().result(timeout_s=30)["batch_sizes"]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda q: rc.rerank(q, PASSAGES), queries))
    after = handle.stats.remote().result(timeout_s=30)["batch_sizes"]
    for q, reply in zip(queries, replies, strict=True):
        if q in single:
            assert [(r.index, round(r.score, 4)) for r in reply.results] == single[q]
    new = {int(k): after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(k * n for k, n in new.items()) == len(queries)
    assert max(k for k, n in new.items() if n) > 1, f"no batch of more than one call: {new}"
