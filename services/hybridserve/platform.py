"""Starts and stops the whole platform on this machine (what `hybridserve up` runs)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition, Unavailable

logger = logging.getLogger(__name__)


@dataclass
class LocalPlatform:
    """A running local platform."""

    config: HybridServeConfig

    @property
    def grpc_address(self) -> str:
        return f"{self.config.serve.grpc_host}:{self.config.serve.grpc_port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def ensure_model(config: HybridServeConfig, progress=print) -> Path:
    """The base model folder, preparing the default model once if needed."""
    from hybridserve.generation.servicer import model_dir_for
    from hybridserve.models import prepare_default_model

    if config.model.path is not None:
        path = model_dir_for(config)
        if not (path / "config.json").is_file():
            raise FailedPrecondition(
                f"model.path {path} has no config.json; point it at a Hugging Face model "
                "folder, or unset it to use the default model"
            )
        return path
    return prepare_default_model(config.cache_dir, dtype=config.model.dtype, progress=progress)


def wait_healthy(address: str, service: str, timeout_s: float) -> None:
    """Polls grpc.health.v1 until SERVING; raises Unavailable after timeout_s."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(1.0)
    raise Unavailable(
        f"the platform at {address} did not become healthy within {timeout_s:.0f}s "
        f"(last answer: {last}); see the Ray logs under /tmp/ray/session_latest/logs"
    )


def start(config: HybridServeConfig, *, progress=print, health_timeout_s: float = 600) -> LocalPlatform:
    """Starts local Ray, Serve's gRPC proxy and the Serve apps; waits for health."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from hybridserve.app import GENERATION_APP, build_generation_app, grpc_options

    ensure_model(config, progress=progress)
    if not ray.is_initialized():
        progress("starting Ray ...")
        ray.init(
            namespace="hybridserve",
            include_dashboard=False,
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    serve.start(
        http_options=HTTPOptions(host=config.serve.grpc_host, port=config.serve.http_port),
        grpc_options=grpc_options(config),
    )
    progress("deploying the generation service (the engine takes ~30-60 s to start) ...")
    serve.run(
        build_generation_app(config), name=GENERATION_APP, route_prefix=f"/{GENERATION_APP}"
    )
    platform = LocalPlatform(config)
    wait_healthy(platform.grpc_address, "hybridserve.v1.GenerationService", health_timeout_s)
    return platform
