"""Domain errors as OpenAI's error object, with the HTTP status the official clients map
to their typed exceptions (openai-python: BadRequestError for 400, AuthenticationError
401, PermissionDeniedError 403, NotFoundError 404, ConflictError 409,
UnprocessableEntityError 422, RateLimitError 429, InternalServerError for 5xx).

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": "adapter_not_granted"}}

`code` is the ErrorInfo reason the gRPC status carries, in lower case (None when the
error has none); `param` the first field the error names, in the request's own terms.
"""

from __future__ import annotations

import logging
import math

from hybridserve.errors import HybridServeError

logger = logging.getLogger(__name__)

#: gRPC code name -> (HTTP status, OpenAI error type).
STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "FAILED_PRECONDITION": (422, "unprocessable_entity_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
}
_INTERNAL = (500, "server_error")
#: Longest message sent (as the gRPC side).
_MAX_MESSAGE_CHARS = 4000


class PayloadTooLarge(HybridServeError):
    """A request body over `openai.max_body_bytes` (HTTP 413)."""

    code = "RESOURCE_EXHAUSTED"


def _param(field: str) -> str:
    """A field path of the domain (`sampling.max_tokens`, `retrieval.top_k`) in the
    request's terms (`max_tokens`, `rag.top_k`)."""
    for prefix, replacement in (("sampling.", ""), ("retrieval.", "rag."), ("filters", "rag.filters")):
        if field.startswith(prefix):
            return replacement + field[len(prefix):]
    return field


def error_body(err: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error object, extra headers) for `err`."""
    if not isinstance(err, HybridServeError):
        logger.error("internal error", exc_info=err)
        status, kind = _INTERNAL
        return status, {"error": {
            "message": f"internal error ({type(err).__name__}); see the server log",
            "type": kind, "param": None, "code": "internal"}}, {}
    status, kind = STATUS.get(err.code, _INTERNAL)
    if isinstance(err, PayloadTooLarge):
        status, kind = 413, "invalid_request_error"
    message = err.message
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 15] + "... [truncated]"
    param = _param(err.field_violations[0][0]) if err.field_violations else None
    headers: dict[str, str] = {}
    if status in (501, 504):
        # OpenAI's clients retry every 5xx; these would only fail (and cost) again.
        headers["x-should-retry"] = "false"
    if err.retry_after is not None:
        # Whole seconds (RFC 9110); the exact delay too, which openai-python prefers.
        headers["retry-after"] = str(max(1, math.ceil(err.retry_after)))
        headers["retry-after-ms"] = str(max(1, int(err.retry_after * 1000)))
    return status, {"error": {"message": message, "type": kind, "param": param,
                              "code": err.reason.lower() if err.reason else None}}, headers
