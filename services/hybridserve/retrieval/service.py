"""The retrieval service's domain logic, free of transport and of Serve.

Ingest: validate the whole batch -> skip documents whose stored version has
the same content hash -> cut the rest into token chunks -> embed step k+1
while step k is written to the store -> remove the chunks a shorter new
version no longer has. Search: validate -> embed the query (unless keyword
only) -> hybrid search in exactly one tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from hybridserve import observability as obs
from hybridserve.config import HybridServeConfig
from hybridserve.errors import InvalidArgument, NotFound
from hybridserve.retrieval.chunking import chunk_text_counted
from hybridserve.retrieval.documents import (
    MAX_DOC_ID_CHARS,
    MAX_QUERY_CHARS,
    Chunk,
    ChunkFailure,
    Document,
    FieldFilter,
    Hit,
    SearchQuery,
    UpsertResult,
    validate_documents,
    validate_filters,
    validate_tenant,
)
from hybridserve.retrieval.store import ChunkStore

logger = logging.getLogger(__name__)

#: Embeds a batch of texts: rows L2-normalised, float32.
EmbedFn = Callable[[list[str]], Awaitable[np.ndarray]]
#: Raises when the tenant an upsert was admitted for no longer exists as it was.
Guard = Callable[[], Awaitable[None]]


async def _always_current() -> None:
    return None


class _KeyedLocks:
    """One asyncio lock per key, alive only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, list] = {}  # key -> [lock, holders and waiters]

    @asynccontextmanager
    async def hold(self, keys: Sequence[Hashable]) -> AsyncIterator[None]:
        """Holds the locks of all `keys` (taken in sorted order: no deadlock)."""
        entries = []
        for key in sorted(set(keys)):
            entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
            entry[1] += 1
            entries.append((key, entry))
        held = []
        try:
            for _, entry in entries:
                await entry[0].acquire()
                held.append(entry)
            yield
        finally:
            for entry in held:
                entry[0].release()
            for key, entry in entries:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


@dataclass(frozen=True)
class _Plan:
    doc: Document
    sha: str
    previous_chunks: int  # 0 when the document is new
    texts: list[str]


