"""The RetrievalService gRPC servicer: protobuf in, domain calls, protobuf out.

A plain class; `hybridserve.app` deploys it with Serve and gives it a handle
to the embedding deployment. Tests can build it with any `ChunkStore` and
embedding function.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from grpc_health.v1 import health_pb2

from hybridserve import observability as obs
from hybridserve import topology
from hybridserve.config import HybridServeConfig
from hybridserve.grpc_errors import grpc_unary
from hybridserve.errors import DeadlineExceeded, NotFound
from hybridserve.health import watch_health
from hybridserve.retrieval.documents import Document, RetrievalResult
from hybridserve.embedding import load_tokenizer, resolve_model_dir
from hybridserve.embedding import model_name as name_of
from hybridserve.retrieval.proto import filters_from_proto, hit_to_proto, upsert_to_proto
from hybridserve.retrieval.service import EmbedFn, RetrievalService
from hybridserve.retrieval.store import ChunkStore, WeaviateStore
from hybridserve.tenancy.auth import Tenancy, setup_servicer, store_call
from hybridserve.v1 import retrieval_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = topology.RETRIEVAL.service
#: Longest the Weaviate probe of the replica's health check may take; slower is "down".
PROBE_TIMEOUT_S = 5.0
#: Serve's timeout for the whole health check (its default, stated explicitly: the
#: probe must stay well inside it, or Serve restarts a replica over a slow Weaviate).
HEALTH_CHECK_TIMEOUT_S = 30.0


class RetrievalServicer:
    """Implements hybridserve.v1.RetrievalService and grpc.health.v1.Health.

    Under Serve, the deployment's `check_health` calls `probe_weaviate`, which
    keeps the weaviate_up gauge current.

    Args:
        config: platform config (a dict is accepted, as Serve passes it).
        embed: async embedding function.
        store: chunk store; default: Weaviate as configured.
        tokenizer / model_name: the embedding model's tokenizer and name;
            default: loaded from `retrieval.embedding_model`.
        tenancy: authentication and quotas; default: as the config names them.
    """

    def __init__(
        self,
        config: HybridServeConfig | dict,
        embed: EmbedFn,
        *,
        store: ChunkStore | None = None,
        tokenizer=None,
        model_name: str | None = None,
        tenancy: Tenancy | None = None,
    ):
        cfg, self.tenancy = setup_servicer(config, tenancy, self.metrics_service)
        if store is None:
            store = WeaviateStore(cfg)
        if tokenizer is None or model_name is None:
            folder = resolve_model_dir(cfg.retrieval.embedding_model)
            tokenizer = tokenizer or load_tokenizer(folder)
            model_name = model_name or name_of(folder)
        self.service = RetrievalService(cfg, store, embed, tokenizer, model_name)
        self.config = cfg

    #: The `service` label of this servicer's request metrics.
    metrics_service = "retrieval"
    grpc_service = SERVICE_NAME

    async def shutdown(self) -> None:
        obs.release_replica(obs.replica_id())
        await self.service.store.close()
        await self.tenancy.close()

    async def probe_weaviate(self) -> bool:
        """Checks that Weaviate answers and reports it (weaviate_up); never raises.

        NOTE: never raises on purpose: Serve calls this as the replica's health
        check, and a down Weaviate must not get retrieval replicas restarted.
        """
        if not obs.is_enabled():
            return True
        try:
            # NOTE: bounded well inside Serve's health-check timeout: a reconnect
            # (connect, collection check) can take far longer than a probe should.
            await asyncio.wait_for(self.service.check_health(), PROBE_TIMEOUT_S)
            up = True
        except Exception:  # noqa: BLE001 - down (or too slow) is an answer here, not an error
            up = False
        obs.set_weaviate_up(obs.replica_id(), up)
        return up

    # -- a tenant's knowledge space (Serve handle calls of the control plane) -------

    async def create_knowledge(self, tenant: str) -> bool:
        """Creates the tenant's knowledge space (idempotent)."""
        return await self.service.create_tenant(tenant)

    async def delete_knowledge(self, tenant: str) -> int:
        """Deletes the tenant's knowledge space; the chunks it held (0 if none)."""
        return await self.service.delete_tenant(tenant)

    async def retrieve_for_gateway(self, tenant: str, query: str, top_k: int,
                                   alpha: float | None, filters, vector=None,
                                   timeout_s: float | None = None):
        """Serve handle only: the RAG gateway's search, with plain dataclasses. The
        gateway has authenticated the tenant; the search is validated here as any
        other (InvalidArgument names the bad field)."""
        q = self.service.prepare_search(tenant, query, top_k, alpha, list(filters))
        try:
            hits, embed_s, retrieve_s = await asyncio.wait_for(
                self.service.search_timed(q, vector), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed during retrieval") from None
        return RetrievalResult(hits, embed_s, retrieve_s)

    async def embed_for_gateway(self, texts: list[str], timeout_s: float | None = None
                                ) -> tuple[list[list[float]], int]:
        """Serve handle only: embeddings for the OpenAI-compatible API (`/v1/embeddings`),
        which has authenticated and admitted the caller. Returns the vectors and the
        tokens the model read."""
        try:
            return await asyncio.wait_for(self.service.embed_texts(texts), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while embedding") from None

    # -- RetrievalService -------------------------------------------------------------

    @grpc_unary
    async def ListTenants(self, request, grpc_context: Any = None):
        principal = await self.tenancy.authenticate(grpc_context)
        async with self.tenancy.admit(principal):
            if principal.is_admin:
                tenants = await self.service.list_tenants()
            else:
                tenants = [(principal.tenant_id, await self.service.count(principal.tenant_id))]
        return retrieval_pb2.ListTenantsResponse(
            tenants=[retrieval_pb2.TenantInfo(tenant=t, chunks=n) for t, n in tenants]
        )

    @grpc_unary
    async def Upsert(self, request, grpc_context: Any = None):
        principal = await self.tenancy.authenticate(grpc_context)
        tenant = await self.tenancy.resolve_tenant(principal, request.tenant)
        docs = [
            Document(d.id, d.text, d.title, d.source, dict(d.metadata)) for d in request.documents
        ]
        guard = await self._incarnation_guard(principal, tenant)
        async with self.tenancy.admit(principal) as lease:
            # Embedding is the shared embedder's compute, charged in tokens: an
            # estimate first (a token per 4 characters), so an Upsert that is cancelled
            # or fails half-way is paid for too; then what was really embedded.
            lease.tokens = sum(-(-len(d.text) // 4) for d in docs)
            result = await self.service.upsert(tenant, docs, still_current=guard)
            lease.tokens = result.embedded_tokens
        if result.failures:
            logger.warning(
                "upsert into %s: %d chunks failed (first: %s)",
                tenant, len(result.failures), result.failures[0].message,
            )
        return upsert_to_proto(result)

    async def _incarnation_guard(self, principal, tenant: str):
        """A check that `tenant` is still the incarnation this request was admitted
        for (a tenant key: the one its key belongs to; an admin key: the one that
        exists now), awaited before each write batch of an upsert. A tenant deleted
        (and perhaps created again under the same id) meanwhile ends the upsert with
        NOT_FOUND instead of writing into the new tenant."""
        read = self.tenancy.store.tenant_incarnation
        expected = (principal.tenant.created_at if principal.tenant is not None
                    else await asyncio.to_thread(store_call, read, tenant))

        async def still_current() -> None:
            if await asyncio.to_thread(store_call, read, tenant) != expected:
                raise NotFound(
                    f"tenant {tenant!r} was deleted while this upsert ran; nothing more was "
                    "written (what was written before is deleted with the tenant)",
                    reason="TENANT_NOT_FOUND",
                )

        return still_current

    @grpc_unary
    async def Delete(self, request, grpc_context: Any = None):
        principal = await self.tenancy.authenticate(grpc_context)
        tenant = await self.tenancy.resolve_tenant(principal, request.tenant)
        async with self.tenancy.admit(principal):
            deleted = await self.service.delete(tenant, list(request.doc_ids))
        return retrieval_pb2.DeleteResponse(deleted_chunks=deleted)

    @grpc_unary(timed=True)
    async def Search(self, request, grpc_context: Any = None):
        principal = await self.tenancy.authenticate(grpc_context)
        tenant = await self.tenancy.resolve_tenant(principal, request.tenant)
        query = self.service.prepare_search(
            tenant,
            request.query,
            request.top_k,
            request.alpha if request.HasField("alpha") else None,
            filters_from_proto(request.filters),
        )
        async with self.tenancy.admit(principal) as lease:
            lease.tokens = self.service.query_tokens(query.query)
            hits = await self.service.search(query)
        return retrieval_pb2.SearchResponse(hits=[hit_to_proto(h) for h in hits])

    # -- grpc.health.v1.Health ----------------------------------------------

    async def _health(self, service: str) -> int:
        if service not in ("", SERVICE_NAME):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        try:
            await self.service.check_health()
        except Exception:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def Check(self, request, grpc_context: Any = None):
        return health_pb2.HealthCheckResponse(status=await self._health(request.service))

    async def Watch(self, request, grpc_context: Any = None):
        """The status now and on each change, for serve.health_watch_s (see
        `hybridserve.health`)."""
        async for status in watch_health(self._health, request.service,
                                         self.config.serve.health_watch_s):
            yield health_pb2.HealthCheckResponse(status=status)
