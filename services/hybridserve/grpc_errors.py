"""The one place where domain errors become gRPC status codes, and where every gRPC
call of a servicer is counted (hybridserve_requests_total) and, for the data-path
methods, timed (stage "total").

A servicer names its service once, as the class attribute `metrics_service`
("generation", "retrieval", ...), and decorates each RPC with `grpc_unary` or
`grpc_stream`. A new servicer (the RAG gateway) gets request metrics the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

import grpc

from hybridserve import observability as obs
from hybridserve.errors import HybridServeError, Internal

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


@contextlib.contextmanager
def _observed(servicer: Any, method: Any, grpc_context: Any, timed: bool):
    """Around one RPC: maps its errors to the call's status and counts (and times)
    the call by the code it ended with. A client that went away is CANCELLED."""
    service = getattr(servicer, "metrics_service", "other")
    start, code = time.perf_counter(), "OK"
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        code = "CANCELLED"
        raise
    except HybridServeError as e:
        code = e.code
        set_status(grpc_context, e)
        raise
    except Exception as e:
        code = "INTERNAL"
        set_status(grpc_context, e)
        raise Internal(status_of(e)[1]) from e
    finally:
        obs.record_request(service, method.__name__, code)
        if timed:
            obs.observe_stage("total", time.perf_counter() - start, service=service)


def _decorator(wrap):
    """Lets a decorator be used bare (`@d`) or with options (`@d(timed=True)`)."""

    def decorator(method=None, *, timed: bool = False):
        if method is None:
            return lambda m: wrap(m, timed)
        return wrap(method, timed)

    return decorator


@_decorator
def grpc_unary(method, timed: bool):
    """Wraps a unary servicer method: domain errors become the call's status, and
    the call is counted by status code (and, with timed=True, timed as "total").

    Under Serve the status travels only with an exception, so the error is
    recorded on the context and then re-raised (unknown errors as `Internal`,
    whose message points at the server log instead of leaking internals).
    """

    @functools.wraps(method)
    async def wrapper(self, request, grpc_context=None):
        with _observed(self, method, grpc_context, timed):
            return await method(self, request, grpc_context)

    return wrapper


@_decorator
def grpc_stream(method, timed: bool):
    """`grpc_unary` for server-streaming methods (async generators).

    A client that goes away (the generator is closed, or Serve cancels it) counts
    as CANCELLED; the wrapped generator is closed at once, so the close reaches
    whatever it streams from (the engine aborts the request).
    """

    @functools.wraps(method)
    async def wrapper(self, request, grpc_context=None):
        # NOTE: aclosing, so that closing this wrapper closes the inner chain
        # right now, not whenever the garbage collector finalizes it.
        with _observed(self, method, grpc_context, timed):
            async with contextlib.aclosing(method(self, request, grpc_context)) as stream:
                async for message in stream:
                    yield message

    return wrapper
