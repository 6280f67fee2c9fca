"""One error hierarchy for the whole platform, mapped to gRPC status codes once.

Domain code raises these; it never touches gRPC. The servicer layer
(`hybridserve.grpc_errors`) turns them into a status code and message. Every
message should say what was wrong *and* what to do next.
"""

from __future__ import annotations


class HybridServeError(Exception):
    """Base class. `code` is the name of the gRPC status code it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


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
