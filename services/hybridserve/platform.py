"""Starts and stops the whole platform on this machine (what `hybridserve up` runs)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybridserve import localproc, topology
from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition, Unavailable
from hybridserve.models import model_dir_for, prepare_default_model
from hybridserve.observability.prometheus import PrometheusServer
from hybridserve.retrieval.weaviate_server import WeaviateServer
from hybridserve.tenancy.quotas import redact_url
from hybridserve.tenancy.redis_server import RedisServer

logger = logging.getLogger(__name__)


@dataclass
class LocalPlatform:
    """A running local platform."""

    config: HybridServeConfig
    #: The local weaviate-server, when this platform started one.
    weaviate: WeaviateServer | None = None
    #: The local Prometheus, when this platform started one (`--with-prometheus`).
    prometheus: PrometheusServer | None = None
    #: The local redis-server for the quota counters, when this platform started one.
    redis: RedisServer | None = None
    #: Where the first admin key was written, when this start created it.
    admin_key_created: Path | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.config.serve.grpc_host}:{self.config.serve.grpc_port}"

    @property
    def openai_base_url(self) -> str:
        """The OpenAI-compatible API's base URL (what `openai.OpenAI(base_url=...)` takes)."""
        host = self.config.serve.grpc_host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.config.serve.http_port}{topology.OPENAI.route_prefix()}"

    @property
    def metrics_url(self) -> str:
        """Ray's metrics endpoint: every metric of the platform, in Prometheus format."""
        return f"http://127.0.0.1:{self.config.observability.metrics_export_port}/metrics"

    def stop(self) -> None:
        import ray  # lazy: ray is a heavy import, needed only once a platform runs
        from ray import serve

        # NOTE: Serve first, so replicas close their Weaviate clients before it goes.
        try:
            serve.shutdown()
        finally:
            try:
                ray.shutdown()
            finally:
                try:
                    if self.weaviate is not None:
                        self.weaviate.stop()
                finally:
                    try:
                        if self.prometheus is not None:
                            self.prometheus.stop()
                    finally:
                        if self.redis is not None:
                            self.redis.stop()


def ensure_model(config: HybridServeConfig, progress=print) -> Path:
    """The base model folder, preparing the default model once if needed."""
    if config.model.path is not None:
        path = model_dir_for(config)
        if not (path / "config.json").is_file():
            raise FailedPrecondition(
                f"model.path {path} has no config.json; point it at a Hugging Face model "
                "folder, or unset it to use the default model"
            )
        return path
    return prepare_default_model(config.cache_dir, dtype=config.model.dtype, progress=progress)


def check_ports_free(config: HybridServeConfig) -> None:
    """Fails fast, before Ray starts, when a port the platform needs is taken."""
    ports = (
        ("gRPC", config.serve.grpc_port, "`hybridserve up --port N`, or serve.grpc_port"),
        ("HTTP", config.serve.http_port, "serve.http_port"),
        ("metrics", config.observability.metrics_export_port,
         "observability.metrics_export_port"),
    )
    for what, port, setting in ports:
        if reason := localproc.bind_error(port, config.serve.grpc_host):
            raise FailedPrecondition(
                f"the {what} port {port} on {config.serve.grpc_host} is in use ({reason}); "
                "stop whatever holds it (another `hybridserve up`?) or choose another port "
                f"({setting} in the config)"
            )


def start_weaviate(config: HybridServeConfig, progress=print) -> WeaviateServer | None:
    """Starts the local weaviate-server unless `weaviate.url` names an external one."""
    if config.weaviate.url:
        progress(f"using the external Weaviate at {config.weaviate.url}")
        return None
    server = WeaviateServer.from_config(config)
    progress(f"starting weaviate-server on 127.0.0.1:{server.http_port} (data: {server.data_dir}) ...")
    server.start(config.weaviate.startup_timeout_s)
    return server


def start_redis(config: HybridServeConfig, progress=print) -> RedisServer | None:
    """Starts the local redis-server for the quota counters unless
    `tenancy.redis_url` names an external Redis."""
    if config.tenancy_redis_url != f"unix://{config.redis_socket}":
        progress(f"using the external Redis at {redact_url(config.tenancy_redis_url)} for quotas")
        return None
    server = RedisServer(config.redis_socket.parent)
    progress(f"starting redis-server on {server.socket_path} (quota counters) ...")
    server.start()
    return server


def prepare_tenancy(config: HybridServeConfig, progress=print) -> Path | None:
    """Migrates the tenancy store and makes sure an admin key exists; returns the
    file of a newly created admin key."""
    # lazy: the tenancy store imports SQLAlchemy, heavy for callers that never prepare it
    from hybridserve.tenancy.bootstrap import ensure_admin_key
    from hybridserve.tenancy.store import TenancyStore

    store = TenancyStore(config.tenancy_database_url)
    try:
        store.migrate()
        boot = ensure_admin_key(store, config.admin_key_path, config.tenancy.admin_key_env)
    finally:
        store.close()
    if boot.from_env:
        progress(f"admin key {boot.from_env} from ${config.tenancy.admin_key_env} is registered")
    if boot.created_file:
        progress(f"created the first admin key in {boot.created_file} (mode 0600); the local "
                 "CLI uses it. Keep it secret: it manages every tenant.")
    return boot.created_file


