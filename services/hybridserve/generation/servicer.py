"""The GenerationService gRPC servicer: protobuf in, domain calls, protobuf out.

A plain class. `hybridserve.app` turns it into a Ray Serve deployment (and
wraps `load_adapter` in `serve.multiplexed`); tests can use it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from pathlib import PurePosixPath
from typing import Any

from grpc_health.v1 import health_pb2

from hybridserve import observability as obs
from hybridserve.adapters import AdapterRecord, AdapterRegistry
from hybridserve.config import HybridServeConfig
from hybridserve.generation.engine import AdapterRef, Engine
from hybridserve.generation.engine import Delta
from hybridserve.generation.service import (
    GenerateInput,
    GenerationDone,
    GenerationService,
    prefix_cache_salt,
)
from hybridserve.errors import DeadlineExceeded, FailedPrecondition, HybridServeError, Unavailable
from hybridserve.grpc_errors import grpc_stream, grpc_unary
from hybridserve.health import watch_health
from hybridserve.models import model_dir_for
from hybridserve.tenancy.auth import Tenancy
from hybridserve.v1 import common_pb2, generation_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = "hybridserve.v1.GenerationService"
_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
#: client_request_id -> request id pairs a replica remembers for `stats()`.
_RECENT_IDS = 256


def replica_id() -> str:
    """The Serve replica's unique id, or a process-local id outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}"


