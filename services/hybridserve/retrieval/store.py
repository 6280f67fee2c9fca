"""The chunk store protocol and its Weaviate backend.

`ChunkStore` is what the retrieval service needs from a vector database. Every
method takes exactly one tenant; the Weaviate backend maps it to one Weaviate
tenant of a multi-tenant collection (native multi-tenancy: each tenant's
objects live in their own shard, so no query or filter can reach another
tenant's chunks).

Errors are the platform's: `Unavailable` when Weaviate cannot be reached,
`DeadlineExceeded` when it does not answer in time, `NotFound` for an unknown
tenant. No call waits longer than its configured timeout.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from hybridserve import observability as obs
from hybridserve.config import HybridServeConfig
from hybridserve.errors import DeadlineExceeded, HybridServeError, NotFound, Unavailable
from hybridserve.retrieval.documents import (
    Chunk,
    ChunkFailure,
    FieldFilter,
    Hit,
    SearchQuery,
    metadata_terms,
)

logger = logging.getLogger(__name__)

#: How errors name Weaviate to clients: never its host, port or URL (those are
#: internal addresses; the server's log has them).
CLIENT_NAME = "the knowledge store (Weaviate)"


class ChunkStore(abc.ABC):
    """A tenant-scoped chunk store with hybrid (keyword + vector) search."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raises `Unavailable` when the store cannot serve."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def create_tenant(self, tenant: str) -> bool:
        """Creates the tenant; False when it already existed."""

    @abc.abstractmethod
    async def delete_tenant(self, tenant: str) -> None:
        """Deletes the tenant and its chunks; `NotFound` when unknown."""

    @abc.abstractmethod
    async def list_tenants(self) -> list[str]: ...

    @abc.abstractmethod
    async def require_tenant(self, tenant: str) -> None:
        """Raises `NotFound` unless the tenant exists."""

    @abc.abstractmethod
    async def count(self, tenant: str) -> int:
        """Chunks stored for the tenant."""

    @abc.abstractmethod
    async def document_versions(
        self, tenant: str, doc_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        """doc id -> (content sha256, chunk count) of the stored version, for known ids."""

    @abc.abstractmethod
    async def write(
        self, tenant: str, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]
    ) -> list[ChunkFailure]:
        """Inserts or overwrites chunks (by their stable id); returns the ones that failed."""

    @abc.abstractmethod
    async def remove_tail(self, tenant: str, doc_id: str, keep: int) -> int:
        """Deletes the document's chunks with index >= keep; returns how many."""

    @abc.abstractmethod
    async def delete_documents(self, tenant: str, doc_ids: Sequence[str]) -> int:
        """Deletes every chunk of these documents; returns how many."""

    @abc.abstractmethod
    async def search(self, query: SearchQuery, vector: Sequence[float] | None) -> list[Hit]:
        """Hybrid search; `vector` is None only for keyword-only search (alpha 0)."""


# -- Weaviate ------------------------------------------------------------------

#: How the properties of a chunk are stored. `doc_id`, `source` and the
#: metadata terms are exact-match fields (FIELD tokenization) for filters and
#: never take part in keyword scoring; `text` and `title` are what BM25 reads.
_KEYWORD_PROPERTIES = ["text", "title"]
_RETURN_PROPERTIES = [
    "text", "title", "doc_id", "chunk_index", "source", "metadata", "ingested_at",
]
_EXPLAIN_RE = re.compile(
    r"Result Set (?P<set>keyword|vector)[^:]*?:.*?original score (?P<score>-?[0-9.eE+-]+)"
)


def _tenant_missing(err: BaseException) -> bool:
    text = str(err).lower()
    return "tenant not found" in text or ("tenant" in text and "not found" in text)


