"""The platform's topology, declared once: its Serve applications, the gRPC service
each serves, its Serve deployments and the apps it calls, and the metadata names
the SDK and the servers share on the wire.

`hybridserve.app` builds, `hybridserve.platform` starts, `hybridserve.serve_config`
prints and the RAG gateway's handles call what is declared here; the config's
`serve.apps` accepts the names declared here; the SDK sends them.

NOTE: standard library only. The client SDK imports this module, and
`pip install hybridserve` (the SDK alone) has neither Ray nor pydantic nor any
server module.

Adding an app is one `_declare(App(...))` entry below, plus its builder
`hybridserve.app:<name>_app` (and the chart's copy of the gRPC servicer functions,
helm/hybridserve/templates/_helpers.tpl, which a unit test compares with this one).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The protobuf package of every service (protos/hybridserve/v1/).
PROTO_PACKAGE = "hybridserve.v1"


@dataclass(frozen=True)
class App:
    """One Serve application of the platform."""

    #: The Serve app name: its route prefix (`/<name>`), the `application` metadata
    #: that picks it at Serve's gRPC proxy, and its builder (`builder`).
    name: str
    #: The gRPC service it serves, short name (in PROTO_PACKAGE); "" for an HTTP app.
    service_name: str
    #: The generated module of `hybridserve.v1` with the service (`<proto>_pb2_grpc`);
    #: "" for an HTTP app.
    proto: str
    #: Its Serve deployments, the ingress (the one serving the gRPC service) first.
    deployments: tuple[str, ...]
    #: The apps it calls through Serve handles, by their default names.
    calls: tuple[str, ...] = ()
    #: Runs on every platform; otherwise `serve.apps` chooses it.
    always: bool = False

    @property
    def is_http(self) -> bool:
        """Served on Serve's HTTP proxy (a FastAPI ingress), not its gRPC proxy."""
        return not self.service_name

    @property
    def service(self) -> str:
        """The full gRPC service name (what grpc.health.v1 and reflection name)."""
        return f"{PROTO_PACKAGE}.{self.service_name}" if self.service_name else ""

    def route_prefix(self, instance: str = "") -> str:
        """The Serve route prefix of the app (or of its instance named `instance`).

        A gRPC app: `/<name>` (Serve's gRPC proxy routes only to apps that have one,
        though gRPC never uses the path). The HTTP app: `/v1`, where OpenAI's clients
        look (base URL `http://host:port/v1`); another instance of it `/<instance>/v1`.
        """
        instance = instance or self.name
        if not self.is_http:
            return f"/{instance}"
        return "/v1" if instance == self.name else f"/{instance}/v1"

    @property
    def ingress(self) -> str:
        """The deployment that serves the gRPC service (and its handle calls)."""
        return self.deployments[0]

    @property
    def servicer_function(self) -> str:
        """The import path Serve's gRPC proxy adds the service with."""
        return f"{PROTO_PACKAGE}.{self.proto}_pb2_grpc.add_{self.service_name}Servicer_to_server"

    @property
    def builder(self) -> str:
        """The `import_path` of the app's builder in a Serve config file."""
        return f"hybridserve.app:{self.name}_app"


_declared: list[App] = []


def _declare(app: App) -> App:
    _declared.append(app)
    return app


#: The retrieval app's batched query/document embedder (called by RetrievalService).
EMBEDDER_DEPLOYMENT = "Embedder"

# NOTE: the order of declaration is the order of the proxy's gRPC servicer functions
# and of the default `serve.apps` (both end up in the Serve config a cluster runs).
GENERATION = _declare(App("generation", "GenerationService", "generation", ("GenerationService",)))
RETRIEVAL = _declare(App("retrieval", "RetrievalService", "retrieval",
                         ("RetrievalService", EMBEDDER_DEPLOYMENT)))
RERANK = _declare(App("rerank", "RerankService", "rerank", ("RerankService",)))
#: The control plane; it creates and deletes tenants' knowledge in the retrieval app
#: when that runs.
ADMIN = _declare(App("admin", "AdminService", "admin", ("AdminService",),
                     calls=("retrieval",), always=True))
#: The RAG gateway, the applications' entry point (its generation app is
#: `rag.generation_app`).
RAG = _declare(App("rag", "RagService", "rag", ("RagService",),
                   calls=("retrieval", "rerank", "generation")))
#: The OpenAI-compatible HTTP API (FastAPI on Serve's HTTP proxy): chat, completions,
#: models, embeddings and RAG with citations, through the gateway's own domain code.
OPENAI = _declare(App("openai", "", "", ("OpenAIIngress",),
                      calls=("retrieval", "rerank", "generation")))

#: Every app, in declaration order.
APPS: tuple[App, ...] = tuple(_declared)
#: The apps that serve a gRPC service (all but the HTTP API).
GRPC_APPS: tuple[App, ...] = tuple(a for a in APPS if not a.is_http)
#: The deployments Serve's HTTP proxy may route to (`serve_patches.http_routes_only`).
HTTP_INGRESSES: tuple[str, ...] = tuple(a.ingress for a in APPS if a.is_http)
#: The apps that always run (the control plane), deployed first.
ALWAYS_APPS: tuple[str, ...] = tuple(a.name for a in APPS if a.always)
#: The apps `serve.apps` may choose (and its default: all of them).
OPTIONAL_APPS: tuple[str, ...] = tuple(a.name for a in APPS if not a.always)

#: Adds no service: gives a dead replica and backpressure retryable codes, and puts the
#: proxy guard in front of the services registered after it, so it comes first (see
#: `hybridserve.serve_patches.add_to_proxy`).
PROXY_PATCH_FUNCTION = "hybridserve.serve_patches.add_to_proxy"
#: grpc.health.v1, answered by every app's ingress (`Check` / `Watch`).
HEALTH_SERVICER_FUNCTION = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
#: The servicer functions Serve's gRPC proxy runs. Server reflection is built into
#: the proxy (gRPCOptions.enable_reflection).
GRPC_SERVICER_FUNCTIONS: tuple[str, ...] = (
    PROXY_PATCH_FUNCTION,
    *(a.servicer_function for a in APPS if not a.is_http),
    HEALTH_SERVICER_FUNCTION,
)


def app_named(name: str) -> App:
    """The declared app called `name` (KeyError if none)."""
    for app in APPS:
        if app.name == name:
            return app
    raise KeyError(name)


# -- names on the wire ---------------------------------------------------------------

#: gRPC metadata naming the Serve app a call is for; Serve's gRPC proxy routes by it
#: when several apps share the proxy.
APPLICATION_HEADER = "application"
#: gRPC metadata with the API key, `Bearer <key>`.
AUTHORIZATION_HEADER = "authorization"
#: gRPC metadata with the client's deadline in milliseconds: gRPC's own deadline stops
#: at Serve's proxy and never reaches a replica.
TIMEOUT_HEADER = "hybridserve-timeout-ms"
