"""The SDK's typed exceptions: one per status a caller acts on differently.

Every exception is a `grpc.RpcError` too (with `.code()` and `.details()`), so
code that catches gRPC errors keeps working. The rich error details the server
sends (google.rpc.ErrorInfo, BadRequest, RetryInfo, QuotaFailure) are parsed into
attributes:

    try:
        client.search("refund policy")
    except RateLimitError as e:
        time.sleep(e.retry_after)
    except PermissionDeniedError as e:
        print(e.reason, e.message)
"""

from __future__ import annotations

import grpc


class ApiKeyFileError(ValueError):
    """The API key file the client was given does not exist or holds no key (raised
    when the client is created, before any call)."""

    @property
    def message(self) -> str:
        return str(self)


class HybridServeAPIError(grpc.RpcError):
    """A call to the platform failed.

    Attributes:
        status: the gRPC status code.
        message: the server's message (what was wrong and what to do next).
        reason: the stable machine-readable cause from ErrorInfo, e.g.
            "API_KEY_REVOKED", "ADAPTER_NOT_GRANTED", "QUOTA_EXCEEDED" ("" if none).
        metadata: ErrorInfo's metadata.
        field_violations: (field, description) pairs from BadRequest.
        retry_after: seconds from RetryInfo (None if the server sent none).
        quota_violations: (subject, description) pairs from QuotaFailure.
    """

    def __init__(self, status: grpc.StatusCode, message: str, *, reason: str = "",
                 metadata: dict[str, str] | None = None,
                 field_violations: list[tuple[str, str]] | None = None,
                 retry_after: float | None = None,
                 quota_violations: list[tuple[str, str]] | None = None):
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = field_violations or []
        self.retry_after = retry_after
        self.quota_violations = quota_violations or []

    # grpc.RpcError / grpc.Call compatibility
    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


class AuthenticationError(HybridServeAPIError):
    """UNAUTHENTICATED: no key, or a malformed, unknown, revoked or expired one."""


class PermissionDeniedError(HybridServeAPIError):
    """PERMISSION_DENIED: the key may not do this (another tenant, an adapter not
    granted, an admin-only call)."""


class RateLimitError(HybridServeAPIError):
    """RESOURCE_EXHAUSTED: over a quota (`retry_after` says when to retry) or the
    platform is shedding load."""


class NotFoundError(HybridServeAPIError):
    """NOT_FOUND: an unknown tenant, adapter or key."""


class InvalidArgumentError(HybridServeAPIError):
    """INVALID_ARGUMENT: the request is malformed; `field_violations` name the fields."""


class AlreadyExistsError(HybridServeAPIError):
    """ALREADY_EXISTS."""


class FailedPreconditionError(HybridServeAPIError):
    """FAILED_PRECONDITION: the platform is not in a state that allows this."""


class UnavailableError(HybridServeAPIError):
    """UNAVAILABLE: retry with backoff."""


class DeadlineExceededError(HybridServeAPIError):
    """DEADLINE_EXCEEDED."""


class CancelledError(HybridServeAPIError):
    """CANCELLED: the call was cancelled."""


_BY_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def _rich(code: grpc.StatusCode, message: str, trailing) -> HybridServeAPIError:
    from google.rpc import error_details_pb2, status_pb2

    kwargs: dict = {}
    for key, value in trailing or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a malformed trailer: keep the plain status
            break
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                kwargs.update(reason=info.reason, metadata=dict(info.metadata))
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                kwargs["field_violations"] = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                kwargs["retry_after"] = retry.retry_delay.ToMilliseconds() / 1000.0
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                kwargs["quota_violations"] = [(v.subject, v.description) for v in quota.violations]
    return _BY_CODE.get(code, HybridServeAPIError)(code, message, **kwargs)


def from_rpc_error(err: grpc.RpcError) -> HybridServeAPIError:
    """The typed exception for a failed call (a blocking client's error)."""
    if isinstance(err, HybridServeAPIError):
        return err
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return _rich(code, details or "", trailing)


async def from_aio_error(err: grpc.aio.AioRpcError) -> HybridServeAPIError:
    """The typed exception for a failed call of the asyncio client."""
    return _rich(err.code(), err.details() or "", err.trailing_metadata())
