"""Fakes that implement the real protocols (see STYLE.md habit 8)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from hybridserve.generation.engine import AdapterRef, Delta, Engine, EngineStats, SamplingOptions
from hybridserve.observability import metrics as m


class FakeEngine(Engine):
    """Whitespace tokenizer; emits `tok<i>` tokens, one per step, `step_s` apart."""

    def __init__(self, max_model_len: int = 64, step_s: float = 0.0):
        self._max_len = max_model_len
        self.step_s = step_s
        self.started = False
        self.loaded: dict[str, AdapterRef] = {}
        self.aborted: list[str] = []
        self.calls: list[tuple[str, list[int], SamplingOptions, AdapterRef | None]] = []
        #: the cache salt of each call, in order
        self.salts: list[str | None] = []

    async def start(self) -> None:
        self.started = True

    async def check_health(self) -> None:
        if not self.started:
            raise RuntimeError("not started")

    async def shutdown(self) -> None:
        self.started = False

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        return " ".join(f"<{r}> {c}" for r, c in messages) + " <assistant>"

    async def load_adapter(self, adapter: AdapterRef) -> None:
        self.loaded[adapter.adapter_id] = adapter

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        self.loaded.pop(adapter.adapter_id, None)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions,
        adapter: AdapterRef | None = None, cache_salt: str | None = None,
    ) -> AsyncIterator[Delta]:
        self.calls.append((request_id, prompt_token_ids, options, adapter))
        self.salts.append(cache_salt)
        try:
            for i in range(options.max_tokens):
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                last = i == options.max_tokens - 1
                yield Delta(
                    text=f"tok{i} ", token_ids=(i,), finished=last,
                    finish_reason="length" if last else None,
                    prompt_tokens=len(prompt_token_ids), completion_tokens=i + 1,
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise

    def stats(self) -> EngineStats:
        return EngineStats(aborted_request_ids=list(self.aborted), resident_adapters=sorted(self.loaded))


# -- knowledge path -------------------------------------------------------------

from hybridserve.errors import NotFound  # noqa: E402
from hybridserve.retrieval.documents import Chunk, ChunkFailure, Hit, SearchQuery  # noqa: E402
from hybridserve.retrieval.store import ChunkStore  # noqa: E402


class FakeChunkStore(ChunkStore):
    """In-memory `ChunkStore`: tenants are dicts of chunk id -> (chunk, vector).

    Search is a plain word-overlap score (no vectors), enough for service logic.
    `fail_chunks` makes writes of those (doc id, chunk index) pairs fail.
    """

    def __init__(self):
        self.tenants: dict[str, dict[str, tuple[Chunk, list[float]]]] = {}
        self.fail_chunks: set[tuple[str, int]] = set()
        self.writes: list[list[tuple[str, int]]] = []

    async def check_health(self):
        return None

    async def close(self):
        return None

    async def create_tenant(self, tenant):
        created = tenant not in self.tenants
        self.tenants.setdefault(tenant, {})
        return created

    async def delete_tenant(self, tenant):
        await self.require_tenant(tenant)
        del self.tenants[tenant]

    async def list_tenants(self):
        return sorted(self.tenants)

    async def require_tenant(self, tenant):
        if tenant not in self.tenants:
            raise NotFound(f"unknown tenant {tenant!r}")

    async def count(self, tenant):
        await self.require_tenant(tenant)
        return len(self.tenants[tenant])

    async def document_versions(self, tenant, doc_ids):
        out = {}
        for ch, _ in self.tenants[tenant].values():
            if ch.doc_id in doc_ids and ch.index == 0:
                out[ch.doc_id] = (ch.doc_sha256, ch.doc_chunks)
        return out

    async def write(self, tenant, chunks, vectors):
        await self.require_tenant(tenant)
        self.writes.append([(c.doc_id, c.index) for c in chunks])
        failures = []
        for ch, vec in zip(chunks, vectors, strict=True):
            if (ch.doc_id, ch.index) in self.fail_chunks:
                failures.append(ChunkFailure(ch.doc_id, ch.index, ch.id, "injected failure"))
            else:
                self.tenants[tenant][ch.id] = (ch, list(vec))
        return failures

    async def remove_tail(self, tenant, doc_id, keep):
        await self.require_tenant(tenant)
        gone = [k for k, (c, _) in self.tenants[tenant].items() if c.doc_id == doc_id and c.index >= keep]
        for k in gone:
            del self.tenants[tenant][k]
        return len(gone)

    async def delete_documents(self, tenant, doc_ids):
        await self.require_tenant(tenant)
        gone = [k for k, (c, _) in self.tenants[tenant].items() if c.doc_id in doc_ids]
        for k in gone:
            del self.tenants[tenant][k]
        return len(gone)

    async def search(self, query: SearchQuery, vector):
        await self.require_tenant(query.tenant)
        words = set(query.query.lower().split())
        scored = []
        for c, _ in self.tenants[query.tenant].values():
            score = len(words & set(c.text.lower().split()))
            if score:
                scored.append(Hit(c.id, c.doc_id, c.index, c.text, c.title, c.source, c.metadata, score))
        return sorted(scored, key=lambda h: -h.score)[: query.top_k]


class FakeMetric:
    """Records calls and checks the tag keys, which Ray itself does not fully check
    (it accepts extra keys silently, which would split a metric's label schema)."""

    def __init__(self, spec: m.MetricSpec):
        self.spec = spec
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def _check(self, op: str, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.spec.labels), (self.spec.name, tags)
        assert all(isinstance(v, str) and v for v in tags.values()), (self.spec.name, tags)
        self.calls.append((op, value, dict(tags)))

    def inc(self, value, tags):
        assert self.spec.kind is m.Kind.COUNTER and value > 0
        self._check("inc", value, tags)

    def observe(self, value, tags):
        assert self.spec.kind is m.Kind.HISTOGRAM
        self._check("observe", value, tags)

    def set(self, value, tags):
        assert self.spec.kind is m.Kind.GAUGE
        self._check("set", value, tags)


# -- tenancy --------------------------------------------------------------------


class FakeContext:
    """The part of a gRPC servicer context the servicers use (grpcio's and Ray
    Serve's `RayServegRPCContext` have the same methods), sending `api_key`."""

    def __init__(self, api_key: str | None = None, metadata=()):
        self._metadata = list(metadata)
        if api_key is not None:
            self._metadata.append(("authorization", f"Bearer {api_key}"))
        self._code = None
        self._details = None
        self._trailing: list = []

    def invocation_metadata(self):
        return list(self._metadata)

    def set_code(self, code):
        self._code = code

    def code(self):
        return self._code

    @property
    def code_name(self) -> str:
        return self._code.name if self._code is not None else "OK"

    def set_details(self, details):
        self._details = details

    def details(self):
        return self._details

    def set_trailing_metadata(self, md):
        self._trailing = list(md)

    def trailing_metadata(self):
        return list(self._trailing)

    def rich_status(self):
        from google.rpc import status_pb2

        for k, v in self._trailing:
            if k == "grpc-status-details-bin":
                return status_pb2.Status.FromString(v)
        return None


def tenancy_for(config, *, quotas=None, service: str = "other"):
    """A real Tenancy on the config's SQLite store, with an admin key; (tenancy, key).
    `service` labels its auth and quota timings."""
    from hybridserve.tenancy.auth import Tenancy
    from hybridserve.tenancy.bootstrap import ensure_admin_key, read_key_file
    from hybridserve.tenancy.store import TenancyStore

    store = TenancyStore(config.tenancy_database_url)
    store.migrate()
    ensure_admin_key(store, config.admin_key_path)
    tenancy = Tenancy(store, quotas, cache_ttl_s=config.tenancy.auth_cache_ttl_s,
                      metrics_service=service)
    return tenancy, read_key_file(
        config.admin_key_path)