def wait_healthy(address: str, service: str, timeout_s: float, application: str = "") -> None:
    """Polls grpc.health.v1 (of one Serve app) until SERVING; raises Unavailable after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=5,
                    metadata=[(topology.APPLICATION_HEADER, application)] if application else None,
                )
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


def wait_running(app: str, timeout_s: float) -> None:
    """Waits until Serve reports the app RUNNING (an app with no gRPC health service:
    the HTTP API); raises Unavailable after timeout_s."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = "no status"
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None:
            last = str(status.status)
            if last.endswith("RUNNING"):
                return
        time.sleep(1.0)
    raise Unavailable(f"the Serve app {app!r} did not start within {timeout_s:.0f}s (last "
                      f"status: {last}); see the Ray logs under /tmp/ray/session_latest/logs")


@contextlib.contextmanager
def cluster_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Sets `env` in this process while the local Ray cluster starts, then restores it.

    Serve's proxy and replicas read their settings (`serve.ray_env()`) from the
    environment they inherit from Ray's processes, which inherit it from this one
    at `ray.init`. Afterwards this process's environment is as it was, so that its
    later subprocesses (a CLI, a benchmark driver) do not get them: with
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 a driver's blocking handle calls
    (`.result()`) would fail. A variable the caller has set already is kept.
    """
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def start(
    config: HybridServeConfig,
    *,
    progress=print,
    health_timeout_s: float = 600,
    generation_apps: Mapping[str, HybridServeConfig] | None = None,
    rag_apps: Mapping[str, HybridServeConfig] | None = None,
    openai_apps: Mapping[str, HybridServeConfig] | None = None,
    with_prometheus: bool = False,
    prometheus_port: int | None = None,
) -> LocalPlatform:
    """Starts local Ray, Serve's gRPC proxy and the Serve apps; waits for health.

    Args:
        config: platform config; its serve section sets the ports, its
            observability section the metrics export port.
        generation_apps: app name -> config, to run several generation apps side
            by side (e.g. differently sized pools). Default: one app, `generation`.
        rag_apps: app name -> config of RAG gateways (each config's
            rag.generation_app names the generation app it answers with).
            Default: one app, `rag`, when serve.apps lists it.
        openai_apps: app name -> config of OpenAI-compatible HTTP APIs (the one named
            `openai` at /v1, another one at /<name>/v1). Default: one app, `openai`,
            when serve.apps lists it.
        with_prometheus: also start a local Prometheus that scrapes the platform
            and evaluates the shipped alert rules (on `prometheus_port`, default
            observability.prometheus_port).
    """
    import ray  # lazy: ray (and the app builders below, which import it) are heavy
    from ray import serve
    from ray.serve.api import RunTarget
    from ray.serve.config import HTTPOptions

    # Like Ray above: the app builders import Ray Serve (heavy), needed only to start.
    from hybridserve.app import build_app, grpc_options

    wanted = config.serve.apps
    given = {topology.GENERATION.name: generation_apps, topology.RAG.name: rag_apps,
             topology.OPENAI.name: openai_apps}
    # Serve apps to run, per declared app (the control plane first): name -> config.
    instances = {
        app: dict(given.get(app.name) or ({app.name: config} if app.always or app.name in wanted
                                           else {}))
        for app in sorted(topology.APPS, key=lambda a: not a.always)
    }
    if not ray.is_initialized():
        check_ports_free(config)
    if with_prometheus:
        # Before the slow part: a missing binary or a taken port fails now.
        PrometheusServer.from_config(config, prometheus_port).preflight()
    for app_config in instances[topology.GENERATION].values():
        ensure_model(app_config, progress=progress)
    admin_key_created = prepare_tenancy(config, progress)
    redis = start_redis(config, progress)
    weaviate = None
    try:
        weaviate = start_weaviate(config, progress) if topology.RETRIEVAL.name in wanted else None
        if not ray.is_initialized():
            progress("starting Ray ...")
            with cluster_environment(config.serve.ray_env()):
                ray.init(
                    namespace="hybridserve",
                    include_dashboard=False,
                    # Every metric of the platform (ours, Serve's, vLLM's, Ray's) is
                    # served here; Prometheus scrapes it.
                    _metrics_export_port=config.observability.metrics_export_port,
                    configure_logging=True,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
        serve.start(
            http_options=HTTPOptions(host=config.serve.grpc_host, port=config.serve.http_port,
                                     request_timeout_s=config.serve.request_timeout_s),
            grpc_options=grpc_options(config),
        )
        # NOTE: a route prefix is required: Serve's gRPC proxy only routes to apps
        # that have one, even though gRPC never uses the HTTP path.
        targets, services = [], {}
        for app, named in instances.items():
            for name, app_config in named.items():
                targets.append(RunTarget(build_app(app.name, app_config), name=name,
                                         route_prefix=app.route_prefix(name)))
                services[name] = app.service
        progress(f"deploying {', '.join(services)} (an engine takes ~30-60 s to start) ...")
        serve.run_many(targets)
        platform = LocalPlatform(config, weaviate, redis=redis, admin_key_created=admin_key_created)
        for name, service in services.items():
            if service:
                wait_healthy(platform.grpc_address, service, health_timeout_s, name)
            else:  # the HTTP API: no grpc.health.v1; Serve knows when it runs
                wait_running(name, health_timeout_s)
        if with_prometheus:
            platform.prometheus = start_prometheus(config, progress, prometheus_port)
    except BaseException:
        try:
            if weaviate is not None:
                weaviate.stop()
        finally:
            if redis is not None:
                redis.stop()
        raise
    return platform


def start_prometheus(
    config: HybridServeConfig, progress=print, port: int | None = None
) -> PrometheusServer:
    """Starts a local Prometheus that scrapes this platform's metrics export port."""
    server = PrometheusServer.from_config(config, port)
    progress(f"starting prometheus on 127.0.0.1:{server.port} (data: {server.data_dir}) ...")
    server.start()
    return server
