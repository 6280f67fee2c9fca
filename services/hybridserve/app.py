"""Builds the Ray Serve applications from config. Serve is applied here only.

The service classes stay plain (testable without Serve); this module decides
how they are deployed: replicas, concurrency, resources, routing and
multiplexing all come from `HybridServeConfig`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from hybridserve.config import HybridServeConfig
from hybridserve.generation.servicer import GenerationServicer
from hybridserve.generation.vllm_engine import engine_environment

#: Serve app names. With more than one app, gRPC clients send `application`.
GENERATION_APP = "generation"

#: The servicers Serve's gRPC proxy exposes. Server reflection is built into
#: the proxy (gRPCOptions.enable_reflection); health is answered by our
#: deployments (`Check` / `Watch`).
GRPC_SERVICER_FUNCTIONS = [
    "hybridserve.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def generation_deployment(config: HybridServeConfig):
    """The generation deployment: a GenerationServicer per replica, with Serve
    multiplexing (model id = adapter id) and adapter-affine routing."""
    max_adapters = config.engine.max_cpu_loras

    class GenerationDeployment(GenerationServicer):
        # Serve awaits an async constructor: the replica reports ready only
        # once its engine has started.
        async def __init__(self, config: dict):  # type: ignore[misc]
            GenerationServicer.__init__(self, config)
            await self.start()

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def load_adapter(self, adapter_id: str):
            return await GenerationServicer.load_adapter(self, adapter_id)

        async def check_health(self) -> None:
            await self.service.engine.check_health()

        async def __del__(self):
            await self.shutdown()

    return serve.deployment(
        GenerationDeployment,
        name="GenerationService",
        num_replicas=config.serve.generation_replicas,
        max_ongoing_requests=config.serve.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": config.serve.cpus_per_replica,
            "runtime_env": {"env_vars": engine_environment(config)},
        },
        request_router_config=RequestRouterConfig(
            request_router_class="hybridserve.generation.routing:AdapterRouter",
        ),
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    )


def build_generation_app(config: HybridServeConfig) -> Any:
    """The bound generation application, ready for `serve.run`."""
    return generation_deployment(config).bind(config.model_dump(mode="json"))


def grpc_options(config: HybridServeConfig):
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=config.serve.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS)
