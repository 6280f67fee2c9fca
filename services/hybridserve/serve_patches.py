"""Retryable status codes from Serve's gRPC proxy for failures it calls INTERNAL.

Serve 2.60's gRPC proxy maps a replica that died or cannot be reached
(`RayActorError`: ActorDiedError, ActorUnavailableError) to INTERNAL, which tells
a caller that retrying is pointless. It is the opposite: Serve replaces the
replica and routes the retry to another one. Backpressure (`max_queued_requests`
exceeded) becomes RESOURCE_EXHAUSTED but without a retry delay.

The fix: in the proxy process, wrap the two functions the proxy uses for a
failed call (`get_grpc_response_status`, `set_grpc_code_and_details`):

- a dead or unreachable replica is UNAVAILABLE, with ErrorInfo reason
  REPLICA_UNAVAILABLE and a RetryInfo;
- backpressure stays RESOURCE_EXHAUSTED and gains ErrorInfo OVERLOADED and a
  RetryInfo, in the standard `grpc-status-details-bin` trailer.

Every other status is left as Serve made it.

NOTE: Serve has no public hook for the proxy's status mapping, so this wraps
private names of `ray.serve._private.proxy`. `register()` checks that they exist
and does nothing (with a warning) if not; tests/integration/test_pressure.py kills
a replica under load through the real proxy, so a Serve upgrade that breaks this
fails there. It runs in the proxy because Serve imports every entry of
`grpc_servicer_functions` there; `add_to_proxy` is one of them.
"""

from __future__ import annotations

import dataclasses
import logging

from hybridserve import proxy_guard
from hybridserve.errors import ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

_MARK = "__hybridserve_status_fix__"
#: Seconds a caller may wait before retrying (RetryInfo).
REPLICA_RETRY_S = 1.0
OVERLOAD_RETRY_S = 1.0


