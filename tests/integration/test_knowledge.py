"""The knowledge path end to end: gRPC -> Serve (retrieval, embedder, rerank) -> a real
weaviate-server. Each test works in tenants of its own."""

from __future__ import annotations

import re
import time
import uuid

import grpc
import pytest
from hybridserve.client import HybridServeClient

pytestmark = pytest.mark.integration

SECRET = f"QXSECRET{uuid.uuid4().hex[:12]}"


def _tenant(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def kc(platform):
    with HybridServeClient(platform.address) as c:
        yield c


def _chunks(kc, tenant) -> int:
    return next(t.chunks for t in kc.knowledge_stats() if t.tenant == tenant)


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


# -- tenancy --------------------------------------------------------------------


def test_tenants_are_created_explicitly_and_idempotently(kc):
    t = _tenant("tn")
    assert kc.create_tenant(t).created is True
    assert kc.create_tenant(t).created is False
    assert t in [x.id for x in kc.list_tenants()]
    # The control plane created its knowledge space in Weaviate too.
    assert _chunks(kc, t) == 0
    # A query never creates a tenant.
    ghost = _tenant("ghost")
    with pytest.raises(grpc.RpcError) as e:
        kc.search(ghost, "anything")
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    assert "hybridserve admin tenants create" in e.value.details()
    assert ghost not in [x.tenant for x in kc.knowledge_stats()]
    kc.upsert(t, [{"id": "d", "text": "one chunk"}])
    reply = kc.delete_tenant(t)
    assert reply.deleted_chunks == 1
    assert t not in [x.id for x in kc.list_tenants()]
    assert t not in [x.tenant for x in kc.knowledge_stats()]
    with pytest.raises(grpc.RpcError) as e:
        kc.delete_tenant(t)
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_tenant_isolation(kc):
    a, b = _tenant("iso-a"), _tenant("iso-b")
    kc.create_tenant(a)
    kc.create_tenant(b)
    secret_docs = [
        {"id": f"secret-{i}", "title": "Quarterly numbers",
         "text": f"The launch code for project nightingale is {SECRET}. Revenue grew {i} percent.",
         "source": "a/secret.md", "metadata": {"owner": a, "tenant": a}}
        for i in range(3)
    ]
    kc.upsert(a, secret_docs)
    kc.upsert(b, [{"id": "public", "title": "Quarterly numbers",
                   "text": "Revenue and the launch code of project nightingale are public here.",
                   "source": "b/public.md", "metadata": {"owner": b}}])
    a_ids = [d["id"] for d in secret_docs]

    searches = [
        {"query": SECRET},
        {"query": SECRET, "alpha": 0.0},
        {"query": SECRET, "alpha": 1.0},
        {"query": "launch code project nightingale", "alpha": 0.5},
        {"query": "launch code", "filters": [("doc_id", "equal", [a_ids[0]])]},
        {"query": "launch code", "filters": [("doc_id", "any_of", a_ids)], "alpha": 0.0},
        {"query": SECRET, "filters": [("metadata.tenant", "equal", [a])]},
        {"query": SECRET, "filters": [("metadata.owner", "any_of", [a, b])], "alpha": 0.0},
        {"query": SECRET, "filters": [("source", "equal", ["a/secret.md"])]},
        {"query": SECRET, "filters": [("doc_id", "not_equal", ["public"])], "alpha": 1.0},
    ]
    # The same searches from A do find the secret, so the probe itself can fail.
    assert any(SECRET in h.text for h in kc.search(a, SECRET, alpha=0.0))
    assert any(SECRET in h.text for h in kc.search(a, "launch code", filters=[("doc_id", "any_of", a_ids)]))
    for s in searches:
        hits = kc.search(b, top_k=50, **s)
        leaked = [h for h in hits if SECRET in h.text or h.doc_id in a_ids]
        assert not leaked, f"tenant {b} saw {a}'s chunks with {s}"
    # A's tenant name smuggled into the tenant field itself is not a tenant name.
    for smuggled in (f"{b},{a}", f"{b} OR {a}", f"{b}/{a}", f"{b}\x00{a}", "*", f"{b}|{a}"):
        with pytest.raises(grpc.RpcError) as e:
            kc.search(smuggled, SECRET)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, smuggled
    # B cannot delete A's documents either.
    assert kc.delete_documents(b, a_ids) == 0
    assert _chunks(kc, a) == 3


# -- ingestion ------------------------------------------------------------------


def _text_with_chunks(chunks: int, cfg) -> str:
    """A text the server cuts into exactly `chunks` chunks (same tokenizer and settings)."""
    from hybridserve.retrieval.chunking import chunk_text
    from hybridserve.embedding import load_tokenizer

    tok = load_tokenizer(None)
    for words in range(1, 2000):
        text = " ".join(f"harbour{i}" for i in range(words))
        if len(chunk_text(tok, text, cfg.chunk_tokens, cfg.chunk_overlap)) == chunks:
            return text
    raise AssertionError(f"no text with {chunks} chunks")


def test_reingest_is_idempotent_and_a_shorter_version_removes_its_tail(kc, platform):
    t = _tenant("idem")
    kc.create_tenant(t)
    # chunk_tokens=64, overlap=16 in the test config: "wN" is 2-3 word pieces.
    long_text = " ".join(f"Sentence {i} talks about the harbour crane." for i in range(30))
    docs = [{"id": "guide", "text": long_text, "title": "Guide", "source": "guide.md"},
            {"id": "faq", "text": "Short FAQ entry.", "title": "FAQ", "source": "faq.md"}]
    first = kc.upsert(t, docs)
    assert not first.failures
    n = _chunks(kc, t)
    assert n == first.chunks_written and n >= 5
    again = kc.upsert(t, docs)
    assert (again.chunks_written, again.documents_unchanged, again.documents_ok) == (0, 2, 2)
    assert _chunks(kc, t) == n

    # Exactly 5 chunks, then a version with exactly 2.
    five = _text_with_chunks(5, platform.main.retrieval)
    two = _text_with_chunks(2, platform.main.retrieval)
    r5 = kc.upsert(t, [{"id": "shrinks", "text": five}])
    assert r5.chunks_written == 5
    hits = kc.search(t, "harbour", top_k=50, filters=[("doc_id", "equal", ["shrinks"])], alpha=1.0)
    assert sorted({h.chunk_index for h in hits}) == [0, 1, 2, 3, 4]
    r2 = kc.upsert(t, [{"id": "shrinks", "text": two}])
    assert (r2.chunks_written, r2.chunks_removed) == (2, 3)
    hits = kc.search(t, "harbour", top_k=50, filters=[("doc_id", "equal", ["shrinks"])], alpha=1.0)
    assert sorted(h.chunk_index for h in hits) == [0, 1]
    assert _chunks(kc, t) == n + 2

    # Delete removes every chunk of the document and nothing else.
    assert kc.delete_documents(t, ["guide", "shrinks"]) == n - 1 + 2
    assert _chunks(kc, t) == 1
    assert not kc.search(t, "harbour crane", filters=[("doc_id", "any_of", ["guide", "shrinks"])])


def test_a_bad_batch_writes_nothing(kc, platform):
    t = _tenant("bad")
    kc.create_tenant(t)
    limit = platform.main.retrieval.max_document_bytes
    cases = {
        "empty text": [{"id": "ok", "text": "fine"}, {"id": "empty", "text": "   "}],
        "oversized": [{"id": "ok", "text": "fine"}, {"id": "big", "text": "x" * (limit + 1)}],
        "no id": [{"id": "ok", "text": "fine"}, {"id": "", "text": "text"}],
        "duplicate id": [{"id": "same", "text": "a"}, {"id": "same", "text": "b"}],
        "bad metadata key": [{"id": "ok", "text": "fine", "metadata": {"a b": "c"}}],
        "too many": [{"id": f"d{i}", "text": "t"} for i in range(
            platform.main.retrieval.max_documents_per_request + 1)],
        "none": [],
    }
    for name, docs in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            kc.upsert(t, docs)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, name
        if name == "oversized":
            assert f"the limit is {limit} bytes" in e.value.details()
    assert _chunks(kc, t) == 0


# -- search ---------------------------------------------------------------------


def test_hybrid_keyword_and_vector_modes(kc):
    t = _tenant("hyb")
    kc.create_tenant(t)
    docs = [
        {"id": "rare", "text": "Calibrate the flux coupler with a Zorblaxian torque wrench before launch."},
        {"id": "cats", "text": "Domestic felines enjoy sleeping in warm sunny spots for most of the afternoon."},
        {"id": "bank", "text": "The central bank raised interest rates to slow down inflation this quarter."},
        {"id": "calib", "text": "Calibrate the wrench and the coupler before every launch of the flux engine."},
    ]
    kc.upsert(t, docs)
    # alpha=0: the one document with the rare keyword ranks first.
    hits = kc.search(t, "Zorblaxian", alpha=0.0)
    assert hits[0].doc_id == "rare"
    assert hits[0].HasField("keyword_score") and not hits[0].HasField("vector_score")
    # alpha=1: a paraphrase that shares no word with its document finds it.
    query = "pet cats nap where it is bright and toasty after lunch"
    doc_words = set(re.findall(r"\w+", docs[1]["text"].lower()))
    assert not doc_words & set(re.findall(r"\w+", query.lower())), "the paraphrase must share no word"
    assert kc.search(t, query, alpha=0.0) == [] or kc.search(t, query, alpha=0.0)[0].doc_id != "cats"
    hits = kc.search(t, query, alpha=1.0)
    assert hits[0].doc_id == "cats"
    assert hits[0].HasField("vector_score") and not hits[0].HasField("keyword_score")
    # Hits carry what a citation needs.
    h = kc.search(t, "interest rates", top_k=1)[0]
    assert (h.doc_id, h.chunk_index) == ("bank", 0)
    assert h.chunk_id and h.text.startswith("The central bank") and h.ingested_at


def test_metadata_filters(kc):
    t = _tenant("flt")
    kc.create_tenant(t)
    kc.upsert(t, [
        {"id": f"d{i}", "text": f"Release notes for version {i} of the mobile app.",
         "source": f"notes/{i}.md", "metadata": {"lang": "en" if i % 2 else "de", "v": str(i)}}
        for i in range(6)
    ])
    ids = lambda hits: sorted(h.doc_id for h in hits)  # noqa: E731
    assert ids(kc.search(t, "release notes", filters=[("metadata.lang", "equal", ["de"])])) == ["d0", "d2", "d4"]
    assert ids(kc.search(t, "release notes", filters=[("metadata.lang", "not_equal", ["de"])])) == ["d1", "d3", "d5"]
    assert ids(kc.search(t, "release notes", filters=[("metadata.v", "any_of", ["1", "4"])])) == ["d1", "d4"]
    assert ids(kc.search(t, "release notes", filters=[
        ("metadata.lang", "equal", ["en"]), ("source", "not_equal", ["notes/3.md"])])) == ["d1", "d5"]


def test_search_bad_input(kc, platform):
    t = _tenant("bads")
    kc.create_tenant(t)
    max_k = platform.main.retrieval.max_top_k
    bad = [
        dict(query=""),
        dict(query="x", top_k=max_k + 1),
        dict(query="x", alpha=1.5),
        dict(query="x", alpha=-0.1),
        dict(query="x", filters=[("nope", "equal", ["a"])]),
        dict(query="x", filters=[("doc_id", "bogus-op", ["a"])]),
        dict(query="x", filters=[("doc_id", "equal", ["a", "b"])]),
        dict(query="x", filters=[("doc_id", "any_of", [])]),
        dict(query="x", filters=[("metadata.bad key", "equal", ["a"])]),
    ]
    for kwargs in bad:
        with pytest.raises(grpc.RpcError) as e:
            kc.search(t, **kwargs)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert e.value.details(), kwargs
    for name in ("", "-lead", "a" * 65, "semi;colon", "sp ace"):
        with pytest.raises(grpc.RpcError) as e:
            kc.search(name, "x")
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, name
        with pytest.raises(grpc.RpcError) as e:
            kc.create_tenant(name)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, name
    ghost = _tenant("ghost")
    for call in (lambda: kc.search(ghost, "x"), lambda: kc.upsert(ghost, [{"id": "a", "text": "b"}]),
                 lambda: kc.delete_documents(ghost, ["a"])):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == grpc.StatusCode.NOT_FOUND


# -- Weaviate down, slow, restarted -------------------------------------------------


def test_weaviate_down_slow_and_restarted(kc, platform):
    """Graceful restart and crash keep every acknowledged chunk; down gives
    UNAVAILABLE and hung gives DEADLINE_EXCEEDED, both quickly."""
    w = platform.weaviate
    t = _tenant("dur")
    kc.create_tenant(t)
    docs = [{"id": f"doc{i}", "text": f"Durable fact number {i}: the lighthouse keeper logs the tide.",
             "title": f"Fact {i}"} for i in range(20)]
    assert not kc.upsert(t, docs).failures
    before = _chunks(kc, t)

    def search_ok():
        hits = kc.search(t, "lighthouse keeper tide", top_k=50)
        return sorted(h.doc_id for h in hits)

    expected = search_ok()
    assert len(expected) == 20

    # Hung: the process keeps its sockets but answers nothing.
    w.pause()
    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            kc.search(t, "lighthouse", timeout=60)
        took = time.monotonic() - start
    finally:
        w.resume()
    assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert "did not" in e.value.details() and "within" in e.value.details()
    assert took < 30, f"a hung Weaviate held the call for {took:.1f}s"

    # Down: connection refused.
    w.stop()
    try:
        with pytest.raises(grpc.RpcError) as e:
            kc.search(t, "lighthouse", timeout=60)
        assert _code(e) == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "Weaviate" in e.value.details()
        # A tenant's key gets the same answer, which never names the internal host,
        # ports or URL (the platform's log does).
        key = kc.create_key(t, name="down").secret
        with HybridServeClient(platform.address, api_key=key) as tc:
            with pytest.raises(grpc.RpcError) as e:
                tc.search("", "lighthouse", timeout=60)
        details = e.value.details()
        assert _code(e) == grpc.StatusCode.UNAVAILABLE and "Weaviate" in details, details
        for internal in (w.url, str(w.http_port), str(w.grpc_port), "127.0.0.1", "http://"):
            assert internal not in details, details
        with pytest.raises(grpc.RpcError) as e:
            kc.upsert(t, [{"id": "while-down", "text": "lost?"}], timeout=60)
        assert _code(e) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        w.start(timeout_s=180)
    assert _wait(lambda: search_ok() == expected)
    assert _chunks(kc, t) == before

    # Crash right after an acknowledged write: nothing acknowledged is lost.
    more = [{"id": f"late{i}", "text": f"Late fact {i}: the lighthouse lamp is cleaned at dawn."}
            for i in range(10)]
    assert kc.upsert(t, more).chunks_written == 10
    w.kill()
    w.start(timeout_s=180)
    assert _wait(lambda: _chunks(kc, t) == before + 10)
    assert len(kc.search(t, "lighthouse lamp cleaned at dawn", top_k=50, alpha=0.0)) == 30


def _wait(cond, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    return cond()


def _snake(value):
    """grpcurl's JSON with field names in proto spelling: builds of grpcurl differ on
    whether they print `chunksWritten` (JSON name) or `chunks_written`."""
    if isinstance(value, dict):
        return {re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), k): _snake(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_snake(v) for v in value]
    return value


def test_grpcurl_reaches_retrieval_and_rerank_by_reflection(kc, platform):
    """A foreign gRPC client (grpcurl, schema from server reflection) uses both services."""
    import json
    import subprocess

    from .test_generation_serve import _grpcurl

    grpcurl = _grpcurl()

    def call(app: str, method: str, body: dict, key: str) -> dict:
        out = subprocess.run(
            [grpcurl, "-plaintext", "-H", f"application: {app}", "-H", f"authorization: Bearer {key}",
             "-d", json.dumps(body), platform.address, method],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return _snake(json.loads(out.stdout))

    listed = subprocess.run([grpcurl, "-plaintext", platform.address, "list"],
                            capture_output=True, text=True, timeout=60)
    assert {"hybridserve.v1.RetrievalService", "hybridserve.v1.RerankService"} <= set(listed.stdout.split())
    t = _tenant("grpcurl")
    admin = platform.admin_key
    created = call("admin", "hybridserve.v1.AdminService/CreateTenant", {"id": t}, admin)
    assert created["created"] is True and created["tenant"]["id"] == t
    key = call("admin", "hybridserve.v1.AdminService/CreateKey", {"tenant": t, "name": "grpcurl"},
               admin)["secret"]
    # The tenant's own key: no tenant field needed.
    reply = call("retrieval", "hybridserve.v1.RetrievalService/Upsert", {
        "documents": [{"id": "d1", "text": "The ferry leaves the harbour at noon.",
                       "source": "timetable.md"}]}, key)
    assert reply.get("chunks_written") == 1, reply
    hits = call("retrieval", "hybridserve.v1.RetrievalService/Search",
                {"query": "when does the ferry leave", "topK": 3}, key)["hits"]
    assert hits[0]["doc_id"] == "d1" and hits[0]["source"] == "timetable.md"
    ranked = call("rerank", "hybridserve.v1.RerankService/Rerank",
                  {"query": "ferry departure", "passages": ["Bananas are yellow.", hits[0]["text"]]},
                  key)
    assert ranked["results"][0]["index"] == 1


def test_concurrent_searches_share_embedding_batches(kc):
    """The Embedder deployment batches callers (`@serve.batch`): concurrent vector
    searches form batches of more than one call, and answers stay the same."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    t = _tenant("emb")
    kc.create_tenant(t)
    kc.upsert(t, [{"id": f"d{i}", "text": f"Topic {i}: notes about item number {i}."} for i in range(8)])
    queries = [f"notes about item number {i}" for i in range(32)]
    alone = [h.doc_id for h in kc.search(t, queries[3], alpha=1.0)]
    embedder = serve.get_deployment_handle("Embedder", app_name="retrieval")
    before = embedder.stats.remote().result(timeout_s=30)["batch_sizes"]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda q: [h.doc_id for h in kc.search(t, q, alpha=1.0)], queries))
    after = embedder.stats.remote().result(timeout_s=30)["batch_sizes"]
    assert results[3] == alone
    new = {int(k): after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(k * n for k, n in new.items()) == len(queries)
    assert max(k for k, n in new.items() if n) > 1, f"no embedding batch of more than one call: {new}"


# -- a tenant deleted and created again while an upsert runs -------------------------


async def test_an_inflight_upsert_never_writes_into_a_recreated_tenant(weaviate, tmp_path):
    """The real Weaviate, the real SQLite tenancy store and the real control plane
    (AdminService, wired to the retrieval servicer as the platform wires it). An
    upsert with the tenant's key writes its first batches; then the tenant is
    deleted and created again under the same id; the upsert's later batches must
    not land in the new tenant."""
    import asyncio

    import numpy as np
    from hybridserve.config import HybridServeConfig
    from hybridserve.embedding import load_tokenizer
    from hybridserve.retrieval.servicer import RetrievalServicer
    from hybridserve.tenancy.admin import AdminService
    from hybridserve.tenancy.domain import Tenant
    from hybridserve.v1 import retrieval_pb2

    from tests.unit.fakes import FakeContext, tenancy_for

    cfg = HybridServeConfig(
        data_dir=tmp_path,
        weaviate={"url": weaviate.url, "grpc_port": weaviate.grpc_port,
                  "collection": f"Incarnation{uuid.uuid4().hex[:8]}"},
        retrieval={"chunk_tokens": 16, "chunk_overlap": 0, "write_batch_chunks": 4},
    )
    tenancy, admin_key = tenancy_for(cfg, service="retrieval")
    rng = np.random.default_rng(0)
    writes_done = asyncio.Event()
    embeds = 0
    admin: AdminService

    async def embed(texts):
        nonlocal embeds
        embeds += 1
        if embeds == 3:
            # Two batches are in Weaviate; now the operator deletes the tenant and a
            # new tenant is created under the same id.
            await asyncio.wait_for(writes_done.wait(), 60)
            await admin.delete_tenant(boss, tenant)
            await admin.create_tenant(boss, Tenant(tenant))
        v = rng.normal(size=(len(texts), 8)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    servicer = RetrievalServicer(cfg, embed, tokenizer=load_tokenizer(None), model_name="test",
                                 tenancy=tenancy)
    store_write, written = servicer.service.store.write, []

    async def counting_write(t, chunks, vectors):
        failures = await store_write(t, chunks, vectors)
        written.append(len(chunks))
        if len(written) == 2:
            writes_done.set()
        return failures

    servicer.service.store.write = counting_write
    admin = AdminService(tenancy.store, lambda _a: False, _Knowledge(servicer), settle_s=0)
    boss = await tenancy.authenticate_token(admin_key)
    tenant = _tenant("reborn")
    try:
        await admin.create_tenant(boss, Tenant(tenant))
        _, key = await admin.create_key(boss, tenant=tenant, name="writer")
        text = " ".join(f"Sentence {i} of the old tenant's private notes." for i in range(30))
        request = retrieval_pb2.UpsertRequest(
            documents=[retrieval_pb2.Document(id="old-notes", text=text)])
        ctx = FakeContext(key)
        await servicer.Upsert(request, ctx)
        assert embeds >= 3 and tenancy.store.tenant_exists(tenant)  # staged as described
        # The new tenant holds none of the old one's chunks ...
        assert await servicer.service.count(tenant) == 0
        # ... because nothing more was written once the tenant was gone.
        assert len(written) == 2
        assert ctx.code_name == "NOT_FOUND", ctx.details()
        assert "deleted while this upsert ran" in ctx.details()
    finally:
        await servicer.service.store.delete_tenant(tenant)
        await servicer.shutdown()


class _Knowledge:
    """The control plane's knowledge hooks, as app.py wires them (handle calls)."""

    def __init__(self, servicer):
        self.servicer = servicer

    async def create(self, tenant: str) -> None:
        await self.servicer.create_knowledge(tenant)

    async def delete(self, tenant: str) -> int:
        return await self.servicer.delete_knowledge(tenant)
