"""The GenerationService gRPC servicer: protobuf in, domain calls, protobuf out.

A plain class. `hybridserve.app` turns it into a Ray Serve deployment (and
wraps `load_adapter` in `serve.multiplexed`); tests can use it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from hybridserve.config import HybridServeConfig
from hybridserve.errors import HybridServeError, Internal
from hybridserve.generation.adapters import AdapterRecord, AdapterRegistry
from hybridserve.generation.engine import AdapterRef, Engine
from hybridserve.generation.service import GenerateInput, GenerationService
from hybridserve.grpc_errors import set_status
from hybridserve.v1 import common_pb2, generation_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = "hybridserve.v1.GenerationService"
_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
#: How long an evicted adapter waits for its in-flight requests before unloading.
_EVICT_DRAIN_S = 60.0


def replica_id() -> str:
    """The Serve replica's unique id, or a process-local id outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}"


def model_dir_for(config: HybridServeConfig) -> Path:
    """The base model folder: `model.path`, or the prepared default model."""
    if config.model.path is not None:
        return Path(config.model.path).expanduser().resolve()
    from hybridserve.models import default_model_dir

    return default_model_dir(config.cache_dir, config.model.dtype)


class ResidentAdapter:
    """An adapter loaded into this replica's engine; the multiplexed "model".

    Counts in-flight requests so that eviction waits for them to finish.
    """

    def __init__(self, engine: Engine, ref: AdapterRef, on_unload):
        self.ref = ref
        self._engine = engine
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_unload = on_unload
        # NOTE: an instance attribute, not a method: Serve awaits `model.__del__`
        # on LRU eviction, while the garbage collector only ever calls the
        # class's __del__ (which must not be a coroutine).
        self.__del__ = self._unload

    def acquire(self) -> None:
        self._users += 1
        self._idle.clear()

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._idle.set()

    async def _unload(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), _EVICT_DRAIN_S)
        except TimeoutError:
            logger.warning("evicting %s with requests still running", self.ref.adapter_id)
        await self._engine.unload_adapter(self.ref)
        self._on_unload(self.ref.adapter_id)


def _input_from_proto(req: generation_pb2.GenerateRequest) -> GenerateInput:
    which = req.WhichOneof("input")
    s = req.sampling
    return GenerateInput(
        prompt=req.prompt if which == "prompt" else (None if which else ""),
        messages=[(m.role, m.content) for m in req.messages.messages]
        if which == "messages"
        else None,
        adapter=req.adapter,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        json_schema=req.json_schema,
        request_id=req.request_id,
    )


def adapter_to_proto(r: AdapterRecord) -> generation_pb2.Adapter:
    return generation_pb2.Adapter(
        id=r.id,
        name=r.name,
        version=r.version,
        content_sha256=r.content_sha256,
        rank=r.rank,
        target_modules=list(r.target_modules),
        base_model=r.base_model,
        size_bytes=r.size_bytes,
        source_path=r.source_path,
        registered_at=r.registered_at,
        metadata=dict(r.metadata),
    )


