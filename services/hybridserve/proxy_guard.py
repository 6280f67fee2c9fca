"""The gRPC proxy's own admission: what a caller without a valid-looking key can hold.

Serve's gRPC proxy routes every call to a replica, and a replica is where the key is
checked. So, before this guard, a client with no key could hold replica capacity
(a health `Watch` held one of a replica's `max_ongoing_requests` for its whole
life) and have the proxy parse and forward anything. The guard runs in the proxy
process, in front of Serve's handler for every method, and decides before a
request is routed:

- **No key, or a malformed one**: refused at once with UNAUTHENTICATED, without
  reaching a replica, except grpc.health.v1 (probes need no key).
- **Health `Watch`** is answered by the proxy itself: it asks the app's replica
  with one short `Check` every `poll_s`, and streams the status when it changes, for
  at most `watch_s`. A watcher holds no replica slot between polls.
- **Keyless calls** (health checks and watches) are limited to `max_keyless` at once
  per proxy; past it, RESOURCE_EXHAUSTED (reason KEYLESS_LIMIT) with RetryInfo.
- **One connection** holds at most `max_per_connection` calls at once; past it,
  RESOURCE_EXHAUSTED (reason CONNECTION_LIMIT) with RetryInfo.

Message sizes are bounded by gRPC itself (`serve.max_message_bytes`, Serve's
RAY_SERVE_GRPC_MAX_MESSAGE_SIZE): gRPC refuses a larger message with
RESOURCE_EXHAUSTED before any handler runs.

NOTE: Serve has no public hook in front of its proxy's handlers. The guard wraps
`service_handler_factory` of Serve's gRPC server object, which Serve hands to every
`grpc_servicer_functions` entry (`hybridserve.serve_patches.add_to_proxy` is the
first of ours, so every service registered after it is guarded). `install()`
checks the attribute exists and otherwise leaves the proxy as it is, with a
warning; tests/integration/test_hostile.py exercises it through the real proxy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import dataclass

from hybridserve import topology
from hybridserve.errors import ResourceExhausted, Unauthenticated
from hybridserve.health import watch_health
from hybridserve.tenancy import keys

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_CHECK = HEALTH_PREFIX + "Check"
HEALTH_WATCH = HEALTH_PREFIX + "Watch"
#: Seconds a refused caller is told to wait (RetryInfo).
RETRY_S = 1.0
_MARK = "__hybridserve_guard__"


@dataclass(frozen=True)
class GuardLimits:
    """The guard's settings; the platform passes them as environment variables of
    the Ray cluster (`ServeConfig.ray_env`), which the proxy process reads."""

    max_keyless: int = 32
    max_per_connection: int = 256
    watch_s: float = 30.0
    poll_s: float = 2.0

    ENV = {
        "max_keyless": "HYBRIDSERVE_PROXY_MAX_KEYLESS",
        "max_per_connection": "HYBRIDSERVE_PROXY_MAX_PER_CONNECTION",
        "watch_s": "HYBRIDSERVE_HEALTH_WATCH_S",
        "poll_s": "HYBRIDSERVE_HEALTH_POLL_S",
    }

    @classmethod
    def from_env(cls, env=os.environ) -> GuardLimits:
        values = {}
        for name, var in cls.ENV.items():
            raw = env.get(var, "").strip()
            if raw:
                try:
                    number = float(raw)
                    if not math.isfinite(number) or number <= 0:
                        raise ValueError(raw)
                    values[name] = type(getattr(cls, name))(number)
                except (ValueError, OverflowError):
                    logger.warning("hybridserve: %s=%r is not a positive number; using the "
                                   "default", var, raw)
        return cls(**values)


def credential_problem(metadata) -> BaseException | None:
    """Unauthenticated if the call carries no well-formed `authorization: Bearer
    <key>` (the same messages as the replicas' check), else None. Whether the key
    exists is for the replica to say: that needs the tenancy store."""
    values = [v for k, v in (metadata or ())
              if isinstance(k, str) and k.lower() == topology.AUTHORIZATION_HEADER]
    if not values:
        return Unauthenticated(
            "no API key: send the metadata `authorization: Bearer <key>` (the SDK takes "
            "api_key= or $HYBRIDSERVE_API_KEY)", reason="API_KEY_MISSING")
    value = values[0]
    if len(values) > 1 or not isinstance(value, str) or len(value) > 256:
        return Unauthenticated("send exactly one `authorization: Bearer <key>` metadata entry",
                               reason="API_KEY_MALFORMED")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return Unauthenticated("the `authorization` metadata must be `Bearer <key>`",
                               reason="API_KEY_MALFORMED")
    try:
        keys.parse(token.strip())
    except keys.MalformedKey as e:
        return Unauthenticated(f"{e}; check the key you sent", reason="API_KEY_MALFORMED")
    return None


# -- Serve's HTTP proxy (the OpenAI-compatible API) -------------------------------------

#: Paths Serve's HTTP proxy answers itself (`/-/healthz`, `/-/routes`), without a key.
HTTP_PROXY_PATHS = "/-/"


def http_max_body(env=os.environ) -> int:
    """The most request-body bytes the HTTP proxy takes per request: serve.max_message_bytes
    (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, the gRPC proxy's own bound per call)."""
    try:
        return max(64 * 1024, int(env.get("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "")))
    except ValueError:
        return 4 * 1024 * 1024


def http_refusal(scope: dict, max_body: int) -> tuple[int, dict] | None:
    """What Serve's HTTP proxy answers itself, before routing (None: route it). A request
    with no well-formed `Authorization: Bearer <key>` gets a 401, one whose
    Content-Length is over `max_body` a 413, both as OpenAI's error object, without
    reaching a replica or buffering the body."""
    if scope.get("type") != "http" or scope.get("path", "").startswith(HTTP_PROXY_PATHS):
        return None
    headers = scope.get("headers") or ()
    auth = [(topology.AUTHORIZATION_HEADER, v.decode("latin-1")) for k, v in headers
            if k.lower() == b"authorization"]
    err = credential_problem(auth)
    if err is not None:
        message = err.message.replace("the metadata", "the header").replace(
            "metadata", "header").replace(" (the SDK takes api_key= or $HYBRIDSERVE_API_KEY)",
                                          " (OpenAI's clients: api_key=...)")
        return 401, {"error": {"message": message, "type": "authentication_error",
                               "param": None, "code": err.reason.lower()}}
    for k, v in headers:
        if k.lower() == b"content-length":
            if not v.isdigit() or int(v) > max_body:
                return 413, {"error": {
                    "message": f"the request body is larger than {max_body} bytes; send less",
                    "type": "invalid_request_error", "param": None, "code": "body_too_large"}}
    return None


class ProxyGuard:
    """Counts the calls in flight (keyless ones, and per connection) and refuses
    past the limits. One per proxy process; every handler runs on its event loop."""

    def __init__(self, limits: GuardLimits):
        self.limits = limits
        self.keyless = 0
        self.per_peer: dict[str, int] = {}

    def enter(self, context, keyless_ok: bool) -> tuple[BaseException | None, bool, str]:
        """Admits a call: (refusal or None, whether it counts as keyless, its peer).
        `keyless_ok`: a method anyone may call (health); it counts as keyless."""
        if keyless_ok:
            # Health and reflection: counted as keyless whatever key they carry, so a
            # made-up key cannot lift the cap.
            keyless = True
        else:
            problem = credential_problem(context.invocation_metadata())
            if problem is not None:
                return problem, False, ""
            keyless = False
        peer = context.peer() or ""
        if self.per_peer.get(peer, 0) >= self.limits.max_per_connection:
            return ResourceExhausted(
                f"this connection already has {self.limits.max_per_connection} calls in flight "
                "(serve.max_requests_per_connection); wait for some to end, or open another "
                "connection", reason="CONNECTION_LIMIT", retry_after=RETRY_S), False, ""
        if keyless and self.keyless >= self.limits.max_keyless:
            return ResourceExhausted(
                f"{self.limits.max_keyless} calls without an API key (health checks) are already "
                "in flight on this proxy (serve.max_keyless_requests); retry later",
                reason="KEYLESS_LIMIT", retry_after=RETRY_S), False, ""
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        if keyless:
            self.keyless += 1
        return None, keyless, peer

    def exit(self, keyless: bool, peer: str) -> None:
        left = self.per_peer.get(peer, 1) - 1
        if left <= 0:
            self.per_peer.pop(peer, None)
        else:
            self.per_peer[peer] = left
        if keyless:
            self.keyless -= 1


def _refuse(context, err) -> None:
    import grpc

    # Lazily: grpc_errors pulls in the metrics (prometheus_client) and the config;
    # only a refusal needs it, and the proxy imports this module at start-up.
    from hybridserve.grpc_errors import STATUS_DETAILS_KEY, rich_status

    context.set_code(grpc.StatusCode[err.code])
    context.set_details(err.message)
    context.set_trailing_metadata([(STATUS_DETAILS_KEY, rich_status(err).SerializeToString())])


class HealthCache:
    """The last health answer per (app, service), reused for `poll_s`, with at most
    one Check in flight per key: any number of probes and watchers cost the app's
    replicas one short Check per `poll_s`."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s
        self._answers: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    @staticmethod
    def key(request, context) -> tuple[str, str]:
        app = next((v for k, v in context.invocation_metadata() or ()
                    if k == topology.APPLICATION_HEADER), "")
        return str(app), str(getattr(request, "service", ""))

    async def check(self, check, request, context) -> bytes | None:
        """The serialized HealthCheckResponse, or None when the Check failed (its
        status is then set on `context`)."""
        import grpc

        key = self.key(request, context)
        loop = asyncio.get_running_loop()
        cached = self._answers.get(key)
        if cached is not None and loop.time() - cached[0] < self.poll_s:
            context.set_code(grpc.StatusCode.OK)
            return cached[1]
        pending = self._inflight.get(key)
        if pending is not None:
            body = await asyncio.shield(pending)
            if body is not None:
                context.set_code(grpc.StatusCode.OK)
                return body
            # The shared call failed: ask for ourselves (our own status and details).
        future = loop.create_future()
        self._inflight[key] = future
        body = None
        try:
            body = await check(request, context)
            code = context.code()
            if code not in (None, grpc.StatusCode.OK, 0) or not body:
                body = None
            else:
                self._answers[key] = (loop.time(), body)
                while len(self._answers) > 1024:  # apps x services: small; bound it anyway
                    self._answers.pop(next(iter(self._answers)))
            return body
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
            if not future.done():
                future.set_result(body)


def guarded_factory(factory, guard: ProxyGuard):
    """Wraps Serve's `service_handler_factory`: every handler it makes is admitted by
    `guard` first, and health `Watch` is answered by the proxy (see the module doc)."""
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    health = HealthCache(guard.limits.poll_s)

    def make(service_method: str, streaming_type):
        inner = factory(service_method=service_method, streaming_type=streaming_type)
        keyless_ok = service_method.startswith(HEALTH_PREFIX)
        if service_method == HEALTH_CHECK and streaming_type == gRPCStreamingType.UNARY_UNARY:
            async def check(request, context):
                # Only the connection cap: a cached answer costs the proxy nothing, and
                # a probe must get through even while watchers fill the keyless pool.
                peer = context.peer() or ""
                if guard.per_peer.get(peer, 0) >= guard.limits.max_per_connection:
                    refusal, _, _ = guard.enter(context, True)
                    if refusal is not None:
                        _refuse(context, refusal)
                        return b""
                guard.per_peer[peer] = guard.per_peer.get(peer, 0) + 1
                try:
                    body = await health.check(inner, request, context)
                    return body if body is not None else b""
                finally:
                    guard.exit(False, peer)

            return check
        if streaming_type == gRPCStreamingType.UNARY_UNARY:
            async def unary(request, context):
                refusal, keyless, peer = guard.enter(context, keyless_ok)
                if refusal is not None:
                    _refuse(context, refusal)
                    return b""
                try:
                    return await inner(request, context)
                finally:
                    guard.exit(keyless, peer)

            return unary
        if streaming_type == gRPCStreamingType.UNARY_STREAM:
            if service_method == HEALTH_WATCH:
                check = factory(service_method=HEALTH_CHECK,
                                streaming_type=gRPCStreamingType.UNARY_UNARY)
                return _watch_handler(check, guard, health)

            async def stream(request, context):
                refusal, keyless, peer = guard.enter(context, keyless_ok)
                if refusal is not None:
                    _refuse(context, refusal)
                    return
                try:
                    async for message in inner(request, context):
                        yield message
                finally:
                    guard.exit(keyless, peer)

            return stream
        # Client streaming: no hybridserve RPC has it; admitted on the key alone.
        return inner

    return make


def _watch_handler(check, guard: ProxyGuard, health: HealthCache):
    """grpc.health.v1 Watch in the proxy: the app's status from the shared health
    cache every `poll_s` (one Check on a replica per poll, whatever the number of
    watchers), sent when it changes, for `watch_s`; then the stream ends with OK and
    the client watches again. A failed Check ends the stream with its status."""

    async def watch(request, context):
        refusal, keyless, peer = guard.enter(context, True)
        if refusal is not None:
            _refuse(context, refusal)
            return

        async def status(_service):
            return await health.check(check, request, context)

        try:
            async for body in watch_health(status, "", guard.limits.watch_s,
                                           guard.limits.poll_s):
                if body is None:
                    return  # the Check's error (app not found, replica gone) ends it
                yield body
        finally:
            guard.exit(keyless, peer)

    return watch


def install(server, limits: GuardLimits | None = None) -> bool:
    """Puts the guard in front of every handler `server` makes from now on. False
    (and the proxy unchanged) if Serve's server lacks the hook."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        logger.warning("hybridserve: Serve's gRPC server has no service_handler_factory; "
                       "the proxy guard is off")
        return False
    if getattr(factory, _MARK, False):
        return True
    guard = ProxyGuard(limits or GuardLimits.from_env())
    wrapped = guarded_factory(factory, guard)
    setattr(wrapped, _MARK, True)
    server.service_handler_factory = wrapped
    logger.info("hybridserve: proxy guard on (%s)", guard.limits)
    return True