def mapped_error(exc: BaseException):
    """The platform error for a proxy-side failure Serve maps badly, or None."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, RayActorError):
        return Unavailable(
            "the replica serving this request stopped or cannot be reached "
            f"({type(exc).__name__}); retry: the platform replaces it and routes the retry "
            "to another replica", reason="REPLICA_UNAVAILABLE", retry_after=REPLICA_RETRY_S)
    if isinstance(exc, BackPressureError):
        return ResourceExhausted(
            "the platform is at capacity: every replica is busy and the queue is full "
            "(serve.max_queued_requests); retry after the delay given",
            reason="OVERLOADED", retry_after=OVERLOAD_RETRY_S)
    return None


def register() -> bool:
    """Applies the wrappers in this process (idempotent). False if Serve lacks them."""
    try:
        from ray.serve._private import proxy
        from ray.serve._private.proxy_request_response import ResponseStatus
    except ImportError:
        logger.warning("hybridserve: Serve's proxy module moved; status codes stay Serve's")
        return False
    get_status = getattr(proxy, "get_grpc_response_status", None)
    set_status = getattr(proxy, "set_grpc_code_and_details", None)
    if get_status is None or set_status is None:
        logger.warning("hybridserve: Serve's proxy lacks the status functions; codes stay Serve's")
        return False
    if getattr(get_status, _MARK, False):
        return True

    @dataclasses.dataclass(frozen=True)
    class _Status(ResponseStatus):
        #: the platform error whose rich details go in the trailer
        error: BaseException | None = None

    def get_grpc_response_status(exc, request_timeout_s, request_id):
        status = get_status(exc, request_timeout_s, request_id)
        err = mapped_error(exc)
        if err is None:
            return status
        import grpc

        return _Status(code=grpc.StatusCode[err.code], is_error=True, message=err.message,
                       error=err)

    def set_grpc_code_and_details(context, status):
        set_status(context, status)
        err = getattr(status, "error", None)
        if err is not None:
            # Lazily, as in proxy_guard: grpc_errors pulls in the metrics and the config.
            from hybridserve.grpc_errors import STATUS_DETAILS_KEY, rich_status

            context.set_trailing_metadata(
                [(STATUS_DETAILS_KEY, rich_status(err).SerializeToString())])

    for fn in (get_grpc_response_status, set_grpc_code_and_details):
        setattr(fn, _MARK, True)
    proxy.get_grpc_response_status = get_grpc_response_status
    proxy.set_grpc_code_and_details = set_grpc_code_and_details
    return True


_HTTP_MARK = "__hybridserve_http_routes__"


def http_routes_only() -> bool:
    """Makes Serve's HTTP proxy route only to the HTTP apps' ingresses (the
    OpenAI-compatible API, `topology.HTTP_INGRESSES`); a request for a gRPC app's prefix (`/admin`,
    `/generation`, ...) gets the proxy's own 404 instead of reaching its replicas.

    Why: every app needs a route prefix for Serve's gRPC proxy to route to it, and the
    HTTP proxy then routes the same prefixes to the apps' replicas, which have no HTTP
    handler: measured on Serve 2.60, such a request held a generation or RAG replica's
    slot until the request timeout, with no key checked.

    NOTE: `ProxyRouter.match_route` is what only the HTTP proxy calls (the gRPC proxy
    matches by app name), so the class-level wrapper leaves gRPC routing alone.
    Idempotent; False (with a warning) if Serve lacks it."""
    try:
        from ray.serve._private.proxy_router import ProxyRouter
    except ImportError:
        logger.warning("hybridserve: Serve's proxy router moved; the HTTP port routes every app")
        return False
    original = getattr(ProxyRouter, "match_route", None)
    if original is None:
        logger.warning("hybridserve: Serve's proxy router lacks match_route; the HTTP port "
                       "routes every app")
        return False
    if getattr(original, _HTTP_MARK, False):
        return True
    from hybridserve import topology

    def match_route(self, target_route):
        matched = original(self, target_route)
        if matched is None:
            return None
        # By the deployment the route leads to (an HTTP app's ingress), never by the
        # prefix's shape; anything unexpected routes nowhere.
        endpoint = getattr(self, "route_info", {}).get(matched[0])
        if getattr(endpoint, "name", None) not in topology.HTTP_INGRESSES:
            return None
        return matched

    setattr(match_route, _HTTP_MARK, True)
    ProxyRouter.match_route = match_route
    return True


def no_client_overrides() -> bool:
    """Serve's HTTP proxy honours two client headers that are the operator's to decide:
    `x-request-timeout-seconds` (0 or less turns the proxy's timeout off) and
    `x-request-disconnect-disabled: ?1` (a client that hangs up no longer cancels its
    request, so the engine keeps generating for nobody). Here a client may shorten its
    timeout, never lengthen or disable it, and a hang-up always cancels.

    NOTE: wraps the two parsers `ray.serve._private.proxy` calls per request (module
    globals, so the proxy's next call uses these). Idempotent; False if Serve lacks them."""
    try:
        from ray.serve._private import proxy
    except ImportError:
        return False
    parse_timeout = getattr(proxy, "parse_request_timeout_header", None)
    if parse_timeout is None or not hasattr(proxy, "parse_disconnect_disabled_header"):
        logger.warning("hybridserve: Serve's proxy lacks the header parsers; its client "
                       "timeout and disconnect hints stay on")
        return False
    if getattr(parse_timeout, _HTTP_MARK, False):
        return True

    def parse_request_timeout_header(headers, default_timeout_s):
        asked = parse_timeout(headers, default_timeout_s)
        if asked is None or (default_timeout_s is not None and asked > default_timeout_s):
            return default_timeout_s
        return asked

    def parse_disconnect_disabled_header(headers) -> bool:
        return False

    for fn in (parse_request_timeout_header, parse_disconnect_disabled_header):
        setattr(fn, _HTTP_MARK, True)
    proxy.parse_request_timeout_header = parse_request_timeout_header
    proxy.parse_disconnect_disabled_header = parse_disconnect_disabled_header
    return True


def guard_http() -> bool:
    """Puts `proxy_guard.http_refusal` in front of Serve's HTTP proxy, and bounds the body
    it buffers per request.

    Why: Serve's HTTP proxy copies a request's body into an unbounded queue before any
    replica looks at it, so a keyless client could make the proxy (which also serves
    gRPC) hold any amount of memory, and every keyless request took a replica slot to
    learn it is a 401. Now a request without a well-formed key, or with a declared body
    over the bound, is answered by the proxy itself; a body that streams in past the
    bound (no Content-Length) is cut off and the request ends as a client disconnect.

    NOTE: wraps `HTTPProxy.__call__` (the ASGI entry uvicorn calls per request) and
    `HTTPProxy.proxy_asgi_receive` (what fills the queue). Idempotent; False if Serve
    lacks them."""
    try:
        from ray.serve._private.proxy import HTTPProxy
    except ImportError:
        logger.warning("hybridserve: Serve's HTTP proxy moved; its requests are not guarded")
        return False
    call = getattr(HTTPProxy, "__call__", None)
    receive_into = getattr(HTTPProxy, "proxy_asgi_receive", None)
    if call is None or receive_into is None:
        logger.warning("hybridserve: Serve's HTTP proxy lacks its ASGI entry; its requests "
                       "are not guarded")
        return False
    if getattr(call, _HTTP_MARK, False):
        return True
    import json

    max_body = proxy_guard.http_max_body()

    async def __call__(self, scope, receive, send):
        refusal = proxy_guard.http_refusal(scope, max_body)
        if refusal is None:
            return await call(self, scope, receive, send)
        status, body = refusal
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def proxy_asgi_receive(self, receive, queue):
        taken = 0

        async def bounded():
            nonlocal taken
            message = await receive()
            if message.get("type") == "http.request":
                taken += len(message.get("body") or b"")
                if taken > max_body:
                    return {"type": "http.disconnect"}
            return message

        return await receive_into(self, bounded, queue)

    for fn in (__call__, proxy_asgi_receive):
        setattr(fn, _HTTP_MARK, True)
    HTTPProxy.__call__ = __call__
    HTTPProxy.proxy_asgi_receive = proxy_asgi_receive
    return True


def add_to_proxy(servicer, server) -> None:
    """A `grpc_servicer_functions` entry: adds no service; in the proxy process that
    imports it, applies `register()` and the HTTP proxy's guards (`http_routes_only()`,
    `no_client_overrides()`, `guard_http()`), and puts the proxy guard
    (`hybridserve.proxy_guard`) in front of every service registered after it.

    NOTE: keep it the first hybridserve entry of `grpc_servicer_functions`: services
    registered before it are not guarded."""
    register()
    http_routes_only()
    no_client_overrides()
    guard_http()
    proxy_guard.install(server)
