"""Knowledge path logic without Serve or Weaviate: chunking, validation, file
readers, and the upsert rules on an in-memory ChunkStore."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from hybridserve.config import HybridServeConfig
from hybridserve.errors import InvalidArgument
from hybridserve.retrieval.chunking import chunk_spans, chunk_text
from hybridserve.retrieval.documents import (
    Document,
    FieldFilter,
    chunk_id,
    validate_filters,
    validate_tenant,
)
from hybridserve.embedding import load_tokenizer
from hybridserve.retrieval.service import RetrievalService
from hybridserve.retrieval.sources import find_files, html_to_text, read_documents

from tests.unit.fakes import FakeChunkStore


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


# -- chunking -------------------------------------------------------------------


def test_chunks_are_token_windows_with_overlap_and_verbatim_text(tokenizer):
    text = " ".join(f"Sentence number {i} mentions the lighthouse." for i in range(40))
    spans = chunk_spans(tokenizer, text, 32, 8)
    chunks = [text[a:b] for a, b in spans]
    assert len(chunks) > 3
    for c in chunks:
        assert c in text  # verbatim slices
        assert len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= 32
    # Consecutive windows share 8 tokens: each chunk starts before the previous ends.
    for (a1, b1), (a2, _) in zip(spans, spans[1:]):
        assert a1 < a2 < b1
    assert spans[0][0] == 0 and spans[-1][1] == len(text.rstrip())


def test_short_and_blank_texts(tokenizer):
    assert chunk_text(tokenizer, "  hello  ", 32, 8) == ["hello"]
    assert chunk_text(tokenizer, "   \n ", 32, 8) == []
    with pytest.raises(ValueError):
        chunk_spans(tokenizer, "x", 8, 8)


# -- validation -----------------------------------------------------------------


def test_chunk_ids_depend_on_tenant_doc_and_index_only():
    assert chunk_id("a", "d", 0) == chunk_id("a", "d", 0)
    assert len({chunk_id("a", "d", 0), chunk_id("b", "d", 0), chunk_id("a", "e", 0),
                chunk_id("a", "d", 1)}) == 4
    # No ambiguity from separators inside ids.
    assert chunk_id("a", "b-c", 0) != chunk_id("a-b", "c", 0)


@pytest.mark.parametrize("name", ["a", "Acme-Corp_2", "x" * 64])
def test_valid_tenants(name):
    assert validate_tenant(name) == name


@pytest.mark.parametrize("name", ["", "-a", "_a", "x" * 65, "a b", "a,b", "a/b", "a\x00b", "*", "ä"])
def test_invalid_tenants(name):
    with pytest.raises(InvalidArgument):
        validate_tenant(name)


@pytest.mark.parametrize(
    "f",
    [
        FieldFilter("tenant", "equal", ("a",)),
        FieldFilter("text", "equal", ("a",)),
        FieldFilter("doc_id", "", ("a",)),
        FieldFilter("doc_id", "equal", ()),
        FieldFilter("doc_id", "equal", ("a", "b")),
        FieldFilter("doc_id", "any_of", ()),
        FieldFilter("doc_id", "any_of", tuple(str(i) for i in range(101))),
        FieldFilter("metadata.", "equal", ("a",)),
        FieldFilter("metadata.a b", "equal", ("a",)),
    ],
)
def test_invalid_filters(f):
    with pytest.raises(InvalidArgument):
        validate_filters([f])


# -- upsert rules on a fake store ----------------------------------------------------


class CountingEmbed:
    def __init__(self):
        self.calls = []

    async def __call__(self, texts):
        self.calls.append(list(texts))
        return np.ones((len(texts), 4), dtype=np.float32)


def _service(tokenizer, **retrieval):
    cfg = HybridServeConfig(retrieval={"chunk_tokens": 16, "chunk_overlap": 4,
                                       "write_batch_chunks": 3, **retrieval})
    store, embed = FakeChunkStore(), CountingEmbed()
    return RetrievalService(cfg, store, embed, tokenizer, "test-model"), store, embed


def _long(n: int) -> str:
    return " ".join(f"word{i}" for i in range(n))


def test_unchanged_documents_are_not_reembedded(tokenizer):
    svc, store, embed = _service(tokenizer)

    async def run():
        await svc.create_tenant("t")
        doc = Document("d", _long(40), "T", "s")
        first = await svc.upsert("t", [doc])
        calls = len(embed.calls)
        second = await svc.upsert("t", [doc])
        assert second.documents_unchanged == 1 and second.chunks_written == 0
        assert len(embed.calls) == calls
        # Any change to what is stored (here: the title) is a new version.
        third = await svc.upsert("t", [Document("d", _long(40), "T2", "s")])
        assert third.chunks_written == first.chunks_written
        assert await store.count("t") == first.chunks_written

    asyncio.run(run())


def test_chunk_zero_is_written_last_and_withheld_when_a_sibling_fails(tokenizer):
    svc, store, _ = _service(tokenizer)

    async def run():
        await svc.create_tenant("t")
        docs = [Document("a", _long(60)), Document("b", _long(60))]
        store.fail_chunks = {("a", 2)}
        result = await svc.upsert("t", docs)
        order = [pair for batch in store.writes for pair in batch]
        # Every chunk 0 comes after all non-zero chunks.
        first_zero = min(i for i, (_, idx) in enumerate(order) if idx == 0)
        assert all(idx == 0 for _, idx in order[first_zero:])
        failed = {(f.doc_id, f.chunk_index) for f in result.failures}
        assert failed == {("a", 2), ("a", 0)}
        assert result.documents_ok == 1
        # So the next ingest does not think "a" is current and writes it again.
        store.fail_chunks = set()
        retry = await svc.upsert("t", docs)
        assert retry.documents_unchanged == 1 and not retry.failures and retry.documents_ok == 2

    asyncio.run(run())


def test_shrinking_removes_the_tail_and_bad_batches_write_nothing(tokenizer):
    svc, store, _ = _service(tokenizer, max_document_bytes=1000, max_documents_per_request=3)

    async def run():
        await svc.create_tenant("t")
        big = await svc.upsert("t", [Document("d", _long(80))])
        small = await svc.upsert("t", [Document("d", _long(10))])
        assert small.chunks_removed == big.chunks_written - small.chunks_written
        assert await store.count("t") == small.chunks_written
        before = await store.count("t")
        for docs in ([Document("ok", "x"), Document("e", " ")],
                     [Document("ok", "x"), Document("big", "x" * 1001)],
                     [Document(str(i), "x") for i in range(4)],
                     [Document("same", "x"), Document("same", "y")]):
            with pytest.raises(InvalidArgument):
                await svc.upsert("t", docs)
        assert await store.count("t") == before
        # Callers authenticated the tenant: a tenant without a knowledge space yet
        # (created while retrieval was down, or by the tenants file) gets one on its
        # first write, and reads and deletes before that find nothing.
        assert await svc.search(svc.prepare_search("ghost", "b")) == []
        assert await svc.delete("ghost", ["a"]) == 0
        assert await svc.count("ghost") == 0
        assert (await svc.upsert("ghost", [Document("a", "b")])).chunks_written == 1
        assert await store.count("ghost") == 1

    asyncio.run(run())


def test_search_validation_and_keyword_only_skips_embedding(tokenizer):
    svc, store, embed = _service(tokenizer)

    async def run():
        await svc.create_tenant("t")
        await svc.upsert("t", [Document("d", "the lighthouse keeper")])
        n = len(embed.calls)
        hits = await svc.search(svc.prepare_search("t", "lighthouse", 5, 0.0))
        assert hits and len(embed.calls) == n
        await svc.search(svc.prepare_search("t", "lighthouse", 5, 0.5))
        assert len(embed.calls) == n + 1

    asyncio.run(run())
    for kwargs in (dict(query=""), dict(query="x", top_k=101), dict(query="x", alpha=float("nan")),
                   dict(query="x", alpha=2.0), dict(query="x" * 5000)):
        with pytest.raises(InvalidArgument):
            svc.prepare_search("t", **kwargs)
    q = svc.prepare_search("t", "x")
    assert (q.top_k, q.alpha) == (10, 0.5)


# -- file readers -------------------------------------------------------------------


def test_reads_txt_md_html_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("intro\n\n## Setup guide\n\nsteps")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Page &amp; title</title><style>p{}</style></head>"
        "<body><p>Hello <b>world</b></p><script>var x;</script><p>Bye</p></body></html>"
    )
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": "j1", "text": "one", "metadata": {"k": 1}}) + "\n\n"
        + json.dumps({"id": 2, "text": "two", "title": "Two", "source": "s"}) + "\n"
    )
    (tmp_path / ".hidden.txt").write_text("skip me")
    (tmp_path / "e.pdf").write_text("unsupported")
    files = find_files(tmp_path)
    assert [f.rel for f in files] == ["a.txt", "c.html", "d.jsonl", "sub/b.md"]
    docs = {d.id: d for f in files for d in read_documents(f)}
    assert docs["a.txt"].text == "plain text" and docs["a.txt"].title == "a"
    assert docs["sub/b.md"].title == "Setup guide"
    assert docs["c.html"].title == "Page & title"
    assert docs["c.html"].text.split() == ["Hello", "world", "Bye"]
    assert docs["j1"].metadata == {"k": "1"} and docs["j1"].source.endswith("d.jsonl#L1")
    assert (docs["2"].title, docs["2"].source) == ("Two", "s")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"id": "a"}), 'string "text"'),
        (json.dumps({"text": "a"}), '"id"'),
        (json.dumps({"id": "a", "text": "b", "metadata": [1]}), '"metadata"'),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"id": "ok", "text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(InvalidArgument) as e:
        list(read_documents(find_files(path)[0]))
    assert f"{path}:2" in e.value.message and message in e.value.message


def test_html_to_text_drops_scripts_and_keeps_blocks():
    title, text = html_to_text("<title>T</title><div>a</div><div>b<script>x()</script></div>")
    assert title == "T" and text.split() == ["a", "b"]


def test_concurrent_upserts_of_one_document_leave_one_whole_version(tokenizer):
    """Two callers upsert the same document at once, a long and a short version.
    Whichever lands last, the store holds exactly that version's chunks: no stale
    tail of the other one (each upsert reads the stored version, then writes)."""
    svc, store, _ = _service(tokenizer)
    writes = store.write

    async def slow_write(tenant, chunks, vectors):
        # The short version's one write is the slowest, so without care it lands
        # after the long version and leaves the long one's tail behind.
        await asyncio.sleep(0.2 if chunks[0].doc_chunks <= 2 else 0.01)
        return await writes(tenant, chunks, vectors)

    store.write = slow_write

    async def run():
        await svc.create_tenant("t")
        long_doc, short_doc = Document("d", _long(120)), Document("d", _long(10))  # 24, 2 chunks
        results = await asyncio.gather(svc.upsert("t", [long_doc]), svc.upsert("t", [short_doc]))
        assert not any(r.failures for r in results)
        stored = sorted(c.index for c, _ in store.tenants["t"].values())
        head = next(c for c, _ in store.tenants["t"].values() if c.index == 0)
        # Chunk 0 names the version, and the store holds exactly that version's chunks.
        assert stored == list(range(head.doc_chunks)), stored
        assert len(svc._documents) == 0  # no lock outlives its upsert

    asyncio.run(run())


def test_document_locks_serialise_one_key_only_and_survive_cancellation():
    from hybridserve.retrieval.service import _KeyedLocks

    locks = _KeyedLocks()
    order = []

    async def job(name, keys, pause):
        async with locks.hold(keys):
            order.append(f"{name}+")
            await asyncio.sleep(pause)
            order.append(f"{name}-")

    async def run():
        # b shares no key with a: it runs inside a's hold; c shares "x": it waits.
        await asyncio.gather(job("a", ["x", "y"], 0.05), job("b", ["z"], 0.01),
                             job("c", ["y", "x"], 0.01))
        assert order.index("b+") < order.index("a-") < order.index("c+")
        # A waiter cancelled while queued releases nothing it never held.
        holder = asyncio.create_task(job("d", ["x"], 0.05))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(job("e", ["x"], 0.01))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        assert "e+" not in order and len(locks) == 0
        await job("f", ["x"], 0)  # still usable

    asyncio.run(run())


# -- errors never show internal addresses ----------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections are refused


async def test_an_unreachable_weaviate_is_reported_without_its_address(caplog):
    """The real weaviate-client against ports nothing listens on: the error a client
    gets says the knowledge store is down, never where it is (host, ports, URL);
    the server's log names it."""
    from hybridserve.errors import DeadlineExceeded, Unavailable
    from hybridserve.retrieval.documents import SearchQuery
    from hybridserve.retrieval.store import WeaviateStore

    http_port, grpc_port = _closed_port(), _closed_port()
    cfg = HybridServeConfig(weaviate={"url": f"http://127.0.0.1:{http_port}",
                                      "grpc_port": grpc_port, "query_timeout_s": 2,
                                      "write_timeout_s": 2})
    store = WeaviateStore(cfg)
    calls = [lambda: store.require_tenant("acme"), lambda: store.count("acme"),
             lambda: store.search(SearchQuery("acme", "q", 3, 0.0, ()), None)]
    try:
        for call in calls:
            with caplog.at_level("WARNING", logger="hybridserve.retrieval.store"):
                with pytest.raises((Unavailable, DeadlineExceeded)) as e:
                    await call()
            message = e.value.message
            assert "Weaviate" in message
            for internal in ("127.0.0.1", str(http_port), str(grpc_port), "http://", "localhost"):
                assert internal not in message, message
            if isinstance(e.value, Unavailable):
                assert e.value.reason == "KNOWLEDGE_STORE_UNAVAILABLE" and e.value.retry_after
    finally:
        await store.close()
    # ... and the operator finds the address in the log.
    assert f"127.0.0.1:{http_port}" in caplog.text


def test_the_upsert_guard_runs_before_every_write_batch_and_stops_the_rest(tokenizer):
    """A tenant gone mid-upsert (the guard raises): no further batch is written."""
    from hybridserve.errors import NotFound

    svc, store, _ = _service(tokenizer)
    checks = []

    async def still_current():
        checks.append(len(store.writes))
        if len(store.writes) >= 2:
            raise NotFound("tenant 't' was deleted while this upsert ran")

    async def run():
        await svc.create_tenant("t")
        with pytest.raises(NotFound):
            await svc.upsert("t", [Document("d", _long(120), "T", "s")], still_current=still_current)

    asyncio.run(run())
    assert len(store.writes) == 2 and checks[:3] == [0, 0, 1]  # before any write, then per batch
