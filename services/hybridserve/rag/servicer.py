"""The RagService gRPC servicer: authentication, tenant and adapter resolution,
quotas; then protobuf <-> the `RagService` pipeline.

A plain class; `hybridserve.app` deploys it as the `rag` Serve app.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from grpc_health.v1 import health_pb2

from hybridserve import observability as obs
from hybridserve import topology
from hybridserve.adapters import AdapterRegistry
from hybridserve.config import HybridServeConfig
from hybridserve.errors import InvalidArgument
from hybridserve.generation.engine import Delta
from hybridserve.grpc_errors import grpc_stream
from hybridserve.rag.gateway import Gateway
from hybridserve.rag.service import AskDone, AskInput, RagService, SourcesEvent, Timings
from hybridserve.retrieval.proto import filters_from_proto
from hybridserve.tenancy.auth import Tenancy, setup_servicer
from hybridserve.v1 import common_pb2, generation_pb2, rag_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = topology.RAG.service
_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "no_context": common_pb2.FINISH_REASON_NO_CONTEXT,
    "prompt_only": common_pb2.FINISH_REASON_PROMPT_ONLY,
}


def ask_input_from_proto(req: rag_pb2.AskRequest) -> AskInput:
    r, s = req.retrieval, req.sampling

    def opt(msg, name):
        return getattr(msg, name) if msg.HasField(name) else None

    return AskInput(
        question=req.question,
        messages=[(m.role, m.content) for m in req.messages],
        adapter=req.adapter,
        top_k=opt(r, "top_k"), alpha=opt(r, "alpha"), filters=filters_from_proto(r.filters),
        rerank=opt(r, "rerank"), top_n=opt(r, "top_n"), min_score=opt(r, "min_score"),
        max_tokens=opt(s, "max_tokens"), temperature=opt(s, "temperature"), top_p=opt(s, "top_p"),
        stop=tuple(s.stop), seed=opt(s, "seed"), json_schema=req.json_schema,
        client_request_id=req.client_request_id, prompt_only=req.prompt_only,
    )


def _citation(src, snippet_chars: int, whole_text: bool = False) -> rag_pb2.Citation:
    h = src.passage.hit
    c = rag_pb2.Citation(
        number=src.number, chunk_id=h.chunk_id, doc_id=h.doc_id, chunk_index=h.chunk_index,
        title=h.title, source=h.source, snippet=src.text[:snippet_chars],
        score=src.passage.score, retrieval_score=h.score, metadata=dict(h.metadata),
        text=src.text if whole_text else "",
    )
    if h.keyword_score is not None:
        c.keyword_score = h.keyword_score
    if h.vector_score is not None:
        c.vector_score = h.vector_score
    if src.passage.rerank_score is not None:
        c.rerank_score = src.passage.rerank_score
    return c


def _timings(t: Timings) -> rag_pb2.StageTimings:
    ms = {k: max(0.0, v) * 1e3 for k, v in vars(t).items() if k != "generation_started"}
    return rag_pb2.StageTimings(**{f"{k}_ms": v for k, v in ms.items()})


def _deadline_s(grpc_context, default_s: float) -> float:
    for key, value in (grpc_context.invocation_metadata() if grpc_context else ()):
        if key == topology.TIMEOUT_HEADER:
            try:
                return max(0.001, min(float(value) / 1000.0, 3600.0))
            except ValueError:
                raise InvalidArgument(
                    f"{topology.TIMEOUT_HEADER} must be a number of milliseconds") from None
    return default_s


class RagServicer:
    """Implements hybridserve.v1.RagService and grpc.health.v1.Health.

    Args:
        config: platform config (a dict is accepted, as Serve passes it).
        service: the pipeline (`hybridserve.app` builds it on Serve handles to the
            platform's apps; tests pass fakes).
        tenancy: authentication and quotas; default: as the config names them.
        adapter_exists: checks an admin-named adapter before anything streams.
    """

    metrics_service = "rag"
    grpc_service = SERVICE_NAME

    def __init__(self, config: HybridServeConfig | dict, service: RagService,
                 tenancy: Tenancy | None = None, adapter_exists=None):
        cfg, self.tenancy = setup_servicer(config, tenancy, self.metrics_service)
        self.config = cfg
        if adapter_exists is None:
            adapter_exists = AdapterRegistry.from_config(cfg).exists
        self.adapter_exists = adapter_exists
        self.service = service
        self.gateway = Gateway(cfg, self.tenancy, service, adapter_exists=adapter_exists)

    async def shutdown(self) -> None:
        await self.tenancy.close()

    @grpc_stream(timed=True)
    async def Ask(self, request: rag_pb2.AskRequest, grpc_context: Any = None):
        started = time.perf_counter()
        timings = Timings()
        deadline_s = _deadline_s(grpc_context, self.config.rag.timeout_s)
        principal = await self.tenancy.authenticate(grpc_context)
        timings.auth = time.perf_counter() - started
        answer = self.gateway.ask(principal, ask_input_from_proto(request),
                                  tenant_field=request.tenant, base_model=request.base_model,
                                  started=started, deadline_s=deadline_s, timings=timings)
        whole = request.include_prompt or request.prompt_only
        # NOTE: aclosing: a client going away closes the pipeline down to the
        # generation replica at once (the engine aborts the request).
        async with contextlib.aclosing(answer):
            async for event in answer:
                yield self._to_proto(event, whole)

    def _to_proto(self, event, include_prompt: bool = False) -> rag_pb2.AskResponse:
        if isinstance(event, SourcesEvent):
            snip = self.config.rag.snippet_chars
            return rag_pb2.AskResponse(sources=rag_pb2.Sources(
                citations=[_citation(s, snip, include_prompt) for s in event.sources]))
        if isinstance(event, Delta):
            return rag_pb2.AskResponse(delta=generation_pb2.TokenDelta(
                text=event.text, token_ids=list(event.token_ids)))
        assert isinstance(event, AskDone), event
        self._observe(event.timings)
        return rag_pb2.AskResponse(final=rag_pb2.AskFinal(
            finish_reason=_FINISH.get(event.finish_reason, 0),
            usage=common_pb2.Usage(prompt_tokens=event.prompt_tokens,
                                   completion_tokens=event.completion_tokens,
                                   cached_prompt_tokens=event.cached_prompt_tokens),
            adapter=event.adapter, replica_id=event.replica_id,
            cited=event.cited, invalid_citations=event.invalid_citations,
            timings=_timings(event.timings), request_id=event.request_id,
            client_request_id=event.client_request_id, tenant=event.tenant,
            passage_token_budget=event.passage_token_budget,
            passage_tokens=event.passage_tokens,
            prompt_token_ids=list(event.prompt_token_ids) if include_prompt else [],
        ))

    def _observe(self, t: Timings) -> None:
        for stage in ("embed", "retrieve", "rerank", "prompt", "first_token"):
            value = getattr(t, stage)
            if value:
                obs.observe_stage(stage, value, service=self.metrics_service)

    async def Check(self, request, grpc_context: Any = None):
        if request.service not in ("", SERVICE_NAME):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