class WeaviateStore(ChunkStore):
    """`ChunkStore` on one multi-tenant Weaviate collection.

    Connects lazily (and again after a failure), so a replica starts even while
    Weaviate is still starting or down; calls made meanwhile get `Unavailable`.
    """

    def __init__(self, config: HybridServeConfig):
        self._cfg = config.weaviate
        if self._cfg.url:
            u = urlparse(self._cfg.url)
            self.http_host, self.secure = u.hostname or "127.0.0.1", u.scheme == "https"
            self.http_port = u.port or (443 if self.secure else 80)
        else:
            self.http_host, self.http_port, self.secure = "127.0.0.1", self._cfg.http_port, False
        self.grpc_host = self._cfg.grpc_host or self.http_host
        self.collection_name = self._cfg.collection
        self._client = None
        self._collection = None
        self._lock = asyncio.Lock()
        self._last_warning = float("-inf")

    @property
    def where(self) -> str:
        """Where Weaviate is: for the server's log only, never for a client."""
        scheme = "https" if self.secure else "http"
        return f"Weaviate at {scheme}://{self.http_host}:{self.http_port} (gRPC {self.grpc_host}:{self._cfg.grpc_port})"

    def _unavailable(self, err: BaseException | str) -> Unavailable:
        # NOTE: the cause (host, port, the client library's text, which often holds
        # a URL) goes to the server's log; the caller, who may be a tenant, learns
        # only that the knowledge store is down and when to retry.
        hint = (
            "check weaviate.url / weaviate.grpc_port and that it is running"
            if self._cfg.url
            else "`hybridserve up` runs one on loopback; is it still running?"
        )
        self._log_failure(f"{self.where} is unavailable ({str(err)[:300]}); {hint}")
        return Unavailable(
            f"{CLIENT_NAME} is unavailable right now; retry shortly (the platform's log "
            "names the cause)", reason="KNOWLEDGE_STORE_UNAVAILABLE", retry_after=1.0,
        )

    def _too_slow(self, what: str, timeout_s: float, setting: str = "") -> DeadlineExceeded:
        self._log_failure(f"{self.where} did not finish {what} within {timeout_s:g}s")
        return DeadlineExceeded(
            f"{CLIENT_NAME} did not finish {what} within {timeout_s:g}s{setting}"
        )

    def _log_failure(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:  # at most one line per 10 s per replica
            self._last_warning = now
            logger.warning("%s", message)

    async def _connected(self):
        """The collection handle, connecting and creating the schema if needed."""
        if self._collection is not None:
            return self._collection
        async with self._lock:
            if self._collection is not None:
                return self._collection
            import weaviate
            from weaviate.classes.init import AdditionalConfig, Auth, Timeout

            client = weaviate.use_async_with_custom(
                http_host=self.http_host,
                http_port=self.http_port,
                http_secure=self.secure,
                grpc_host=self.grpc_host,
                grpc_port=self._cfg.grpc_port,
                grpc_secure=self.secure,
                auth_credentials=Auth.api_key(key) if (key := self._cfg.resolved_api_key) else None,
                additional_config=AdditionalConfig(
                    timeout=Timeout(
                        init=min(5, self._cfg.query_timeout_s),
                        query=self._cfg.query_timeout_s,
                        insert=self._cfg.write_timeout_s,
                    )
                ),
                skip_init_checks=True,
            )
            try:
                await asyncio.wait_for(client.connect(), self._cfg.query_timeout_s)
                collection = await asyncio.wait_for(
                    self._ensure_collection(client), self._cfg.write_timeout_s
                )
            except BaseException as e:
                await _quiet_close(client)
                if isinstance(e, HybridServeError | asyncio.CancelledError):
                    raise
                if isinstance(e, TimeoutError):
                    raise self._too_slow("connecting", self._cfg.query_timeout_s) from None
                raise self._unavailable(e) from None
            self._client, self._collection = client, collection
            return collection

    async def _ensure_collection(self, client):
        from weaviate.classes.config import Configure, DataType, Property, Tokenization

        name = self.collection_name
        if await client.collections.exists(name):
            collection = client.collections.use(name)
            cfg = await collection.config.get()
            if not cfg.multi_tenancy_config.enabled:
                raise Unavailable(
                    f"the Weaviate collection {name} exists without multi-tenancy; hybridserve "
                    "needs one Weaviate tenant per platform tenant: set weaviate.collection to "
                    "another name"
                )
            return collection

        def field(name: str, dtype=DataType.TEXT, **kw) -> Property:
            return Property(
                name=name, data_type=dtype, tokenization=Tokenization.FIELD,
                index_searchable=False, **kw,
            )

        try:
            await client.collections.create(
                name,
                description="hybridserve chunks: one Weaviate tenant per platform tenant",
                properties=[
                    Property(name="text", data_type=DataType.TEXT, tokenization=Tokenization.WORD),
                    Property(name="title", data_type=DataType.TEXT, tokenization=Tokenization.WORD),
                    field("doc_id"),
                    Property(name="chunk_index", data_type=DataType.INT),
                    field("source"),
                    Property(
                        name="metadata", data_type=DataType.TEXT, index_filterable=False,
                        index_searchable=False,
                    ),
                    field("metadata_kv", DataType.TEXT_ARRAY),
                    Property(name="ingested_at", data_type=DataType.DATE),
                    field("doc_sha256"),
                    Property(name="doc_chunks", data_type=DataType.INT),
                ],
                vector_config=Configure.Vectors.self_provided(),
                multi_tenancy_config=Configure.multi_tenancy(
                    enabled=True, auto_tenant_creation=False, auto_tenant_activation=True
                ),
            )
        except Exception as e:
            # Another replica may have created it first.
            if not await client.collections.exists(name):
                raise
            logger.info("collection %s was created concurrently (%s)", name, e)
        return client.collections.use(name)

    async def _run(
        self, op: str, what: str, make: Any, timeout_s: float, tenant: str = ""
    ) -> Any:
        """Runs `make(collection)` with a hard deadline and maps every failure.

        Every call to Weaviate goes through here, so this is where they are
        measured: hybridserve_weaviate_requests_total{op, outcome} and the
        latency histogram, by `op` (a fixed name per store operation). An
        unknown tenant counts as ok (Weaviate answered); any other failure
        (unreachable, too slow, an error answer) as error.

        NOTE: `make` builds the coroutine only once the connection exists, so a
        down Weaviate fails in `_connected` with a clear message.
        """
        start = time.perf_counter()
        ok: bool | None = False
        try:
            result = await self._call(what, make, timeout_s, tenant)
            ok = True
            return result
        except NotFound:
            ok = True
            raise
        except asyncio.CancelledError:
            ok = None  # the caller went away: says nothing about Weaviate
            raise
        finally:
            seconds = time.perf_counter() - start
            if ok is not None:
                obs.weaviate_call(op, seconds, ok)
            logger.debug("weaviate %s took %.1f ms", what, seconds * 1e3)

    async def _call(self, what: str, make: Any, timeout_s: float, tenant: str) -> Any:
        from weaviate.exceptions import (
            UnexpectedStatusCodeError,
            WeaviateBaseError,
        )

        try:
            collection = await self._connected()
            return await asyncio.wait_for(make(collection), timeout_s)
        except HybridServeError:
            raise
        except TimeoutError:
            # NOTE: the client's gRPC channel waits for a refused server to come
            # back, so "down" also ends here; a quick probe tells the two apart.
            refused = await self._refused()
            if refused:
                await self._reset()
                raise self._unavailable(refused) from None
            raise self._too_slow(
                what, timeout_s, " (weaviate.query_timeout_s / weaviate.write_timeout_s)"
            ) from None
        except WeaviateBaseError as e:
            if tenant and _tenant_missing(e):
                raise NotFound(
                    f"tenant {tenant!r} has no knowledge space in Weaviate; create the tenant "
                    f"with `hybridserve admin tenants create {tenant}`"
                ) from None
            text = str(e)
            if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
                raise self._too_slow(what, timeout_s) from None
            if isinstance(e, UnexpectedStatusCodeError) and 400 <= e.status_code < 500:
                # A request Weaviate refused: our bug, not the caller's; INTERNAL
                # (whose message names only the exception type), details logged.
                logger.warning("%s refused %s: %s", self.where, what, str(e)[:500])
                raise
            await self._reset()
            raise self._unavailable(e) from None
        except (OSError, ConnectionError) as e:
            await self._reset()
            raise self._unavailable(e) from None

    async def _refused(self) -> str:
        """Why Weaviate's ports refuse connections ("" when they accept them)."""
        for host, port in ((self.http_host, self.http_port), (self.grpc_host, self._cfg.grpc_port)):
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            except TimeoutError:
                continue  # no answer at all: a hung or unreachable host, not a refusal
            except OSError as e:
                return f"{host}:{port}: {e.strerror or e}"
            writer.close()
        return ""

    async def _reset(self) -> None:
        # Drop the client after a transport failure; the next call reconnects.
        client, self._client, self._collection = self._client, None, None
        if client is not None:
            await _quiet_close(client)

    # -- ChunkStore -----------------------------------------------------------

    async def check_health(self) -> None:
        async def ready(_collection):
            if not await self._client.is_ready():
                raise self._unavailable("it is not ready")

        await self._run("health", "the readiness check", ready, self._cfg.query_timeout_s)

    async def close(self) -> None:
        await self._reset()

    async def create_tenant(self, tenant: str) -> bool:
        from weaviate.classes.tenants import Tenant

        async def create(c):
            if await c.tenants.exists(tenant):
                return False
            await c.tenants.create([Tenant(name=tenant)])
            return True

        return await self._run(
            "create_tenant", "creating a tenant", create, self._cfg.write_timeout_s
        )

    async def delete_tenant(self, tenant: str) -> None:
        async def delete(c):
            if not await c.tenants.exists(tenant):
                raise NotFound(f"unknown tenant {tenant!r}")
            await c.tenants.remove([tenant])

        await self._run("delete_tenant", "deleting a tenant", delete, self._cfg.write_timeout_s)

    async def list_tenants(self) -> list[str]:
        async def names(c):
            return sorted((await c.tenants.get()).keys())

        return await self._run("list_tenants", "listing tenants", names, self._cfg.query_timeout_s)

    async def require_tenant(self, tenant: str) -> None:
        async def exists(c):
            if not await c.tenants.exists(tenant):
                raise NotFound(
                    f"tenant {tenant!r} has no knowledge space in Weaviate; create the tenant "
                    f"with `hybridserve admin tenants create {tenant}`"
                )

        await self._run(
            "require_tenant", "looking up the tenant", exists, self._cfg.query_timeout_s, tenant
        )

    async def count(self, tenant: str) -> int:
        async def total(c):
            result = await c.with_tenant(tenant).aggregate.over_all(total_count=True)
            return int(result.total_count or 0)

        return await self._run("count", "counting chunks", total, self._cfg.query_timeout_s, tenant)

    async def document_versions(self, tenant, doc_ids):
        from weaviate.classes.query import Filter

        if not doc_ids:
            return {}

        async def fetch(c):
            found = {}
            ids = list(doc_ids)
            for i in range(0, len(ids), 100):
                part = ids[i : i + 100]
                result = await c.with_tenant(tenant).query.fetch_objects(
                    filters=Filter.by_property("doc_id").contains_any(part)
                    & Filter.by_property("chunk_index").equal(0),
                    limit=len(part),
                    return_properties=["doc_id", "doc_sha256", "doc_chunks"],
                )
                for o in result.objects:
                    p = o.properties
                    found[p["doc_id"]] = (p.get("doc_sha256") or "", int(p.get("doc_chunks") or 0))
            return found

        return await self._run(
            "document_versions", "reading document versions", fetch, self._cfg.query_timeout_s, tenant
        )

    async def write(self, tenant, chunks, vectors):
        from weaviate.classes.data import DataObject

        now = datetime.now(UTC)
        objects = [
            DataObject(
                uuid=ch.id,
                vector=list(map(float, vec)),
                properties={
                    "text": ch.text,
                    "title": ch.title,
                    "doc_id": ch.doc_id,
                    "chunk_index": ch.index,
                    "source": ch.source,
                    "metadata": json.dumps(dict(ch.metadata), ensure_ascii=False, sort_keys=True),
                    "metadata_kv": metadata_terms(ch.metadata),
                    "ingested_at": now,
                    "doc_sha256": ch.doc_sha256,
                    "doc_chunks": ch.doc_chunks,
                },
            )
            for ch, vec in zip(chunks, vectors, strict=True)
        ]

        async def insert(c):
            return await c.with_tenant(tenant).data.insert_many(objects)

        result = await self._run(
            "write", "writing chunks", insert, self._cfg.write_timeout_s, tenant
        )
        failures = []
        for index, err in sorted(result.errors.items()):
            ch = chunks[index]
            message = getattr(err, "message", str(err))
            if _tenant_missing(message):
                raise NotFound(f"unknown tenant {tenant!r}: create it first")
            failures.append(ChunkFailure(ch.doc_id, ch.index, ch.id, message))
        return failures

    async def remove_tail(self, tenant, doc_id, keep):
        from weaviate.classes.query import Filter

        async def delete(c):
            result = await c.with_tenant(tenant).data.delete_many(
                where=Filter.by_property("doc_id").equal(doc_id)
                & Filter.by_property("chunk_index").greater_or_equal(keep)
            )
            return int(result.successful)

        return await self._run(
            "remove_tail", "removing stale chunks", delete, self._cfg.write_timeout_s, tenant
        )

    async def delete_documents(self, tenant, doc_ids):
        from weaviate.classes.query import Filter

        async def delete(c):
            removed = 0
            ids = list(doc_ids)
            for i in range(0, len(ids), 100):
                result = await c.with_tenant(tenant).data.delete_many(
                    where=Filter.by_property("doc_id").contains_any(ids[i : i + 100])
                )
                removed += int(result.successful)
            return removed

        return await self._run(
            "delete_documents", "deleting documents", delete, self._cfg.write_timeout_s, tenant
        )

    async def search(self, query, vector):
        from weaviate.classes.query import HybridFusion, MetadataQuery

        async def hybrid(c):
            return await c.with_tenant(query.tenant).query.hybrid(
                query=query.query,
                vector=list(map(float, vector)) if vector is not None else None,
                alpha=query.alpha,
                limit=query.top_k,
                query_properties=_KEYWORD_PROPERTIES,
                fusion_type=HybridFusion.RELATIVE_SCORE,
                filters=_where(query.filters),
                return_properties=_RETURN_PROPERTIES,
                return_metadata=MetadataQuery(score=True, explain_score=True),
            )

        result = await self._run(
            "search", "a search", hybrid, self._cfg.query_timeout_s, query.tenant
        )
        return [_hit(o) for o in result.objects]


def _where(filters: Sequence[FieldFilter]):
    """Weaviate filters for validated `FieldFilter`s (ANDed); None for none.

    Values are compared as exact field values; they can name anything, but
    only within the tenant the query is scoped to.
    """
    from weaviate.classes.query import Filter

    parts = []
    for f in filters:
        key = f.metadata_key
        if key is not None:
            prop = Filter.by_property("metadata_kv")
            terms = [f"{key}={v}" for v in f.values]
            if f.op == "not_equal":
                parts.append(Filter.not_(prop.contains_any(terms)))
            else:
                parts.append(prop.contains_any(terms))
            continue
        prop = Filter.by_property(f.field)
        if f.op == "equal":
            parts.append(prop.equal(f.values[0]))
        elif f.op == "not_equal":
            parts.append(prop.not_equal(f.values[0]))
        else:
            parts.append(prop.contains_any(list(f.values)))
    if not parts:
        return None
    return Filter.all_of(parts) if len(parts) > 1 else parts[0]


def _hit(o) -> Hit:
    p = o.properties
    md = o.metadata
    keyword = vector = None
    for m in _EXPLAIN_RE.finditer(md.explain_score or ""):
        if m.group("set") == "keyword":
            keyword = float(m.group("score"))
        else:
            vector = float(m.group("score"))
    try:
        metadata = json.loads(p.get("metadata") or "{}")
    except ValueError:
        metadata = {}
    ingested = p.get("ingested_at")
    return Hit(
        chunk_id=str(o.uuid),
        doc_id=p.get("doc_id") or "",
        chunk_index=int(p.get("chunk_index") or 0),
        text=p.get("text") or "",
        title=p.get("title") or "",
        source=p.get("source") or "",
        metadata=metadata,
        score=float(md.score or 0.0),
        keyword_score=keyword,
        vector_score=vector,
        ingested_at=ingested.isoformat() if isinstance(ingested, datetime) else str(ingested or ""),
    )


async def _quiet_close(client) -> None:
    try:
        await asyncio.wait_for(client.close(), 5)
    except BaseException:  # noqa: BLE001 - closing a broken client must not mask the real error
        pass


