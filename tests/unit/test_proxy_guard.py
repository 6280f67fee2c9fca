"""The proxy guard's admission (hybridserve.proxy_guard), on fake gRPC contexts; the
real proxy is exercised in tests/integration/test_hostile.py."""

from __future__ import annotations

from hybridserve.proxy_guard import GuardLimits, ProxyGuard, credential_problem
from hybridserve.tenancy import keys


class Ctx:
    def __init__(self, peer="ipv4:127.0.0.1:1000", key=None):
        self._peer = peer
        self._md = [("application", "generation")]
        if key is not None:
            self._md.append(("authorization", f"Bearer {key}"))

    def invocation_metadata(self):
        return self._md

    def peer(self):
        return self._peer


def _key() -> str:
    return keys.generate("tenant").key


def test_no_key_or_a_malformed_one_is_a_credential_problem():
    assert credential_problem(Ctx().invocation_metadata()).reason == "API_KEY_MISSING"
    assert credential_problem(Ctx(key="nope").invocation_metadata()).reason == "API_KEY_MALFORMED"
    assert credential_problem([("authorization", "Basic abc")]).reason == "API_KEY_MALFORMED"
    assert credential_problem(Ctx(key=_key()).invocation_metadata()) is None


def test_keyless_calls_are_refused_unless_allowed_and_capped():
    guard = ProxyGuard(GuardLimits(max_keyless=2, max_per_connection=100))
    refusal, _, _ = guard.enter(Ctx(), keyless_ok=False)
    assert refusal.code == "UNAUTHENTICATED"
    held = [guard.enter(Ctx(peer=f"p{i}"), keyless_ok=True) for i in range(2)]
    assert all(r is None for r, _, _ in held)
    refusal, _, _ = guard.enter(Ctx(peer="p9"), keyless_ok=True)
    assert refusal.code == "RESOURCE_EXHAUSTED" and refusal.reason == "KEYLESS_LIMIT"
    assert refusal.retry_after > 0
    # Keyed calls are not keyless: they pass.
    assert guard.enter(Ctx(peer="p9", key=_key()), keyless_ok=False)[0] is None
    _, keyless, peer = held[0]
    guard.exit(keyless, peer)
    assert guard.enter(Ctx(peer="p9"), keyless_ok=True)[0] is None


def test_one_connection_holds_at_most_its_share():
    guard = ProxyGuard(GuardLimits(max_keyless=100, max_per_connection=3))
    key = _key()
    admitted = [guard.enter(Ctx(key=key), keyless_ok=False) for _ in range(3)]
    refusal, _, _ = guard.enter(Ctx(key=key), keyless_ok=False)
    assert refusal.reason == "CONNECTION_LIMIT"
    assert guard.enter(Ctx(peer="other", key=key), keyless_ok=False)[0] is None
    for _, keyless, peer in admitted:
        guard.exit(keyless, peer)
    assert guard.per_peer == {"other": 1}


def test_limits_come_from_the_environment_and_bad_values_keep_defaults():
    limits = GuardLimits.from_env({"HYBRIDSERVE_PROXY_MAX_KEYLESS": "5",
                                   "HYBRIDSERVE_HEALTH_POLL_S": "x"})
    assert limits.max_keyless == 5 and limits.poll_s == GuardLimits().poll_s


class GrpcCtx(Ctx):
    """A servicer context as far as the guard and Serve's handlers use it."""

    def __init__(self, peer="ipv4:127.0.0.1:1000", key=None, app="generation"):
        super().__init__(peer, key)
        self._md[0] = ("application", app)
        self._code = None
        self.details = ""
        self.trailers = []

    def set_code(self, code):
        self._code = code

    def code(self):
        return self._code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        self.trailers = list(md)


class FakeServe:
    """Serve's service_handler_factory: records which methods reached a "replica"."""

    def __init__(self, status=b"\x08\x01"):
        self.calls = []
        self.status = status

    def __call__(self, service_method, streaming_type):
        import grpc

        async def unary(request, context):
            self.calls.append(service_method)
            context.set_code(grpc.StatusCode.OK)
            return self.status

        async def stream(request, context):
            self.calls.append(service_method)
            yield b"token"
            context.set_code(grpc.StatusCode.OK)

        from ray.serve._private.proxy_request_response import gRPCStreamingType

        return unary if streaming_type == gRPCStreamingType.UNARY_UNARY else stream


def _handlers(limits):
    from hybridserve.proxy_guard import guarded_factory
    from ray.serve._private.proxy_request_response import gRPCStreamingType as T

    serve = FakeServe()
    make = guarded_factory(serve, ProxyGuard(limits))
    return serve, {
        "check": make("/grpc.health.v1.Health/Check", T.UNARY_UNARY),
        "watch": make("/grpc.health.v1.Health/Watch", T.UNARY_STREAM),
        "search": make("/hybridserve.v1.RetrievalService/Search", T.UNARY_UNARY),
        "generate": make("/hybridserve.v1.GenerationService/Generate", T.UNARY_STREAM),
    }


async def test_calls_without_a_key_never_reach_serve():
    import grpc

    serve, h = _handlers(GuardLimits())
    ctx = GrpcCtx()
    assert await h["search"](object(), ctx) == b""
    assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED and "no API key" in ctx.details
    assert any(k == "grpc-status-details-bin" for k, _ in ctx.trailers)
    assert [m async for m in h["generate"](object(), GrpcCtx(key="bad"))] == []
    assert serve.calls == []
    assert await h["search"](object(), GrpcCtx(key=_key())) == serve.status
    assert serve.calls == ["/hybridserve.v1.RetrievalService/Search"]


async def test_health_checks_share_one_replica_call_per_poll():
    from types import SimpleNamespace

    serve, h = _handlers(GuardLimits(poll_s=60))
    req = SimpleNamespace(service="")
    answers = [await h["check"](req, GrpcCtx(peer=f"p{i}")) for i in range(20)]
    assert answers == [serve.status] * 20
    assert serve.calls == ["/grpc.health.v1.Health/Check"]  # one call, 19 cached
    await h["check"](req, GrpcCtx(app="retrieval"))  # another app: its own answer
    assert len(serve.calls) == 2


async def test_watchers_with_made_up_keys_still_count_as_keyless():
    import asyncio
    from types import SimpleNamespace

    import grpc

    serve, h = _handlers(GuardLimits(max_keyless=2, watch_s=60, poll_s=60))
    req = SimpleNamespace(service="")
    streams = [h["watch"](req, GrpcCtx(peer=f"p{i}", key=_key())) for i in range(2)]
    first = [await s.__anext__() for s in streams]  # both open, each got the status
    assert first == [serve.status] * 2
    ctx = GrpcCtx(peer="p9", key=_key())
    assert [m async for m in h["watch"](req, ctx)] == []
    assert ctx.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_keyless" in ctx.details
    # Probes still get through while the watchers fill the keyless pool.
    assert await h["check"](req, GrpcCtx(peer="probe")) == serve.status
    assert serve.calls == ["/grpc.health.v1.Health/Check"]  # every watcher shared it
    for s in streams:
        await s.aclose()
    await asyncio.sleep(0)
    ctx = GrpcCtx(peer="p9")
    stream = h["watch"](req, ctx)
    assert await stream.__anext__() == serve.status  # the pool was given back
    await stream.aclose()
