"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from hybridserve.errors import HybridServeError

logger = logging.getLogger(__name__)


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps an exception to (status code, message for the client)."""
    if isinstance(err, HybridServeError):
        return grpc.StatusCode[err.code], err.message
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); see the server log"


def set_status(grpc_context: Any, err: BaseException) -> None:
    """Records `err` on a gRPC context (grpcio's or Ray Serve's).

    NOTE: under Ray Serve the caller must re-raise after this: the replica
    forwards a context's code only together with an exception.
    """
    code, message = status_of(err)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("internal error", exc_info=err)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(message)


def grpc_unary(method):
    """Wraps a unary servicer method: domain errors become the call's status.

    Under Serve the status travels only with an exception, so the error is
    recorded on the context and then re-raised (unknown errors as `Internal`,
    whose message points at the server log instead of leaking internals).
    """
    import functools

    from hybridserve.errors import Internal

    @functools.wraps(method)
    async def wrapper(self, request, grpc_context=None):
        try:
            return await method(self, request, grpc_context)
        except HybridServeError as e:
            set_status(grpc_context, e)
            raise
        except Exception as e:
            set_status(grpc_context, e)
            raise Internal(status_of(e)[1]) from e

    return wrapper
