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
