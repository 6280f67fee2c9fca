"""The OpenAI-compatible HTTP API on the real platform, through the official `openai`
client (and curl once): Serve's HTTP proxy -> the `openai` app -> generation on vLLM
(the tiny model; SmolLM2 once), retrieval on a real weaviate-server, quotas in Redis.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass

import openai
import pytest
from hybridserve.client import HybridServeClient

from .conftest import MAIN_APP, OPENAI_SMOL_APP, RAG_SMOL_APP, replica_stats

pytestmark = pytest.mark.integration

PROMPT = "once upon a time there was"
SECRET = f"OAISECRET{uuid.uuid4().hex[:10]}"


@dataclass
class Tenants:
    a: str
    b: str
    key_a: str
    key_b: str


@pytest.fixture(scope="module")
def tenants(platform) -> Tenants:
    """A: alpha (default) and beta, no base model, a secret document. B: gamma and the
    base model, its own documents."""
    a, b = f"oai-a-{uuid.uuid4().hex[:6]}", f"oai-b-{uuid.uuid4().hex[:6]}"
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.create_tenant(a)
        admin.grant_adapter(a, platform.ids["alpha"], make_default=True)
        admin.grant_adapter(a, platform.ids["beta"])
        admin.create_tenant(b, allow_base=True)
        admin.grant_adapter(b, platform.ids["gamma"])
        key_a = admin.create_key(a, name="oai").secret
        key_b = admin.create_key(b, name="oai").secret
    with HybridServeClient(platform.address, api_key=key_a) as c:
        assert not c.upsert("", [
            {"id": "vault", "title": "Vault access", "source": "a/vault.md",
             "text": f"The vault door code is {SECRET}. Only the night manager knows it."},
            {"id": "refunds", "title": "Refunds", "source": "a/refunds.md",
             "text": "Refunds are paid within 14 days of the return reaching the warehouse."},
        ]).failures
    with HybridServeClient(platform.address, api_key=key_b) as c:
        assert not c.upsert("", [{"id": "hours", "title": "Opening hours", "source": "b/h.md",
                                  "text": "The shop opens at nine and closes at six."}]).failures
    return Tenants(a, b, key_a, key_b)


def _oai(platform, key, app="openai") -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.openai_url(app), api_key=key, max_retries=0,
                         timeout=300)


def test_models_list_shows_exactly_the_grants_and_a_new_grant_at_once(platform, tenants):
    ids = platform.ids
    a = _oai(platform, tenants.key_a)
    assert {m.id for m in a.models.list()} == {ids["alpha"], ids["beta"]}
    assert {m.id for m in _oai(platform, tenants.key_b).models.list()} == {
        platform.main.model.name, ids["gamma"]}
    assert all(m.parent == platform.main.model.name for m in a.models.list())
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.grant_adapter(tenants.a, ids["gamma"])
        try:
            seen = set()
            for _ in range(40):  # bounded: the tenancy cache's TTL (0.5 s) on every replica
                seen = {m.id for m in a.models.list()}
                if ids["gamma"] in seen:
                    break
                time.sleep(0.1)
            assert ids["gamma"] in seen
            assert a.models.retrieve(ids["gamma"]).id == ids["gamma"]
        finally:
            admin.revoke_adapter(tenants.a, ids["gamma"])


def test_chat_and_completions_equal_grpc_generate_by_id_name_and_default(platform, tenants):
    alpha = platform.ids["alpha"]
    a = _oai(platform, tenants.key_a)
    with HybridServeClient(platform.address, api_key=tenants.key_a) as g:
        text, ids, final = g.generate(PROMPT, adapter=alpha, max_tokens=24, temperature=0)
        chat_text, _, chat_final = g.generate(messages=[("user", PROMPT)], adapter=alpha,
                                              max_tokens=24, temperature=0)
    for model in (alpha, "alpha", "default"):
        done = a.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
        assert done.choices[0].text == text and done.model == alpha
        assert done.usage.completion_tokens == final.usage.completion_tokens == len(ids)
        assert done.usage.prompt_tokens == final.usage.prompt_tokens
    chunks = list(a.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        chat_final.usage.prompt_tokens, chat_final.usage.completion_tokens)
    whole = a.chat.completions.create(model=alpha, messages=[{"role": "user", "content": PROMPT}],
                                      max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == chat_text


def test_response_format_json_schema_gives_valid_json(platform, tenants):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
              "required": ["answer"], "additionalProperties": False}
    out = _oai(platform, tenants.key_a).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "a word"}], max_tokens=64,
        temperature=0, response_format={"type": "json_schema",
                                        "json_schema": {"name": "a", "schema": schema}})
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    assert set(json.loads(out.choices[0].message.content)) == {"answer"}


def test_rag_answers_with_citation_spans_from_the_tenants_own_sources(platform, tenants):
    # A schema that makes even the tiny model cite source 1, so that spans are there.
    cite = {"type": "string", "pattern": "^[a-z]{1,6} \\[1\\]$"}
    a = _oai(platform, tenants.key_a)
    out = a.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "How fast are refunds paid?"}],
        max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": cite}},
        extra_body={"rag": {"top_k": 4, "min_score": -1}})
    text = out.choices[0].message.content
    extra = out.model_extra
    sources = {s["doc_id"] for s in extra["sources"]}
    assert sources <= {"vault", "refunds"} and sources
    assert extra["citations"], text
    for c in extra["citations"]:
        assert text[c["start"]:c["end"]] == "[1]" and c["numbers"] == [1]
        assert c["sources"][0]["doc_id"] == extra["sources"][0]["doc_id"]
    assert extra["rag"]["cited"] == [1] and extra["rag"]["tenant"] == tenants.a
    assert extra["rag"]["timings"]["retrieve_ms"] > 0
    # Streamed: the sources in the first chunk, the citations in the last with a choice.
    chunks = list(a.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "How fast are refunds paid?"}],
        max_tokens=48, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": cite}},
        extra_body={"rag": {"top_k": 4, "min_score": -1}}))
    assert {s["doc_id"] for s in chunks[0].model_extra["sources"]} == sources
    assert chunks[-1].model_extra["citations"] == extra["citations"]


def test_b_never_reaches_a_s_documents_or_adapters(platform, tenants):
    b = _oai(platform, tenants.key_b)
    out = b.chat.completions.create(
        model=platform.main.model.name, max_tokens=16, temperature=0,
        messages=[{"role": "user", "content": "What is the vault door code?"}],
        extra_body={"rag": {"min_score": -1, "filters": [
            {"field": "doc_id", "op": "any_of", "values": ["vault", "refunds"]}]}})
    assert SECRET not in json.dumps(out.model_dump()) and out.model_extra["sources"] == []
    with pytest.raises(openai.PermissionDeniedError):
        b.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                  extra_body={"rag": {"tenant": tenants.a}})
    for model in (platform.ids["alpha"], "alpha"):
        with pytest.raises((openai.PermissionDeniedError, openai.NotFoundError)) as e:
            b.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert ("not granted" in str(e.value)) == (model == platform.ids["alpha"])
    assert platform.ids["alpha"] not in {m.id for m in b.models.list()}


def test_every_error_class_through_the_clients_typed_exceptions(platform, tenants):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.AuthenticationError):
        _oai(platform, "hst_" + "x" * 40).models.list()
    with pytest.raises(openai.PermissionDeniedError) as e:
        _oai(platform, tenants.key_a).chat.completions.create(model=platform.ids["gamma"],
                                                              messages=msgs)
    assert e.value.body["code"] == "adapter_not_granted"
    with pytest.raises(openai.NotFoundError):
        _oai(platform, tenants.key_a).chat.completions.create(model="gpt-5", messages=msgs)
    with pytest.raises(openai.BadRequestError) as e:
        _oai(platform, tenants.key_a).chat.completions.create(model="default", messages=msgs, n=2)
    assert e.value.body["param"] == "n"
    # No key at all, without the client (it always sends one): 401 with OpenAI's object.
    r = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}",
                        f"{platform.openai_url()}/models"], capture_output=True, text=True)
    body, status = r.stdout.rsplit("\n", 1)
    assert status == "401" and json.loads(body)["error"]["code"] == "api_key_missing"
    # A quota: one request a minute, the second is a 429 with Retry-After.
    tenant = f"oai-q-{uuid.uuid4().hex[:6]}"
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.create_tenant(tenant, allow_base=True)
        admin.set_quotas(tenant, requests_per_minute=1)
        key = admin.create_key(tenant, name="q").secret
    c = _oai(platform, key)
    c.completions.create(model="default", prompt="x", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="default", prompt="x", max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_closing_a_stream_aborts_the_engine_request_and_debits_the_tokens(platform, tenants):
    import redis

    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.set_quotas(tenants.b, tokens_per_minute=10**6)
    key = f"hybridserve:quota:{{{tenants.b}}}:tokens"
    r = redis.Redis(unix_socket_path=platform.main.tenancy_redis_url.removeprefix("unix://"))
    b = _oai(platform, tenants.key_b)
    try:
        for _ in range(5):  # an attempt can finish before the close lands (tiny model): retry
            r.delete(key)
            before = set(replica_stats(MAIN_APP)["aborted_request_ids"])
            stream = b.completions.create(model="default", prompt=PROMPT, max_tokens=1000,
                                          temperature=0, stream=True)
            for i, _chunk in enumerate(stream):
                if i >= 2:
                    break
            stream.close()  # closes the HTTP connection
            aborted, idle = set(), 0
            for _ in range(300):  # bounded: the abort is asynchronous, not timed
                stats = replica_stats(MAIN_APP)
                aborted = set(stats["aborted_request_ids"]) - before
                idle = idle + 1 if stats["unfinished_requests"] == 0 else 0
                if aborted or idle >= 20:
                    break
                time.sleep(0.1)
            if not aborted:
                continue
            capacity, level = 10**6 * 10 / 60, None
            for _ in range(100):  # bounded wait for the debit as the stream ends
                v = r.hget(key, "level")
                if v is not None and capacity - float(v) > 1:
                    level = float(v)
                    break
                time.sleep(0.05)
            assert level is not None
            assert 3 < capacity - level < 2000, capacity - level
            return
        pytest.fail("every attempt finished before its close reached the engine")
    finally:
        with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
            admin.set_quotas(tenants.b, tokens_per_minute=0)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(platform, tenants):
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": 8, "temperature": 0, "stream": True})
    r = subprocess.run(["curl", "-sN", "-H", f"Authorization: Bearer {tenants.key_a}",
                        "-H", "Content-Type: application/json", "-d", body,
                        f"{platform.openai_url()}/chat/completions"],
                       capture_output=True, text=True, timeout=120)
    events = [e for e in r.stdout.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), r.stdout[:500]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_embeddings_are_the_retrieval_models(platform, tenants):
    out = _oai(platform, tenants.key_a).embeddings.create(
        model="default", input=["refunds", "vault"])
    assert [len(d.embedding) for d in out.data] == [384, 384] and out.usage.prompt_tokens > 0
    norm = sum(x * x for x in out.data[0].embedding)
    assert abs(norm - 1.0) < 1e-3  # normalized, as retrieval stores them


def test_smollm2_rag_through_http_equals_ask_through_grpc(platform):
    """SmolLM2 through the HTTP API: the same RAG answer, sources and usage as Ask."""
    tenant = f"oai-smol-{uuid.uuid4().hex[:6]}"
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.create_tenant(tenant, allow_base=True)
        key = admin.create_key(tenant, name="s").secret
    question = "When are refunds paid?"
    with HybridServeClient(platform.address, api_key=key) as c:
        assert not c.upsert("", [{"id": "refunds", "title": "Refunds", "source": "r.md",
                                  "text": "Refunds are paid within 14 days of the return "
                                          "reaching the warehouse."}]).failures
        answer = c.ask(question, app=RAG_SMOL_APP, max_tokens=32, temperature=0, timeout=300)
    out = _oai(platform, key, OPENAI_SMOL_APP).chat.completions.create(
        model="default", messages=[{"role": "user", "content": question}], max_tokens=32,
        temperature=0, extra_body={"rag": {}})
    assert out.choices[0].message.content == answer.text and answer.text.strip()
    assert [s["doc_id"] for s in out.model_extra["sources"]] == [
        s.doc_id for s in answer.citations]
    assert out.usage.completion_tokens == answer.final.usage.completion_tokens


def test_the_http_port_routes_only_the_http_api_and_refuses_keyless_calls_itself(platform):
    """Serve's HTTP proxy answers keyless and oversized requests itself, and routes only
    to the API: the gRPC apps' prefixes get its 404 (without the guard such a request
    held a generation replica's slot, keyless)."""
    from hybridserve.tenancy import keys

    port = platform.main.serve.http_port
    forged = keys.generate("tenant").key  # well-formed, unknown

    def status(path, *headers):
        args = [a for h in headers for a in ("-H", h)]
        r = subprocess.run(["curl", "-s", "-m", "20", "-o", "/dev/null", "-w", "%{http_code}",
                            *args, f"http://127.0.0.1:{port}{path}"], capture_output=True,
                           text=True)
        return r.stdout

    auth = f"Authorization: Bearer {forged}"
    assert status("/generation") == status("/admin") == status("/v1/models") == "401"
    assert status("/generation", auth) == status("/rag", auth) == "404"
    assert status("/v1/models", auth) == "401"  # a key of the right form: the API checks it
    assert status("/v1/chat/completions", auth, "Content-Length: 999999999") == "413"
    assert status("/-/healthz") == "200"
