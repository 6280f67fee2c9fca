"""The OpenAI-compatible API's routes over the real gateway, a real Tenancy (SQLite) and
the Ask pipeline with fake backends: shapes, errors, streaming, citations. The real
platform (Serve's HTTP proxy, vLLM, Weaviate) is tests/integration/test_openai.py."""

from __future__ import annotations

import json

import httpx
import pytest

from hybridserve.adapters import AdapterRecord
from hybridserve.config import HybridServeConfig
from hybridserve.errors import ResourceExhausted
from hybridserve.generation.engine import Delta
from hybridserve.generation.service import GenerationDone
from hybridserve.openai import convert
from hybridserve.openai.api import build_api
from hybridserve.rag.gateway import Gateway
from hybridserve.rag.service import RagService
from hybridserve.tenancy import keys
from hybridserve.tenancy.domain import Tenant
from hybridserve.tenancy.quotas import Lease

from .fakes import tenancy_for
from .test_rag import FakeReranker, FakeRetriever, _builder, _hit

ADAPTER = "tone@v2"
OTHER = "secret@v1"


def _record(adapter_id: str, at: str = "2026-01-01T00:00:00Z") -> AdapterRecord:
    name, version = adapter_id.split("@")
    return AdapterRecord(id=adapter_id, name=name, version=version, content_sha256="0" * 64,
                         rank=8, target_modules=("q_proj",), base_model="tiny", size_bytes=1,
                         source_path=name, registered_at=at, snapshot_dir="/x")


class Generator:
    """The generation handle: echoes a fixed answer, counts early closes."""

    def __init__(self, text="Refunds take 14 days [1]."):
        self.text = text
        self.calls = []
        self.closed_early = 0

    async def prefetch(self, adapter, timeout_s):
        pass

    async def generate(self, adapter, inp, tenant, timeout_s):
        self.calls.append((adapter, inp, tenant))
        words = self.text.split(" ")
        try:
            for i, w in enumerate(words):
                yield Delta(text=w + (" " if i < len(words) - 1 else ""), token_ids=(i,))
        except GeneratorExit:
            self.closed_early += 1
            raise
        yield GenerationDone("stop", 7, len(words), "replica-1", adapter, "rid",
                             first_token_s=0.001)


class RefusingQuotas:
    async def acquire(self, tenant, quotas, *, stream=False, lease_s=None):
        raise ResourceExhausted("tenant 'acme' is over its requests_per_minute quota",
                                reason="QUOTA_EXCEEDED", retry_after=2.5,
                                metadata={"quota": "requests"})

    async def release(self, lease: Lease):
        pass

    async def close(self):
        pass


@pytest.fixture
def env(tmp_path):
    cfg = HybridServeConfig(data_dir=tmp_path, model={"name": "tiny"},
                            openai={"max_body_bytes": 4096})
    tenancy, admin = tenancy_for(cfg, service="openai")
    store = tenancy.store
    secrets = {}
    for tid, grants, base in (("acme", (ADAPTER, "tone@v1"), False), ("rival", (OTHER,), True)):
        store.create_tenant(Tenant(tid, allow_base=base), actor="test")
        for a in grants:
            store.grant(tid, a, make_default=a == ADAPTER, actor="test")
        key = keys.generate("tenant")
        store.add_key(key_id=key.key_id, kind="tenant", tenant_id=tid, name="k",
                      digest=key.digest, expires_at=None, actor="test")
        secrets[tid] = key.key
    records = [_record("tone@v1", "2026-01-01T00:00:00Z"), _record(ADAPTER, "2026-02-01T00:00:00Z"),
               _record(OTHER)]
    gen = Generator()
    rag = RagService(cfg, FakeRetriever([_hit(1, "Refunds take 14 days.", 0.9, vector=0.9)]),
                     FakeReranker([0.9]), gen, _builder(600))
    gateway = Gateway(cfg, tenancy, rag, adapter_exists=lambda a: a in {r.id for r in records},
                      list_adapters=lambda: records,
                      embed=lambda texts, t: _embed(texts))
    api = build_api(gateway, cfg, embedding_model="mini")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api, root_path="/v1"),
                               base_url="http://t/v1")
    return cfg, client, secrets, admin, gen, tenancy


async def _embed(texts):
    return [[0.5, -1.0] for _ in texts], 3 * len(texts)


def _auth(key):
    return {"authorization": f"Bearer {key}"}


