"""The proxy-side status fix (hybridserve.serve_patches), on Serve's real proxy module.
The end-to-end proof, a replica killed under load through the real proxy, is in
tests/integration/test_pressure.py."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hybridserve import serve_patches
from hybridserve.grpc_errors import STATUS_DETAILS_KEY

from .fakes import FakeContext


@pytest.fixture(scope="module")
def proxy():
    assert serve_patches.register()
    assert serve_patches.register()  # idempotent
    from ray.serve._private import proxy

    return proxy


def _details(ctx) -> dict:
    raw = dict(ctx.trailing_metadata())[STATUS_DETAILS_KEY]
    status = status_pb2.Status.FromString(raw)
    out = {}
    for any_ in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                out[cls.__name__] = msg
    return out


@pytest.mark.parametrize("exc", ["died", "unavailable"])
def test_a_dead_replica_is_unavailable_with_a_retry_delay(proxy, exc):
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    err = ActorDiedError() if exc == "died" else ActorUnavailableError("gone", None)
    status = proxy.get_grpc_response_status(err, 300, "r1")
    assert status.code == grpc.StatusCode.UNAVAILABLE and status.is_error
    assert "retry" in status.message
    ctx = FakeContext()
    proxy.set_grpc_code_and_details(ctx, status)
    assert ctx.code() == grpc.StatusCode.UNAVAILABLE
    details = _details(ctx)
    assert details["ErrorInfo"].reason == "REPLICA_UNAVAILABLE"
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1000


def test_backpressure_gets_a_retry_delay(proxy):
    from ray.serve.exceptions import BackPressureError

    status = proxy.get_grpc_response_status(BackPressureError(10, 10), 300, "r1")
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    ctx = FakeContext()
    proxy.set_grpc_code_and_details(ctx, status)
    assert _details(ctx)["ErrorInfo"].reason == "OVERLOADED"
    assert _details(ctx)["RetryInfo"].retry_delay.ToMilliseconds() > 0


@pytest.mark.parametrize("exc, code", [
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError("bug"), grpc.StatusCode.INTERNAL),
])
def test_other_statuses_stay_serves(proxy, exc, code):
    status = proxy.get_grpc_response_status(exc, 300, "r1")
    assert status.code == code
    ctx = FakeContext()
    proxy.set_grpc_code_and_details(ctx, status)
    assert ctx.code() == code and not ctx.trailing_metadata()


def test_http_clients_may_shorten_but_never_lift_the_timeout_or_keep_running_after_hanging_up():
    from ray.serve._private import proxy

    from hybridserve.serve_patches import no_client_overrides

    assert no_client_overrides() and no_client_overrides()  # idempotent
    timeout = proxy.parse_request_timeout_header
    header = b"x-request-timeout-seconds"
    assert timeout({}, 300.0) == 300.0
    assert timeout({header: b"5"}, 300.0) == 5.0
    assert timeout({header: b"0"}, 300.0) == 300.0  # Serve: "disable the timeout"
    assert timeout({header: b"9999"}, 300.0) == 300.0
    assert proxy.parse_disconnect_disabled_header({b"x-request-disconnect-disabled": b"?1"}) is False


def test_the_http_proxy_routes_only_to_the_http_apis_ingress():
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentID
    from ray.serve._private.proxy_router import ProxyRouter

    from hybridserve.serve_patches import http_routes_only

    assert http_routes_only() and http_routes_only()
    ids = {"/v1": DeploymentID(name="OpenAIIngress", app_name="openai"),
           "/generation": DeploymentID(name="GenerationService", app_name="generation"),
           "/x/v1": DeploymentID(name="RagService", app_name="x")}  # shaped like the API's
    router = SimpleNamespace(sorted_routes=sorted(ids, key=len, reverse=True), route_info=ids,
                             handles={d: f"handle:{d.name}" for d in ids.values()},
                             app_to_is_cross_language={d.app_name: False for d in ids.values()})
    assert ProxyRouter.match_route(router, "/v1/models")[1] == "handle:OpenAIIngress"
    assert ProxyRouter.match_route(router, "/generation") is None
    assert ProxyRouter.match_route(router, "/x/v1/models") is None
    assert ProxyRouter.match_route(router, "/nowhere") is None


def test_the_http_proxy_refuses_keyless_and_oversized_requests_itself():
    from hybridserve.proxy_guard import http_refusal

    def scope(path="/v1/models", **headers):
        return {"type": "http", "path": path,
                "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}

    from hybridserve.tenancy import keys

    key = "Bearer " + keys.generate("tenant").key
    status, body = http_refusal(scope(), 1024)
    assert status == 401 and body["error"]["code"] == "api_key_missing"
    assert http_refusal(scope(authorization="Bearer nope"), 1024)[0] == 401
    assert http_refusal(scope("/-/healthz"), 1024) is None  # the proxy's own routes
    assert http_refusal(scope(authorization=key, content_length="2048"), 1024)[0] == 413
    assert http_refusal(scope(authorization=key, content_length="-1"), 1024)[0] == 413
    assert http_refusal(scope(authorization=key, content_length="100"), 1024) is None