class GenerationServicer:
    """Implements hybridserve.v1.GenerationService and grpc.health.v1.Health.

    Args:
        config: platform config (a dict is accepted, as Serve passes it).
        engine: an engine to use instead of the configured backend (tests).
    """

    def __init__(self, config: HybridServeConfig | dict, engine: Engine | None = None):
        cfg = (
            config
            if isinstance(config, HybridServeConfig)
            else HybridServeConfig.model_validate(config)
        )
        model_dir = model_dir_for(cfg)
        if engine is None:
            from hybridserve.generation.vllm_engine import VLLMEngine

            engine = VLLMEngine(cfg, model_dir)
        self.service = GenerationService(cfg, engine, AdapterRegistry.from_config(cfg, model_dir))
        self._evictions = 0

    async def start(self) -> None:
        await self.service.engine.start()

    async def shutdown(self) -> None:
        await self.service.engine.shutdown()

    # -- adapters (multiplexed) --------------------------------------------

    async def load_adapter(self, adapter_id: str) -> ResidentAdapter:
        """Loads an adapter into this replica. Under Serve this is wrapped in
        `serve.multiplexed`, which keeps at most `engine.max_cpu_loras` per
        replica and evicts the least recently used."""
        ref = self.service.adapter_ref(self.service.registry.get(adapter_id))
        await self.service.engine.load_adapter(ref)
        return ResidentAdapter(self.service.engine, ref, self._evicted)

    def _evicted(self, adapter_id: str) -> None:
        self._evictions += 1
        logger.info("evicted adapter %s from replica %s", adapter_id, replica_id())

    # -- GenerationService -------------------------------------------------

    async def Generate(
        self, request: generation_pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        resident = None
        try:
            prepared = self.service.prepare(_input_from_proto(request))
            if prepared.adapter is not None:
                resident = await self.load_adapter(prepared.adapter.id)
                resident.acquire()
            # NOTE: aclosing, so that a client going away closes the whole chain
            # down to the engine (which then aborts the request) right now, not
            # whenever the garbage collector finalizes the inner generators.
            async with contextlib.aclosing(self.service.stream(prepared)) as stream:
                async for d in stream:
                    if d.text or d.token_ids:
                        yield generation_pb2.GenerateResponse(
                            delta=generation_pb2.TokenDelta(
                                text=d.text, token_ids=list(d.token_ids)
                            )
                        )
                    if d.finished:
                        yield generation_pb2.GenerateResponse(
                            final=generation_pb2.GenerationFinal(
                                finish_reason=_FINISH.get(d.finish_reason or "", 0),
                                usage=common_pb2.Usage(
                                    prompt_tokens=d.prompt_tokens,
                                    completion_tokens=d.completion_tokens,
                                ),
                                replica_id=replica_id(),
                                adapter=request.adapter,
                                request_id=prepared.request_id,
                            )
                        )
        except HybridServeError as e:
            set_status(grpc_context, e)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            set_status(grpc_context, e)
            raise Internal(str(e)) from e
        finally:
            if resident is not None:
                resident.release()

    async def ListAdapters(
        self, request: generation_pb2.ListAdaptersRequest, grpc_context: Any = None
    ) -> generation_pb2.ListAdaptersResponse:
        records = await self._call(grpc_context, self.service.registry.list)
        return generation_pb2.ListAdaptersResponse(adapters=[adapter_to_proto(r) for r in records])

    async def RegisterAdapter(
        self, request: generation_pb2.RegisterAdapterRequest, grpc_context: Any = None
    ) -> generation_pb2.RegisterAdapterResponse:
        # The registry validates name and path (empty ones included) with its own messages.
        record, created = await self._call(
            grpc_context,
            self.service.registry.register,
            request.name,
            request.path,
            version=request.version or None,
            metadata=dict(request.metadata),
        )
        return generation_pb2.RegisterAdapterResponse(
            adapter=adapter_to_proto(record), created=created
        )

    async def UnregisterAdapter(
        self, request: generation_pb2.UnregisterAdapterRequest, grpc_context: Any = None
    ) -> generation_pb2.UnregisterAdapterResponse:
        await self._call(grpc_context, self.service.registry.unregister, request.id)
        return generation_pb2.UnregisterAdapterResponse()

    async def _call(self, grpc_context: Any, fn, *args, **kwargs):
        # Registry calls hash and copy files: keep them off the event loop that
        # streams tokens.
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as e:
            set_status(grpc_context, e)
            raise

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
        last = None
        while True:  # ends when the client cancels
            status = await self._health(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(2.0)

    # -- introspection (Serve handle only, not on the gRPC API) -----------

    async def stats(self) -> dict:
        """This replica's id, engine counters, resident adapters and evictions."""
        return {
            "replica_id": replica_id(),
            "evictions": self._evictions,
            **asdict(self.service.engine.stats()),
        }