async def test_models_lists_exactly_the_tenants_grants(env):
    _, client, secrets, admin, *_ = env
    mine = (await client.get("/models", headers=_auth(secrets["acme"]))).json()
    assert mine["object"] == "list"
    assert {m["id"] for m in mine["data"]} == {"tone@v1", ADAPTER}  # no base: not allowed
    assert all(m["parent"] == "tiny" and m["owned_by"] == "acme" for m in mine["data"])
    theirs = (await client.get("/models", headers=_auth(secrets["rival"]))).json()
    assert {m["id"] for m in theirs["data"]} == {"tiny", OTHER}
    everything = (await client.get("/models", headers=_auth(admin))).json()
    assert {m["id"] for m in everything["data"]} == {"tiny", "tone@v1", ADAPTER, OTHER}
    one = await client.get(f"/models/{ADAPTER}", headers=_auth(secrets["acme"]))
    assert one.status_code == 200 and one.json()["id"] == ADAPTER


@pytest.mark.parametrize("headers,body,status,kind,code", [
    ({}, {"model": "default", "messages": [{"role": "user", "content": "hi"}]}, 401,
     "authentication_error", "api_key_missing"),
    ({"authorization": "Bearer hst_nope"}, {}, 401, "authentication_error", "api_key_malformed"),
    (None, {"model": OTHER, "messages": [{"role": "user", "content": "hi"}]}, 403,
     "permission_error", "adapter_not_granted"),
    (None, {"model": "secret", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "not_found_error", "model_not_found"),
    (None, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 403,
     "permission_error", "base_model_not_allowed"),
    (None, {"model": "default", "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "invalid_request_error", "unsupported_parameter"),
    (None, {"model": "default", "tools": [{"type": "function"}],
            "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error",
     "unsupported_parameter"),
    (None, {"model": "default", "temperature": 9, "messages": [{"role": "user", "content": "x"}]},
     400, "invalid_request_error", None),
    (None, {"model": "default", "messages": []}, 400, "invalid_request_error", None),
    (None, {"model": "default", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "invalid_request_error", None),
    (None, {"model": "default", "messages": [{"role": "user", "content": "x"}],
            "rag": {"tenant": "rival"}}, 403, "permission_error", "tenant_mismatch"),
])
async def test_errors_are_openai_error_objects_with_the_clients_status(
        env, headers, body, status, kind, code):
    _, client, secrets, *_ = env
    r = await client.post("/chat/completions", json=body,
                          headers=_auth(secrets["acme"]) if headers is None else headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["code"] == code and err["message"]
    if status == 400 and code is None and "temperature" in body:
        assert err["param"] == "temperature"


async def test_bad_bodies_are_400_and_big_ones_413_before_they_are_read(env):
    _, client, secrets, *_ = env
    h = _auth(secrets["acme"])
    r = await client.post("/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await client.post("/chat/completions", content=b'{"temperature": NaN}', headers=h)
    assert r.status_code == 400
    # A lone surrogate: valid JSON, but no text a tokenizer takes.
    r = await client.post("/chat/completions", headers=h, content=(
        b'{"model": "default", "messages": [{"role": "user", "content": "\\ud800"}]}'))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await client.post("/chat/completions", content=b"x" * 5000, headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # Without a key nothing is read: the same body is a 401.
    r = await client.post("/chat/completions", content=b"x" * 5000)
    assert r.status_code == 401
    r = await client.get("/nowhere", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"


async def test_a_quota_refusal_is_429_with_retry_after(env):
    cfg, client, secrets, _, _, tenancy = env
    tenancy.quotas = RefusingQuotas()
    await _limit(tenancy, "acme")
    r = await client.post("/chat/completions", headers=_auth(secrets["acme"]),
                          json={"model": "default", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3" and r.headers["retry-after-ms"] == "2500"
    assert r.json()["error"]["type"] == "rate_limit_error"
    # Admitted before the body is read: an over-quota caller's body is never parsed.
    r = await client.post("/chat/completions", headers=_auth(secrets["acme"]), content=b"{bad")
    assert r.status_code == 429


async def _limit(tenancy, tid):
    from hybridserve.tenancy.domain import Quotas

    tenancy.store.update_tenant(tid, actor="test", quotas=Quotas(requests_per_minute=1))
    tenancy.invalidate()


async def test_chat_by_name_resolves_the_newest_granted_version_and_streams_with_usage(env):
    _, client, secrets, _, gen, _ = env
    h = _auth(secrets["acme"])
    body = {"model": "tone", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "stop": "x"}
    whole = (await client.post("/chat/completions", json=body, headers=h)).json()
    assert whole["object"] == "chat.completion" and whole["model"] == ADAPTER
    assert whole["choices"][0]["message"] == {"role": "assistant",
                                             "content": "Refunds take 14 days [1]."}
    assert whole["usage"]["total_tokens"] == 7 + 5
    adapter, inp, tenant = gen.calls[-1]
    assert (adapter, tenant, inp.max_tokens, inp.stop, inp.messages) == (
        ADAPTER, "acme", 5, ("x",), [("user", "hi")])
    r = await client.post("/chat/completions", headers=h, json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


async def test_completions_and_default_and_json_schema(env):
    _, client, secrets, _, gen, _ = env
    h = _auth(secrets["acme"])
    r = await client.post("/completions", headers=h, json={"model": "default", "prompt": "Hi"})
    assert r.json()["object"] == "text_completion" and r.json()["model"] == ADAPTER
    assert gen.calls[-1][1].prompt == "Hi"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await client.post("/chat/completions", headers=h, json={
        "model": "default", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert json.loads(gen.calls[-1][1].json_schema) == schema


async def test_rag_answers_with_sources_citation_spans_and_timings(env):
    _, client, secrets, *_ = env
    h = _auth(secrets["acme"])
    body = {"model": "default", "messages": [{"role": "user", "content": "How long?"}],
            "rag": {"top_k": 3}}
    whole = (await client.post("/chat/completions", headers=h, json=body)).json()
    text = whole["choices"][0]["message"]["content"]
    [cite] = whole["citations"]
    assert text[cite["start"]:cite["end"]] == "[1]" and cite["numbers"] == [1]
    assert cite["sources"][0]["doc_id"] == "d1" == whole["sources"][0]["doc_id"]
    assert whole["rag"]["cited"] == [1] and whole["rag"]["tenant"] == "acme"
    assert {"auth_ms", "retrieve_ms", "prompt_ms", "total_ms"} <= set(whole["rag"]["timings"])
    r = await client.post("/chat/completions", headers=h, json={**body, "stream": True})
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n")
              if e.startswith("data: {")]
    assert chunks[0]["sources"][0]["doc_id"] == "d1"
    assert chunks[-1]["citations"] == whole["citations"]


async def test_embeddings_float_and_base64_and_limits(env):
    _, client, secrets, *_ = env
    h = _auth(secrets["acme"])
    r = (await client.post("/embeddings", headers=h,
                           json={"model": "mini", "input": ["a", "b"],
                                 "encoding_format": "float"})).json()
    assert [d["embedding"] for d in r["data"]] == [[0.5, -1.0], [0.5, -1.0]]
    assert r["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    import base64
    import struct

    b = (await client.post("/embeddings", headers=h, json={"model": "mini", "input": "a",
                                                           "encoding_format": "base64"})).json()
    assert struct.unpack("<2f", base64.b64decode(b["data"][0]["embedding"])) == (0.5, -1.0)
    r = await client.post("/embeddings", headers=h, json={"model": "gpt", "input": "a"})
    assert r.status_code == 404
    r = await client.post("/embeddings", headers=h, json={"model": "mini", "input": [1, 2]})
    assert r.status_code == 400
    r = await client.post("/embeddings", json={"model": "mini", "input": "a"})
    assert r.status_code == 401


def test_citation_spans_point_at_markers_of_known_sources():
    sources = [{"number": n, "doc_id": f"d{n}", "chunk_id": "c", "title": "", "source": "",
                "score": 1.0} for n in (1, 2)]
    text = "A [1]. B [2, 9]. C [7]. D [1;2]"
    spans = convert.citation_spans(text, sources)
    assert [text[s["start"]:s["end"]] for s in spans] == ["[1]", "[2, 9]", "[1;2]"]
    assert [s["numbers"] for s in spans] == [[1], [2], [1, 2]]
    assert spans[1]["sources"][0]["doc_id"] == "d2"


async def test_a_stream_whose_client_left_before_its_first_chunk_still_ends_the_generation(env):
    _, client, secrets, _, gen, _ = env
    api = client._transport.app
    body = json.dumps({"model": "default", "stream": True,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "root_path": "/v1", "query_string": b"", "http_version": "1.1", "scheme": "http",
             "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"authorization", f"Bearer {secrets['acme']}".encode()),
                         (b"content-type", b"application/json")]}
    messages = [{"type": "http.request", "body": body, "more_body": False},
                {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client is gone")

    with pytest.raises(BaseException):  # noqa: B017 - whatever the server makes of it
        await api(scope, receive, send)
    # The first token was generated before the response started: the generation that
    # produced it is closed (which aborts the engine request under Serve).
    assert gen.closed_early == 1
