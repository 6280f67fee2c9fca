"""The RerankService gRPC servicer.

A plain class. `rerank_batch` is the method Serve wraps in `@serve.batch`, so
concurrent callers' pairs are scored in one backend call; without Serve it
scores one request at a time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from hybridserve import observability as obs
from hybridserve import topology
from hybridserve.config import HybridServeConfig
from hybridserve.grpc_errors import grpc_unary
from hybridserve.rerank.backends import RerankBackend, build_backend
from hybridserve.rerank.service import Ranked, RerankInput, RerankService
from hybridserve.tenancy.auth import Tenancy, setup_servicer
from hybridserve.v1 import rerank_pb2

SERVICE_NAME = topology.RERANK.service


#: Characters per charged token of a rerank pair (a tokenizer-free estimate: a
#: reranker replica may run a model whose tokenizer the servicer does not load).
CHARS_PER_TOKEN = 4


def rerank_units(query: str, passages) -> int:
    """What a Rerank costs the tenant's tokens-per-minute: each (query, passage) pair
    the model reads, at one token per CHARS_PER_TOKEN characters (rounded up)."""
    return sum(-(-(len(query) + len(p)) // CHARS_PER_TOKEN) for p in passages)


class RerankServicer:
    #: The `service` label of this servicer's request metrics.
    metrics_service = "rerank"
    grpc_service = SERVICE_NAME

    def __init__(self, config: HybridServeConfig | dict, backend: RerankBackend | None = None,
                 tenancy: Tenancy | None = None):
        cfg, self.tenancy = setup_servicer(config, tenancy, self.metrics_service)
        backend = backend or build_backend(cfg.rerank, cfg.retrieval.embedding_model)
        self.service = RerankService(cfg.rerank, backend)

    async def rerank_batch(self, reqs: list[RerankInput]) -> list[list[Ranked]]:
        """Scores several validated requests together (off the event loop)."""
        return await asyncio.to_thread(self.service.rerank_many, reqs)

    async def rerank(self, req: RerankInput) -> list[Ranked]:
        """Validates and scores one request (through the batcher under Serve)."""
        req = self.service.validate(req)
        # Includes the wait for a batch: that is what the caller sees.
        with obs.stage_timer("rerank", service=self.metrics_service):
            return await self.rerank_batch_one(req)

    async def rerank_batch_one(self, req: RerankInput) -> list[Ranked]:
        # Overridden under Serve, where `rerank_batch` takes one item per call.
        return (await self.rerank_batch([req]))[0]

    @grpc_unary(timed=True)
    async def Rerank(self, request, grpc_context: Any = None):
        principal = await self.tenancy.authenticate(grpc_context)
        async with self.tenancy.admit(principal) as lease:
            if len(request.passages) <= self.service.cfg.max_passages:
                # (More is refused below, before any scoring: no need to count it.)
                lease.tokens = rerank_units(request.query, request.passages)
            ranked = await self.rerank(
                RerankInput(request.query, tuple(request.passages), request.top_n)
            )
        return rerank_pb2.RerankResponse(
            results=[rerank_pb2.RankedPassage(index=r.index, score=r.score) for r in ranked],
            model=self.service.backend.name,
        )

    async def Check(self, request, grpc_context: Any = None):
        if request.service not in ("", SERVICE_NAME):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
