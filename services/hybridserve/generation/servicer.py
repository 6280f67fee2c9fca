"""The GenerationService gRPC servicer: protobuf in, domain calls, protobuf out.

A plain class. `hybridserve.app` turns it into a Ray Serve deployment (and
wraps `load_adapter` in `serve.multiplexed`); tests can use it directly. What it
delegates to lives beside it: `service` (generation), `residency` (LoRA residency
and the routing report), `registration` (the adapters a key may list; registering
and unregistering are the control plane's, `tenancy.servicer`),
`load_sampler` (engine-load gauges) and `introspection` (Serve-handle-only hooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from grpc_health.v1 import health_pb2

from hybridserve import observability as obs
from hybridserve import topology
from hybridserve.adapters import AdapterRegistry
from hybridserve.adapters.proto import adapter_to_proto
from hybridserve.config import HybridServeConfig
from hybridserve.generation.engine import Delta, Engine
from hybridserve.generation.introspection import RecentRequestIds, ReplicaIntrospection
from hybridserve.generation.load_sampler import EngineLoadSampler
from hybridserve.generation.replica import replica_rank
from hybridserve.generation.residency import AdapterResidency, ResidentAdapter, RoutingReport
from hybridserve.generation.service import (
    GenerateInput,
    GenerationDone,
    GenerationService,
    estimated_prompt_tokens,
    prefix_cache_salt,
)
from hybridserve.errors import DeadlineExceeded, Unavailable
from hybridserve.grpc_errors import grpc_stream, grpc_unary
from hybridserve.health import watch_health
from hybridserve.models import model_dir_for
from hybridserve.tenancy.auth import Tenancy, setup_servicer
from hybridserve.tenancy.registration import AdapterRegistration
from hybridserve.v1 import common_pb2, generation_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = topology.GENERATION.service
_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}




def _input_from_proto(req: generation_pb2.GenerateRequest) -> GenerateInput:
    which = req.WhichOneof("input")
    s = req.sampling
    return GenerateInput(
        prompt=req.prompt if which == "prompt" else (None if which else ""),
        messages=[(m.role, m.content) for m in req.messages.messages]
        if which == "messages"
        else None,
        prompt_token_ids=list(req.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        adapter=req.adapter,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        json_schema=req.json_schema,
        client_request_id=req.client_request_id,
    )


def _final_to_proto(done: GenerationDone) -> generation_pb2.GenerationFinal:
    return generation_pb2.GenerationFinal(
        finish_reason=_FINISH.get(done.finish_reason, 0),
        usage=common_pb2.Usage(prompt_tokens=done.prompt_tokens,
                               completion_tokens=done.completion_tokens,
                               cached_prompt_tokens=done.cached_prompt_tokens),
        replica_id=done.replica_id,
        adapter=done.adapter,
        request_id=done.request_id,
        client_request_id=done.client_request_id,
    )


class GenerationServicer(ReplicaIntrospection):
    """Implements hybridserve.v1.GenerationService and grpc.health.v1.Health, by
    translating protobuf and calling: `GenerationService` (generation),
    `AdapterResidency` (adapters loaded in this replica, and the routing report),
    `AdapterRegistration` (the adapters a key may list) and `EngineLoadSampler` (the
    engine-load gauges). The Serve-handle-only introspection that tests and
    benchmarks use comes from `ReplicaIntrospection`.

    Args:
        config: platform config (a dict is accepted, as Serve passes it).
        engine: an engine to use instead of the configured backend (tests).
        tenancy: authentication and quotas; default: the store and Redis the
            config names.
    """

    #: The `service` label of this servicer's request metrics.
    metrics_service = "generation"
    grpc_service = SERVICE_NAME

    def __init__(self, config: HybridServeConfig | dict, engine: Engine | None = None,
                 tenancy: Tenancy | None = None):
        cfg, self.tenancy = setup_servicer(config, tenancy, self.metrics_service)
        model_dir = model_dir_for(cfg)
        rank = replica_rank()
        #: A base-pool replica: LoRA off, serves requests that name no adapter.
        self.base_only = rank is not None and rank < cfg.generation.base_pool_replicas
        if self.base_only:
            cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(
                update={"enable_lora": False})})
            logger.info("replica rank %s is in the base pool: LoRA off", rank)
        if engine is None:
            # Lazy: vllm is heavy, and tests pass their own engine.
            from hybridserve.generation.vllm_engine import VLLMEngine

            engine = VLLMEngine(cfg, model_dir)
        self.config = cfg
        self.service = GenerationService(cfg, engine, AdapterRegistry.from_config(cfg, model_dir))
        self.residency = AdapterResidency(engine, cfg.adapters.node_cache_dir)
        self.registration = AdapterRegistration(self.service.registry, self.tenancy.store)
        self.load_sampler = EngineLoadSampler(
            engine, capacity=cfg.engine.max_num_seqs,
            interval_s=cfg.observability.engine_stats_interval_s)
        # Read through the Serve handle only (`ReplicaIntrospection.stats`).
        self.prefetches = 0
        self.recent_ids = RecentRequestIds()

    async def start(self) -> None:
        await self.service.engine.start()
        if obs.is_enabled():
            self.load_sampler.start()

    async def shutdown(self) -> None:
        self.load_sampler.stop()
        self.residency.shutdown()
        self.service.close()
        obs.release_replica(obs.replica_id())
        await self.service.engine.shutdown()
        await self.tenancy.close()

    # -- adapters (multiplexed) --------------------------------------------

    async def load_adapter(self, adapter_id: str) -> ResidentAdapter:
        """Loads an adapter into this replica. Under Serve this is wrapped in
        `serve.multiplexed`, which keeps at most `engine.max_loras` per replica (what
        one batch can hold) and evicts the least recently used."""
        # The registry stats (and may read) its record: off the loop.
        record = await self.service.run_blocking(self.service.registry.get, adapter_id)
        return await self.residency.load(record, self.service.adapter_ref(record))

    def routing_report(self) -> RoutingReport:
        """What every router needs of this replica (Serve's `record_routing_stats`
        sends its `to_wire()`): adapter slots (0 in the base pool), requests in
        flight per adapter ("" = none) and in all, and when this was taken."""
        return self.residency.report(0 if self.base_only else self.config.engine.max_loras)

    # -- GenerationService -------------------------------------------------

    @grpc_stream(timed=True)
    async def Generate(
        self, request: generation_pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        principal = await self.tenancy.authenticate(grpc_context)
        principal.authorize_adapter(request.adapter)
        async with self.tenancy.admit(principal, stream=True) as lease:
            # NOTE: aclosing: a client going away must close the chain down to the
            # engine now (which aborts the request), not when it is collected.
            run = self._run(_input_from_proto(request), principal.tenant_id, lease)
            async with contextlib.aclosing(run) as out:
                async for item in out:
                    if isinstance(item, GenerationDone):
                        yield generation_pb2.GenerateResponse(final=_final_to_proto(item))
                    else:
                        yield generation_pb2.GenerateResponse(
                            delta=generation_pb2.TokenDelta(
                                text=item.text, token_ids=list(item.token_ids))
                        )

    async def generate_for_gateway(
        self, inp: GenerateInput, tenant: str | None, timeout_s: float | None = None
    ) -> AsyncIterator[Delta | GenerationDone]:
        """Serve handle only (`.options(stream=True, multiplexed_model_id=adapter)`):
        the RAG gateway's generation, with plain dataclasses. The gateway has
        authenticated the tenant, authorized the adapter and admitted the request
        under its quotas. Yields token deltas, then one GenerationDone; raises
        DeadlineExceeded when `timeout_s` passes first."""
        run = self._run(inp, tenant, None)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        async with contextlib.aclosing(run) as out:
            while True:
                try:
                    # NOTE: a timeout per item (no task per delta, unlike wait_for), and
                    # never one spanning a yield, which would fire in the consumer.
                    async with asyncio.timeout_at(deadline):
                        item = await out.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise DeadlineExceeded(
                        "the request's deadline passed during generation") from None
                yield item

    async def prefetch_adapter(self, adapter_id: str) -> str:
        """Serve handle only (`.options(multiplexed_model_id=adapter_id)`): makes the
        adapter resident on the replica its requests will be routed to, before they
        come (the RAG gateway calls it while retrieval runs). Returns the replica."""
        if adapter_id:
            self.prefetches += 1
            await self.load_adapter(adapter_id)
        return obs.replica_id()

    async def _run(self, inp: GenerateInput, tenant: str | None, lease) -> AsyncIterator:
        """One generation: coalesced Deltas, then one GenerationDone. `lease` (the
        caller's quota admission, if any) is debited with the tokens used."""
        start = time.perf_counter()
        resident = None
        base = False
        try:
            # Tokenizing, the chat template and schema checks: off the event loop
            # that AsyncLLM's output handler shares.
            if lease is not None:
                # An estimate until the prompt is tokenized (a cancel meanwhile pays it).
                lease.tokens = estimated_prompt_tokens(inp)

            def charge(n_prompt: int) -> None:
                # Tokenizing is paid for, also when the prompt is then refused.
                if lease is not None:
                    lease.tokens = n_prompt

            prepared = await self.service.run_blocking(self.service.prepare, inp, charge)
            if prepared.client_request_id:
                logger.info("request %s is the client's %r", prepared.request_id,
                            prepared.client_request_id)
                self.recent_ids.remember(prepared.client_request_id, prepared.request_id)
            if prepared.adapter is not None:
                if self.base_only:
                    raise Unavailable(
                        "this replica is in the base pool and serves no adapter; retry (the "
                        "router sends adapter requests to the other replicas)",
                        reason="BASE_POOL_REPLICA", retry_after=0.1)
                resident = await self.load_adapter(prepared.adapter.id)
                resident.acquire()
            else:
                self.residency.acquire_base()
                base = True
            if lease is not None:
                lease.tokens = len(prepared.prompt_token_ids)
            first_token_s = None
            # NOTE: aclosing, so that a client going away closes the whole chain
            # down to the engine (which then aborts the request) right now, not
            # whenever the garbage collector finalizes the inner generators.
            salt = prefix_cache_salt(tenant, self.config)
            async with contextlib.aclosing(self.service.stream(prepared, salt)) as stream:
                async for d in stream:
                    if lease is not None:
                        # Debited when the stream ends, however it ends (also on cancel).
                        lease.tokens += len(d.token_ids)
                    if d.text or d.token_ids:
                        if first_token_s is None:
                            first_token_s = time.perf_counter() - start
                            obs.observe_stage("first_token", first_token_s,
                                              service=self.metrics_service)
                        yield Delta(text=d.text, token_ids=tuple(d.token_ids))
                    if d.finished:
                        if lease is not None:
                            lease.tokens = d.prompt_tokens + d.completion_tokens
                        adapter_id = prepared.adapter.id if prepared.adapter else None
                        obs.record_tokens(tenant, adapter_id, d.prompt_tokens,
                                          d.completion_tokens)
                        yield GenerationDone(
                            finish_reason=d.finish_reason or "",
                            prompt_tokens=d.prompt_tokens,
                            completion_tokens=d.completion_tokens,
                            replica_id=obs.replica_id(),
                            adapter=adapter_id or "",
                            request_id=prepared.request_id,
                            client_request_id=prepared.client_request_id,
                            first_token_s=first_token_s,
                            cached_prompt_tokens=d.cached_tokens,
                        )
        finally:
            if resident is not None:
                resident.release()
            if base:
                self.residency.release_base()

    @grpc_unary
    async def ListAdapters(
        self, request: generation_pb2.ListAdaptersRequest, grpc_context: Any = None
    ) -> generation_pb2.ListAdaptersResponse:
        principal = await self.tenancy.authenticate(grpc_context)
        async with self.tenancy.admit(principal):
            records = await self.registration.list_for(principal)
        return generation_pb2.ListAdaptersResponse(
            adapters=[adapter_to_proto(r, full=principal.is_admin) for r in records])

    # -- grpc.health.v1.Health ----------------------------------------------

    async def _health(self, service: str) -> int:
        if service not in ("", SERVICE_NAME):
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        try:
            await self.service.engine.check_health()
        except Exception:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=await self._health(request.service))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status at once, then each change, for `serve.health_watch_s`.
        The stream then ends with OK, and the client watches again: an open stream
        holds one of this replica's `max_ongoing_requests`, so it must not be held
        forever."""
        async for status in watch_health(self._health, request.service,
                                         self.config.serve.health_watch_s):
            yield health_pb2.HealthCheckResponse(status=status)
