"""Hostile use of the shared resources, through the real proxy, vLLM and Redis.

Each test reproduces an attack on the platform as it was (it fails without the fix
named in its docstring) and proves the limit that closes it:

- keyless health streams cannot hold replica capacity (the proxy answers `Watch`
  and caps keyless calls), and keyless calls never reach a replica;
- an oversized message is refused by gRPC before any handler buffers it;
- the engine's prefix cache is salted per tenant, read from vLLM's own count of
  cached prompt tokens (never from timing);
- engine parameters are checked as strictly as vLLM checks them;
- work is charged before it is done: a prompt refused after tokenizing, an Upsert's
  embedding tokens, and an Ask refused for a bad schema all cost the tenant;
- a new tenant gets the default quotas.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hybridserve.client import HybridServeClient
from hybridserve.exceptions import InvalidArgumentError, RateLimitError, from_rpc_error
from hybridserve.v1 import retrieval_pb2, retrieval_pb2_grpc

from .conftest import MAIN_APP, RAG_APP

pytestmark = pytest.mark.integration


def _tenant(platform, *, allow_base: bool = True, **quotas) -> tuple[str, str]:
    """A new tenant (with `quotas`, else the defaults) and a key of it."""
    tenant = f"hostile-{uuid.uuid4().hex[:6]}"
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.create_tenant(tenant, allow_base=allow_base, **quotas)
        return tenant, admin.create_key(tenant, name="k").secret


# -- the unauthenticated surface -------------------------------------------------------


def test_keyless_health_watchers_cannot_lock_tenants_out(platform):
    """Before: each keyless Watch held one of the replica's max_ongoing_requests for
    serve.health_watch_s, so a few hundred of them (ongoing + queue) made every
    tenant's Generate RESOURCE_EXHAUSTED. Now the proxy answers Watch (a short Check
    per poll) and serves at most serve.max_keyless_requests keyless calls at once."""
    cap = platform.main.serve.max_keyless_requests
    n = platform.main.serve.max_ongoing_requests + platform.main.serve.max_queued_requests + 8

    async def attack():
        async with grpc.aio.insecure_channel(platform.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            calls = [stub.Watch(health_pb2.HealthCheckRequest(),
                                metadata=[("application", MAIN_APP)]) for _ in range(n)]

            async def first(call):
                try:
                    async for msg in call:
                        return msg.status
                except grpc.aio.AioRpcError as e:
                    return from_rpc_error(e)

            outcomes = await asyncio.gather(*(first(c) for c in calls))
            # Every watcher that got in is still open: a tenant generates meanwhile.
            with HybridServeClient(platform.address, application=MAIN_APP,
                                   api_key=platform.admin_key) as c:
                text, _, final = c.generate("hello there", max_tokens=4, temperature=0.0)
            for call in calls:
                call.cancel()
            return outcomes, final

    outcomes, final = asyncio.run(attack())
    serving = [o for o in outcomes if o == health_pb2.HealthCheckResponse.SERVING]
    refused = [o for o in outcomes if not isinstance(o, int)]
    assert final.usage.completion_tokens == 4
    assert 1 <= len(serving) <= cap, (len(serving), cap)
    assert len(serving) + len(refused) == n
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert {e.reason for e in refused} == {"KEYLESS_LIMIT"} and refused[0].retry_after > 0


def test_keyless_calls_are_refused_at_the_proxy(platform):
    """A call without a key (or with a malformed one) is UNAUTHENTICATED at the
    proxy; a key with a valid form goes on to the replica, which checks it."""
    with grpc.insecure_channel(platform.address) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for md in ([], [("authorization", "Bearer not-a-key")]):
            with pytest.raises(grpc.RpcError) as e:
                stub.Search(retrieval_pb2.SearchRequest(tenant="t", query="q"),
                            metadata=[("application", "retrieval"), *md], timeout=30)
            err = from_rpc_error(e.value)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.reason in ("API_KEY_MISSING", "API_KEY_MALFORMED")
            # Serve names every request it routes (`request_id` in the trailers): the
            # refusal came from the proxy's guard, before any routing.
            trailers = dict(e.value.trailing_metadata() or ())
            assert "request_id" not in trailers, trailers


def test_an_oversized_message_is_refused_before_it_is_buffered(platform):
    """Before: Serve's proxy accepted messages up to 2 GiB and parsed and pickled each
    whole; a keyless client got INTERNAL after the proxy had held it. Now gRPC
    refuses anything above serve.max_message_bytes with RESOURCE_EXHAUSTED."""
    limit = platform.main.serve.max_message_bytes
    doc = retrieval_pb2.Document(id="big", text="x" * (limit + 1024))
    with grpc.insecure_channel(platform.address) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Upsert(retrieval_pb2.UpsertRequest(tenant="t", documents=[doc]),
                        metadata=[("application", "retrieval")], timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()


# -- the engine's prefix cache -----------------------------------------------------------


def test_the_prefix_cache_is_kept_apart_per_tenant(platform):
    """vLLM's own count of prompt tokens served from its prefix cache: a tenant's
    repeat hits its own blocks; another tenant's identical prompt hits none (before
    the per-tenant cache salt it hit them all, and its first token came ~6x sooner)."""
    _, key_a = _tenant(platform)
    _, key_b = _tenant(platform)
    prompt = " ".join(f"secret-{uuid.uuid4().hex[:4]}-{i}" for i in range(60))

    def cached(key: str) -> int:
        with HybridServeClient(platform.address, application=MAIN_APP, api_key=key) as c:
            _, _, final = c.generate(prompt, max_tokens=2, temperature=0.0)
        assert final.usage.prompt_tokens > 64
        return final.usage.cached_prompt_tokens

    assert cached(key_a) == 0       # fresh
    assert cached(key_a) > 0        # the same tenant's repeat: cached
    assert cached(key_b) == 0       # another tenant's identical prompt: not
    assert cached(key_b) > 0        # ...which now has its own


# -- engine parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("sampling, field", [
    ({"temperature": 1e30}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
])
def test_values_the_engine_refuses_are_invalid_argument_not_internal(platform, sampling, field):
    """Before: temperature 1e30 passed our checks and failed inside vLLM's
    SamplingParams as INTERNAL."""
    with HybridServeClient(platform.address, application=MAIN_APP,
                           api_key=platform.admin_key) as c:
        with pytest.raises(InvalidArgumentError) as e:
            c.generate("hello", max_tokens=2, **sampling)
    assert field in e.value.message


@pytest.mark.parametrize("schema", [
    '{"type": "string", "minLength": 5, "maxLength": 2}',   # valid JSON Schema, no grammar
    '{"type": "string", "pattern": "(?<=a)b"}',              # a regex the engine cannot compile
    '{"type": "array", "minItems": 100000000}',              # minutes of grammar building
])
def test_schemas_the_engine_cannot_use_are_invalid_argument(platform, schema):
    """Before: these passed jsonschema's check and failed inside vLLM (INTERNAL), or
    made its fallback grammar backend work for minutes on the replica's one
    preparation thread."""
    with HybridServeClient(platform.address, application=MAIN_APP,
                           api_key=platform.admin_key) as c:
        with pytest.raises(InvalidArgumentError) as e:
            c.generate("hello", max_tokens=2, json_schema=schema)
    assert "json_schema" in e.value.message


def test_seeds_the_engine_accepts_work(platform):
    with HybridServeClient(platform.address, application=MAIN_APP,
                           api_key=platform.admin_key) as c:
        for seed in (-1, -(2**63), 2**63 - 1):
            _, ids, _ = c.generate("hello", max_tokens=2, temperature=0.7, seed=seed)
            assert len(ids) == 2


# -- expensive work is charged ---------------------------------------------------------------


def test_a_prompt_refused_after_tokenizing_is_charged(platform):
    """Before: a prompt refused for the context window cost no tokens, so a tenant
    could make the replica tokenize without bound for free."""
    _, key = _tenant(platform, tokens_per_minute=600)  # a bucket of 100 tokens
    too_long = "word " * 1500  # ~1,500 tokens > max_model_len 1024, < max_prompt_chars
    with HybridServeClient(platform.address, application=MAIN_APP, api_key=key) as c:
        with pytest.raises(InvalidArgumentError, match="context window"):
            c.generate(too_long, max_tokens=2)
        with pytest.raises(RateLimitError) as e:
            c.generate("hello", max_tokens=2)
    assert e.value.metadata["quota"] == "tokens"


def test_an_upsert_is_charged_its_embedding_tokens(platform):
    """Before: Upsert cost one request whatever it embedded on the shared embedder."""
    _, key = _tenant(platform, tokens_per_minute=600)
    text = " ".join(f"fact number {i} about the launch window." for i in range(60))
    with HybridServeClient(platform.address, api_key=key) as c:
        assert c.upsert("", [{"id": "d1", "text": text}]).chunks_written > 1
        with pytest.raises(RateLimitError) as e:
            c.search("", "launch window")
    assert e.value.metadata["quota"] == "tokens"


def test_an_ask_with_an_invalid_schema_costs_a_request(platform):
    """Before: Ask validated its JSON schema (up to 64 KB) before admission, so
    invalid requests were free."""
    _, key = _tenant(platform, requests_per_minute=6)  # a bucket of one request
    with HybridServeClient(platform.address, application=RAG_APP, api_key=key) as c:
        with pytest.raises(InvalidArgumentError):
            c.ask("anything?", json_schema='{"type": 5}')
        with pytest.raises(RateLimitError):
            c.ask("anything?", json_schema='{"type": 5}')


def test_a_new_tenant_gets_the_default_quotas(platform):
    """Before: a tenant created without quotas was unlimited, and one created with
    one quota had no limit on the others."""
    tenant, _ = _tenant(platform)
    partial, _ = _tenant(platform, requests_per_minute=60)
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        q = admin.get_tenant(tenant).quotas
        p = admin.get_tenant(partial).quotas
    d = platform.main.tenancy.default_quotas
    assert (q.requests_per_minute, q.tokens_per_minute, q.concurrent_streams) == (
        d.requests_per_minute, d.tokens_per_minute, d.concurrent_streams) != (0, 0, 0)
    assert (p.requests_per_minute, p.tokens_per_minute, p.concurrent_streams) == (
        60, d.tokens_per_minute, d.concurrent_streams)
