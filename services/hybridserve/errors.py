"""One error hierarchy for the whole platform, mapped to gRPC status codes once.

Domain code raises these; it never touches gRPC. The servicer layer
(`hybridserve.grpc_errors`) turns them into a status code, a message and the
typed details of Google's rich error model (AIP-193), which travel in the
`grpc-status-details-bin` trailer:

- `reason` (+ `metadata`) -> `google.rpc.ErrorInfo` (domain "hybridserve.dev"), a
  stable machine-readable cause such as "API_KEY_REVOKED";
- `field_violations` -> `google.rpc.BadRequest`;
- `retry_after` -> `google.rpc.RetryInfo`, and `quota_violations` ->
  `google.rpc.QuotaFailure`.

Every message should say what was wrong *and* what to do next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: ErrorInfo.domain of every hybridserve error.
ERROR_DOMAIN = "hybridserve.dev"


class HybridServeError(Exception):
    """Base class. `code` is the name of the gRPC status code it maps to."""

    code = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after: float | None = None,
        quota_violations: Sequence[tuple[str, str]] = (),
    ):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        #: (field path, what is wrong with it)
        self.field_violations = list(field_violations)
        #: seconds after which a retry may succeed
        self.retry_after = retry_after
        #: (subject, description), e.g. ("tenant:acme/requests_per_minute", "60 per minute")
        self.quota_violations = list(quota_violations)


class InvalidArgument(HybridServeError):
    code = "INVALID_ARGUMENT"


class NotFound(HybridServeError):
    code = "NOT_FOUND"


class AlreadyExists(HybridServeError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(HybridServeError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(HybridServeError):
    code = "PERMISSION_DENIED"


class Unauthenticated(HybridServeError):
    code = "UNAUTHENTICATED"


class ResourceExhausted(HybridServeError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(HybridServeError):
    code = "UNAVAILABLE"


class DeadlineExceeded(HybridServeError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(HybridServeError):
    code = "CANCELLED"


class Internal(HybridServeError):
    code = "INTERNAL"