def replica_rank() -> int | None:
    """The Serve replica's rank (0..N-1 in its deployment), or None outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().rank.rank
    except Exception:
        return None


def _rss_bytes() -> int:
    """Resident memory of this replica and its children (vLLM's engine process)."""
    import psutil

    total = 0
    me = psutil.Process()
    for proc in (me, *me.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return total


class _AdapterState:
    """One adapter in this replica's engine: the requests using it, and whether Serve
    has evicted it (it then unloads once they have ended)."""

    def __init__(self, ref: AdapterRef):
        self.ref = ref
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()
        #: Set when Serve evicted it; cleared when it is loaded again before unloading.
        self.evicted = False


class ResidentAdapter:
    """The multiplexed "model" Serve caches for one load of an adapter.

    Evicting it returns at once: Serve awaits `model.__del__` while it holds the
    replica's model-cache lock, so waiting there would stall every other adapter's
    load. The servicer unloads the adapter from the engine once its last request
    has ended, unless it is loaded again first. A load returns a new object each
    time (Serve disarms the `__del__` of the object it evicted) over one shared
    state per adapter.
    """

    def __init__(self, state: _AdapterState, on_evict):
        self._state = state
        self._on_evict = on_evict
        # NOTE: an instance attribute, not a method: Serve awaits `model.__del__`
        # on LRU eviction, while the garbage collector only ever calls the
        # class's __del__ (which must not be a coroutine).
        self.__del__ = self._evict

    @property
    def ref(self) -> AdapterRef:
        return self._state.ref

    @property
    def users(self) -> int:
        return self._state.users

    @property
    def evicted(self) -> bool:
        return self._state.evicted

    def acquire(self) -> None:
        self._state.users += 1
        self._state.idle.clear()

    def release(self) -> None:
        self._state.users -= 1
        if self._state.users == 0:
            self._state.idle.set()

    async def _evict(self) -> None:
        self._on_evict(self._state)


def _estimated_tokens(inp: GenerateInput) -> int:
    """A token per 4 characters of the prompt (or its ids), before it is tokenized."""
    if inp.prompt_token_ids is not None:
        return len(inp.prompt_token_ids)
    if inp.messages is not None:
        return sum(-(-len(c) // 4) for _, c in inp.messages)
    return -(-len(inp.prompt or "") // 4)


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


def adapter_to_proto(r: AdapterRecord, *, full: bool = True) -> generation_pb2.Adapter:
    """The adapter as the API shows it. `full=False` (a tenant key) leaves out what
    only the operator needs: where it was registered from (a server path), its
    metadata (which can name its owner, e.g. the LoRAAdapter resource), and a base
    model given as a filesystem path is shown by its folder name only."""
    reply = generation_pb2.Adapter(
        id=r.id,
        name=r.name,
        version=r.version,
        content_sha256=r.content_sha256,
        rank=r.rank,
        target_modules=list(r.target_modules),
        base_model=r.base_model if full else _public_base_model(r.base_model),
        size_bytes=r.size_bytes,
        registered_at=r.registered_at,
    )
    if full:
        reply.source_path = r.source_path
        reply.metadata.update(r.metadata)
    return reply


def _public_base_model(base: str) -> str:
    """A hub name (`org/model`) as is; a filesystem path by its last component."""
    if base.startswith(("/", "~", ".")) or "\\" in base or base.count("/") > 1:
        return PurePosixPath(base.replace("\\", "/")).name
    return base


class GenerationServicer:
    """Implements hybridserve.v1.GenerationService and grpc.health.v1.Health.

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
        cfg = (
            config
            if isinstance(config, HybridServeConfig)
            else HybridServeConfig.model_validate(config)
        )
        obs.set_enabled(cfg.observability.metrics_enabled)
        model_dir = model_dir_for(cfg)
        rank = replica_rank()
        #: A base-pool replica: LoRA off, serves requests that name no adapter.
        self.base_only = rank is not None and rank < cfg.serve.base_pool_replicas
        if self.base_only:
            cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(
                update={"enable_lora": False})})
            logger.info("replica rank %s is in the base pool: LoRA off", rank)
        if engine is None:
            from hybridserve.generation.vllm_engine import VLLMEngine

            engine = VLLMEngine(cfg, model_dir)
        self.config = cfg
        self.service = GenerationService(cfg, engine, AdapterRegistry.from_config(cfg, model_dir))
        self.tenancy = tenancy or Tenancy.from_config(cfg, metrics_service=self.metrics_service)
        self._evictions = 0
        self._prefetches = 0
        #: adapter id -> the state of an adapter loaded in this replica's engine
        #: (also while it drains after an eviction)
        self._residents: dict[str, _AdapterState] = {}
        #: adapter id -> the task that unloads it once its requests have ended
        self._unloads: dict[str, asyncio.Task] = {}
        #: serializes loading and unloading one adapter
        self._adapter_locks: dict[str, asyncio.Lock] = {}
        #: requests in flight that name no adapter
        self._base_users = 0
        self._sampler: asyncio.Task | None = None
        #: client_request_id -> the server's request id, for the last requests
        #: that sent one (introspection: `stats()`).
        self._recent_ids: OrderedDict[str, str] = OrderedDict()

    async def start(self) -> None:
        await self.service.engine.start()
        if obs.is_enabled():
            self._sampler = asyncio.create_task(self._sample_engine_load_forever())

    async def shutdown(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        for task in list(self._unloads.values()):
            task.cancel()
        self.service.close()
        obs.release_replica(replica_id())
        await self.service.engine.shutdown()
        await self.tenancy.close()

    # -- engine load gauges --------------------------------------------------

    def sample_engine_load(self) -> None:
        """Reports the engine's queue (waiting, running, batch size) to the gauges."""
        stats = self.service.engine.stats()
        obs.set_engine_load(
            replica_id(),
            waiting=stats.waiting_requests,
            running=stats.running_requests,
            capacity=self.config.engine.max_num_seqs,
        )

    async def _sample_engine_load_forever(self) -> None:
        interval = self.config.observability.engine_stats_interval_s
        while True:  # cancelled by shutdown
            try:
                self.sample_engine_load()
            except Exception:  # noqa: BLE001 - a metrics sample must never end the loop
                logger.warning("sampling the engine load failed", exc_info=True)
            await asyncio.sleep(interval)

    # -- adapters (multiplexed) --------------------------------------------

    async def load_adapter(self, adapter_id: str) -> ResidentAdapter:
        """Loads an adapter into this replica. Under Serve this is wrapped in
        `serve.multiplexed`, which keeps at most `engine.max_loras` per replica (what
        one batch can hold) and evicts the least recently used."""
        # The registry stats (and may read) its record: off the loop.
        record = await self.service.run_blocking(self.service.registry.get, adapter_id)
        ref = self.service.adapter_ref(record)
        lock = self._adapter_locks.setdefault(ref.adapter_id, asyncio.Lock())
        async with lock:
            state = self._residents.get(ref.adapter_id)
            if state is not None and state.ref.int_id == ref.int_id:
                # Still in the engine (evicted and draining, or outside Serve, where
                # this runs for every request): use it, and keep it.
                state.evicted = False
                return ResidentAdapter(state, self._evict)
            start = time.perf_counter()
            try:
                if self.config.adapters.node_cache_dir is not None:
                    from hybridserve.generation.node_cache import local_copy

                    local = await asyncio.to_thread(
                        local_copy, record, self.config.adapters.node_cache_dir)
                    ref = replace(ref, path=str(local))
                await self.service.engine.load_adapter(ref)
            except BaseException:
                obs.adapter_loaded(ref.adapter_id, time.perf_counter() - start, ok=False)
                raise
            obs.adapter_loaded(ref.adapter_id, time.perf_counter() - start, ok=True)
            obs.set_resident(replica_id(), ref.adapter_id, True)
            state = self._residents[ref.adapter_id] = _AdapterState(ref)
            return ResidentAdapter(state, self._evict)

    def _evict(self, state: _AdapterState) -> None:
        """Serve evicted the adapter: unload it once its requests have ended."""
        state.evicted = True
        adapter_id = state.ref.adapter_id
        if adapter_id not in self._unloads:
            self._unloads[adapter_id] = asyncio.create_task(self._unload_when_idle(state))

    async def _unload_when_idle(self, state: _AdapterState) -> None:
        adapter_id = state.ref.adapter_id
        try:
            # NOTE: no timeout: every request ends by its deadline
            # (serve.request_timeout_s), and unloading under a live request would
            # only make vLLM load it again from disk.
            await state.idle.wait()
            async with self._adapter_locks.setdefault(adapter_id, asyncio.Lock()):
                if not state.evicted or self._residents.get(adapter_id) is not state:
                    return  # loaded again while it drained
                del self._residents[adapter_id]
                await self.service.engine.unload_adapter(state.ref)
        except Exception:  # noqa: BLE001 - a background task: log, never raise into nothing
            logger.warning("unloading adapter %s failed", adapter_id, exc_info=True)
            return
        finally:
            if self._unloads.get(adapter_id) is asyncio.current_task():
                del self._unloads[adapter_id]
        self._evicted(adapter_id)

    def _evicted(self, adapter_id: str) -> None:
        self._evictions += 1
        obs.adapter_evicted(adapter_id)
        obs.set_resident(replica_id(), adapter_id, False)
        logger.info("evicted adapter %s from replica %s", adapter_id, replica_id())

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
            self._prefetches += 1
            await self.load_adapter(adapter_id)
        return replica_id()

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
                lease.tokens = _estimated_tokens(inp)

            def charge(n_prompt: int) -> None:
                # Tokenizing is paid for, also when the prompt is then refused.
                if lease is not None:
                    lease.tokens = n_prompt

            prepared = await self.service.run_blocking(self.service.prepare, inp, charge)
            if prepared.client_request_id:
                logger.info("request %s is the client's %r", prepared.request_id,
                            prepared.client_request_id)
                self._recent_ids[prepared.client_request_id] = prepared.request_id
                while len(self._recent_ids) > _RECENT_IDS:
                    self._recent_ids.popitem(last=False)
            if prepared.adapter is not None:
                if self.base_only:
                    raise Unavailable(
                        "this replica is in the base pool and serves no adapter; retry (the "
                        "router sends adapter requests to the other replicas)",
                        reason="BASE_POOL_REPLICA", retry_after=0.1)
                resident = await self.load_adapter(prepared.adapter.id)
                resident.acquire()
            else:
                self._base_users += 1
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
                            replica_id=replica_id(),
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
                self._base_users -= 1

    @grpc_unary
    async def ListAdapters(
        self, request: generation_pb2.ListAdaptersRequest, grpc_context: Any = None
    ) -> generation_pb2.ListAdaptersResponse:
        principal = await self.tenancy.authenticate(grpc_context)
        async with self.tenancy.admit(principal):
            records = await self._call(self.service.registry.list)
        # A tenant sees only what it may use.
        records = [r for r in records if principal.may_use(r.id)]
        return generation_pb2.ListAdaptersResponse(
            adapters=[adapter_to_proto(r, full=principal.is_admin) for r in records])

    @grpc_unary
    async def RegisterAdapter(
        self, request: generation_pb2.RegisterAdapterRequest, grpc_context: Any = None
    ) -> generation_pb2.RegisterAdapterResponse:
        principal = await self.tenancy.authenticate(grpc_context)

        def register():
            # The registry validates name and path (empty ones included) with its own messages.
            return self.service.registry.register(
                request.name, request.path, version=request.version or None,
                metadata=dict(request.metadata),
            )

        record, created = await self._admin_action(
            principal, "RegisterAdapter", f"adapter/{request.name[:64]}", register,
            lambda result: f"{result[0].id} ({'new' if result[1] else 'already registered'})",
        )
        return generation_pb2.RegisterAdapterResponse(
            adapter=adapter_to_proto(record), created=created
        )

    @grpc_unary
    async def UnregisterAdapter(
        self, request: generation_pb2.UnregisterAdapterRequest, grpc_context: Any = None
    ) -> generation_pb2.UnregisterAdapterResponse:
        principal = await self.tenancy.authenticate(grpc_context)

        def unregister():
            granted = self.tenancy.store.tenants_granted(request.id)
            if granted:
                raise FailedPrecondition(
                    f"adapter {request.id!r} is still granted to {', '.join(granted)}; revoke "
                    "those grants first (`hybridserve admin grants revoke TENANT ADAPTER`)",
                    reason="ADAPTER_IN_USE", metadata={"tenants": ",".join(granted)[:500]},
                )
            self.service.registry.unregister(request.id)

        await self._admin_action(principal, "UnregisterAdapter", f"adapter/{request.id[:200]}",
                                 unregister)
        return generation_pb2.UnregisterAdapterResponse()

    async def _admin_action(self, principal, action: str, target: str, fn, describe=None):
        """Runs an admin-only registry action off the loop and audits it (also when refused)."""
        store = self.tenancy.store
        try:
            principal.require_admin(action)
            result = await self._call(fn)
        except HybridServeError as e:
            await self._call(store.record_audit, principal.actor, action, target, e.code, e.message)
            raise
        await self._call(store.record_audit, principal.actor, action, target, "OK",
                         describe(result) if describe else "")
        return result

    async def check_credentials(self, token: str, admit: bool = False) -> dict:
        """Serve handle only: authenticates `token` on this replica, and with `admit`
        takes one request of its quota (tests of the revocation bound and of shared
        quotas across replicas)."""
        try:
            p = await self.tenancy.authenticate_token(token)
            if admit:
                async with self.tenancy.admit(p):
                    pass
            return {"replica_id": replica_id(), "code": "OK", "tenant": p.tenant_id}
        except HybridServeError as e:
            return {"replica_id": replica_id(), "code": e.code, "reason": e.reason,
                    "retry_after": e.retry_after}

    @staticmethod
    async def _call(fn, *args, **kwargs):
        # Registry calls hash and copy files: keep them off the event loop that
        # streams tokens.
        return await asyncio.to_thread(fn, *args, **kwargs)

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

    def routing_stats(self) -> dict:
        """What every router needs of this replica (Serve's `record_routing_stats`):
        adapter slots (0 in the base pool), requests in flight per adapter ("" = none)
        and in all, and when this was taken."""
        active = {aid: st.users for aid, st in self._residents.items()
                  if st.users and not st.evicted}
        if self._base_users:
            active[""] = self._base_users
        return {
            "at": time.time(),
            "slots": 0 if self.base_only else self.config.engine.max_loras,
            "resident": sorted(aid for aid, st in self._residents.items() if not st.evicted),
            "active": active,
            "ongoing": sum(active.values()) + sum(
                st.users for st in self._residents.values() if st.evicted),
        }

    # -- introspection (Serve handle only, not on the gRPC API) -----------

    async def stats(self, reset_peak: bool = False) -> dict:
        """This replica's id, engine counters, resident adapters, evictions, and the
        server request ids of the last requests that sent a client_request_id.
        `reset_peak` starts a new window for `engine_running_max` after reading."""
        engine = self.service.engine
        out = {
            "replica_id": replica_id(),
            "base_only": self.base_only,
            "evictions": self._evictions,
            "prefetches": self._prefetches,
            "request_ids": dict(self._recent_ids),
            **asdict(engine.stats()),
        }
        out["rss_bytes"] = _rss_bytes()
        if reset_peak and hasattr(engine, "reset_running_peak"):
            engine.reset_running_peak()
        return out