class RetrievalService:
    """Ingestion and search for one platform.

    Args:
        config: platform config (retrieval limits and chunking).
        store: the chunk store (Weaviate in production).
        embed: async embedding function (a Serve handle call in production).
        tokenizer: the embedding model's fast tokenizer (chunks count its tokens).
        model_name: the embedding model's name; part of each document's version
            hash, so switching models re-embeds everything on the next ingest.
    """

    def __init__(
        self,
        config: HybridServeConfig,
        store: ChunkStore,
        embed: EmbedFn,
        tokenizer,
        model_name: str,
    ):
        self.config = config
        self.cfg = config.retrieval
        self.store = store
        self._embed = embed
        self.tokenizer = tokenizer
        self.model_name = model_name
        # NOTE: an upsert reads a document's stored version, then writes; two
        # concurrent upserts (or an upsert and a delete) of one document on this
        # replica are serialised so the last one leaves exactly its own version.
        self._documents = _KeyedLocks()

    # -- tenants ----------------------------------------------------------------

    # NOTE: callers have authenticated the tenant (it exists in the tenancy store).
    # Its Weaviate tenant is created by the control plane, or by the first write,
    # whichever comes first; until then it simply holds nothing.

    async def create_tenant(self, tenant: str) -> bool:
        return await self.store.create_tenant(validate_tenant(tenant))

    async def delete_tenant(self, tenant: str) -> int:
        """Deletes the tenant's chunks and its Weaviate tenant; the chunks removed."""
        try:
            chunks = await self.store.count(validate_tenant(tenant))
            await self.store.delete_tenant(tenant)
        except NotFound:
            return 0
        return chunks

    async def count(self, tenant: str) -> int:
        try:
            return await self.store.count(validate_tenant(tenant))
        except NotFound:
            return 0

    async def list_tenants(self) -> list[tuple[str, int]]:
        names = await self.store.list_tenants()
        counts = await asyncio.gather(*(self.count(n) for n in names))
        return list(zip(names, counts, strict=True))

    # -- ingestion --------------------------------------------------------------

    def version_hash(self, doc: Document) -> str:
        """What decides whether a stored document is current: its content, the
        chunking settings and the embedding model."""
        blob = json.dumps(
            [doc.content_sha256(), self.cfg.chunk_tokens, self.cfg.chunk_overlap, self.model_name]
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    async def upsert(self, tenant: str, docs: Sequence[Document], *,
                     still_current: Guard | None = None) -> UpsertResult:
        """Ingests `docs` into `tenant`.

        `still_current` (if given) is awaited before anything is written to the
        store and before every write batch; it raises when the tenant the request
        was admitted for is gone (deleted, or deleted and created again under the
        same id), so an in-flight upsert never writes into another incarnation.
        """
        validate_tenant(tenant)
        validate_documents(
            docs,
            max_documents=self.cfg.max_documents_per_request,
            max_document_bytes=self.cfg.max_document_bytes,
        )
        guard = still_current or _always_current
        await guard()
        await self.store.create_tenant(tenant)  # idempotent; usually already there
        async with self._documents.hold([(tenant, d.id) for d in docs]):
            return await self._upsert(tenant, docs, guard)

    async def _upsert(self, tenant: str, docs: Sequence[Document],
                      guard: Guard | None = None) -> UpsertResult:
        guard = guard or _always_current
        stored = await self.store.document_versions(tenant, [d.id for d in docs])
        result = UpsertResult()
        plans = []
        for doc in docs:
            sha = self.version_hash(doc)
            old_sha, old_chunks = stored.get(doc.id, ("", 0))
            if old_sha == sha:
                result.documents_unchanged += 1
                continue
            plans.append(_Plan(doc, sha, old_chunks, []))
        if not plans:
            result.documents_ok = result.documents_unchanged
            return result
        # Tokenizing is CPU work: keep it off the event loop.
        plans, result.embedded_tokens = await asyncio.to_thread(self._chunk_all, plans)
        chunks = [
            Chunk(tenant, p.doc.id, i, text, p.doc.title, p.doc.source, dict(p.doc.metadata),
                  p.sha, len(p.texts))
            for p in plans
            for i, text in enumerate(p.texts)
        ]
        unaccounted = 0
        try:
            return await self._ingest(tenant, plans, chunks, result, guard)
        except BaseException:
            # A step that raised (Weaviate down or hung, the embedder gone) leaves
            # chunks neither written nor reported per object: they failed too.
            unaccounted = len(chunks) - result.chunks_written - len(result.failures)
            raise
        finally:
            # What was written before a failure stays written, and is counted.
            obs.ingest_chunks(tenant, result.chunks_written, len(result.failures) + unaccounted)

    async def _ingest(
        self, tenant: str, plans: list[_Plan], chunks: list[Chunk], result: UpsertResult,
        guard: Guard,
    ) -> UpsertResult:
        failed_docs = await self._embed_and_write(tenant, chunks, result, guard)
        for p in plans:
            if p.doc.id in failed_docs:
                continue
            if p.previous_chunks > len(p.texts):
                await guard()
                result.chunks_removed += await self.store.remove_tail(tenant, p.doc.id, len(p.texts))
            result.documents_ok += 1
        result.documents_ok += result.documents_unchanged
        return result

    def _chunk_all(self, plans: list[_Plan]) -> tuple[list[_Plan], int]:
        """The plans with their chunk texts, and the tokens those hold in all."""
        out, tokens = [], 0
        for p in plans:
            texts, n = chunk_text_counted(self.tokenizer, p.doc.text, self.cfg.chunk_tokens,
                                          self.cfg.chunk_overlap)
            out.append(_Plan(p.doc, p.sha, p.previous_chunks, texts))
            tokens += n
        return out, tokens

    async def _embed_and_write(
        self, tenant: str, chunks: list[Chunk], result: UpsertResult,
        guard: Guard | None = None,
    ) -> set[str]:
        """Embeds and writes in steps; step k+1 is embedded while step k is written.

        NOTE: order matters. Chunk 0 of a document carries its version hash,
        which makes the next ingest skip it, so every document's chunk 0 is
        written after all its other chunks, and only if none of them failed.

        Returns the ids of documents that had a failed chunk.
        """
        ordered = [c for c in chunks if c.index > 0] + [c for c in chunks if c.index == 0]
        step = self.cfg.write_batch_chunks
        batches = [ordered[i : i + step] for i in range(0, len(ordered), step)]
        failed: set[str] = set()
        pending: asyncio.Task | None = None
        try:
            for batch in batches:
                vectors = await self._embed([c.text for c in batch])
                if pending is not None:
                    self._record(await pending, result, failed)
                    pending = None
                keep = [i for i, c in enumerate(batch) if not (c.index == 0 and c.doc_id in failed)]
                for i in sorted(set(range(len(batch))) - set(keep)):
                    c = batch[i]
                    result.failures.append(ChunkFailure(
                        c.doc_id, c.index, c.id,
                        "not written because another chunk of this document failed; "
                        "send the document again",
                    ))
                if keep:
                    pending = asyncio.ensure_future(
                        self._write(tenant, [batch[i] for i in keep], vectors[keep],
                                    guard or _always_current)
                    )
            if pending is not None:
                self._record(await pending, result, failed)
                pending = None
        finally:
            if pending is not None:
                if not pending.done():
                    pending.cancel()
                elif not pending.cancelled() and pending.exception() is None:
                    # A write that finished while a later step raised: it is in
                    # Weaviate, so it counts.
                    self._record(pending.result(), result, failed)
        return failed

    async def _write(self, tenant, batch: list[Chunk], vectors: np.ndarray, guard: Guard):
        # NOTE: right before the write, so no batch goes out once the tenant is gone.
        await guard()
        failures = await self.store.write(tenant, batch, vectors)
        return len(batch), failures

    @staticmethod
    def _record(outcome, result: UpsertResult, failed: set[str]) -> None:
        written, failures = outcome
        result.chunks_written += written - len(failures)
        result.failures.extend(failures)
        failed.update(f.doc_id for f in failures)

    async def delete(self, tenant: str, doc_ids: Sequence[str]) -> int:
        validate_tenant(tenant)
        if not doc_ids:
            raise InvalidArgument("no doc_ids: name at least one document to delete")
        for d in doc_ids:
            if not d or len(d) > MAX_DOC_ID_CHARS:
                raise InvalidArgument(f"invalid doc id {d[:80]!r}: 1-{MAX_DOC_ID_CHARS} characters")
        ids = list(dict.fromkeys(doc_ids))
        async with self._documents.hold([(tenant, d) for d in ids]):
            try:
                return await self.store.delete_documents(tenant, ids)
            except NotFound:  # no knowledge space yet: nothing to delete
                return 0

    # -- search -----------------------------------------------------------------

    def prepare_search(
        self,
        tenant: str,
        query: str,
        top_k: int = 0,
        alpha: float | None = None,
        filters: Sequence[FieldFilter] = (),
    ) -> SearchQuery:
        """Validates a search and fills in the defaults."""
        validate_tenant(tenant)
        if not query.strip():
            raise InvalidArgument("query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"query is longer than {MAX_QUERY_CHARS} characters")
        top_k = top_k or self.cfg.default_top_k
        if not 1 <= top_k <= self.cfg.max_top_k:
            raise InvalidArgument(
                f"top_k must be between 1 and {self.cfg.max_top_k} (retrieval.max_top_k), got {top_k}"
            )
        alpha = self.cfg.default_alpha if alpha is None else float(alpha)
        if math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
            raise InvalidArgument(
                f"alpha must be between 0 (keyword only) and 1 (vector only), got {alpha}"
            )
        validate_filters(filters)
        return SearchQuery(tenant, query, top_k, alpha, tuple(filters))

    def query_tokens(self, query: str) -> int:
        """Tokens the embedder reads for `query` (what a Search is charged)."""
        return len(self.tokenizer(query, add_special_tokens=True, verbose=False)["input_ids"])

    async def embed_texts(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embeds `texts` with the retrieval model, as documents are embedded: the
        vectors (as lists) and the tokens the model read (what the caller is charged)."""
        window = getattr(self.tokenizer, "model_max_length", 0)
        window = window if 0 < window < 1_000_000 else None  # "no limit" is a huge number

        def count() -> int:
            # The model reads at most its window of each text: what it costs.
            n = [self.query_tokens(t) for t in texts]
            return sum(min(x, window) if window else x for x in n)

        tokens = await asyncio.to_thread(count)  # a long batch: off the event loop
        vectors = await self._embed(list(texts)) if texts else []
        return [[float(x) for x in v] for v in vectors], tokens

    async def search(self, q: SearchQuery) -> list[Hit]:
        return (await self.search_timed(q))[0]

    async def search_timed(self, q: SearchQuery, vector=None) -> tuple[list[Hit], float, float]:
        """(hits, seconds embedding the query, seconds searching). A `vector` given
        by the caller (the RAG gateway embeds the query itself) is used as is."""
        embed_s = 0.0
        if vector is None and q.alpha > 0:
            t0 = time.perf_counter()
            with obs.stage_timer("embed", service="retrieval"):
                vector = (await self._embed([q.query]))[0]
            embed_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with obs.stage_timer("retrieve", service="retrieval"):
            try:
                hits = await self.store.search(q, vector)
            except NotFound:  # no knowledge space yet: nothing to find
                hits = []
        return hits, embed_s, time.perf_counter() - t0

    async def check_health(self) -> None:
        await self.store.check_health()
