"""The one place where domain errors become gRPC statuses, and where every gRPC
call of a servicer is counted (hybridserve_requests_total) and, for the data-path
methods, timed (stage "total").

A servicer names its service once, as the class attributes `metrics_service`
("generation", "retrieval", ...) and `grpc_service` (its full gRPC name), and
decorates each RPC with `grpc_unary` or `grpc_stream`.

A status carries Google's rich error model: a `google.rpc.Status` with ErrorInfo,
BadRequest, RetryInfo and QuotaFailure details (see `errors.py`), in the standard
`grpc-status-details-bin` trailer that `grpc_status.rpc_status.from_call` reads.

NOTE: how an error leaves under Ray Serve. Serve's gRPC proxy copies the status
code, details and trailing metadata from the replica's context only together with
a response message; an exception carries the code and details but not the
trailers. So a failed call does not raise: it sets the status on the context and
returns an empty response (a unary RPC: clients discard a message that comes with
an error status), or yields one message with no payload and ends (a stream: the
SDK skips it; other clients see one empty message before the error status).
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
from hybridserve.errors import ERROR_DOMAIN, HybridServeError, Internal

logger = logging.getLogger(__name__)


#: The trailer that carries a serialized google.rpc.Status.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
#: Longest message sent to a client (HTTP/2 trailers are size-limited).
_MAX_MESSAGE_CHARS = 4000


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps an exception to (status code, message for the client)."""
    if isinstance(err, HybridServeError):
        message = err.message
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 15] + "... [truncated]"
        return grpc.StatusCode[err.code], message
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); see the server log"


def rich_status(err: BaseException):
    """The google.rpc.Status for `err`, with its typed details."""
    from google.rpc import error_details_pb2, status_pb2

    code, message = status_of(err)
    status = status_pb2.Status(code=code.value[0], message=message)
    if not isinstance(err, HybridServeError):
        return status
    if err.reason:
        status.details.add().Pack(error_details_pb2.ErrorInfo(
            reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata))
    if err.field_violations:
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f[:200], description=d[:500])
            for f, d in err.field_violations[:100]
        ]))
    if err.retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(max(1, int(err.retry_after * 1000)))
        status.details.add().Pack(info)
    if err.quota_violations:
        status.details.add().Pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
            for s, d in err.quota_violations
        ]))
    return status


def set_status(grpc_context: Any, err: BaseException) -> None:
    """Records `err` on a gRPC context (grpcio's or Ray Serve's): code, message
    and the rich status trailer."""
    code, message = status_of(err)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("internal error", exc_info=err)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(message)
        trailers = [
            (k, v) for k, v in (grpc_context.trailing_metadata() or ())
            if k not in (STATUS_DETAILS_KEY, "request_id")
        ] if hasattr(grpc_context, "trailing_metadata") else []
        grpc_context.set_trailing_metadata(
            trailers + [(STATUS_DETAILS_KEY, rich_status(err).SerializeToString())]
        )


_RESPONSE_TYPES: dict[tuple[str, str], type] = {}


def response_type(servicer: Any, method_name: str) -> type:
    """The response message class of `servicer`'s RPC `method_name`."""
    key = (servicer.grpc_service, method_name)
    cls = _RESPONSE_TYPES.get(key)
    if cls is None:
        from google.protobuf import descriptor_pool, message_factory

        service = descriptor_pool.Default().FindServiceByName(servicer.grpc_service)
        cls = message_factory.GetMessageClass(service.FindMethodByName(method_name).output_type)
        _RESPONSE_TYPES[key] = cls
    return cls


class _Outcome:
    """What `_observed` learned: the error that ended the call, if any."""

    failed: BaseException | None = None


@contextlib.contextmanager
def _observed(servicer: Any, method: Any, grpc_context: Any, timed: bool):
    """Around one RPC: maps its error to the call's status and counts (and times)
    the call by the code it ended with. A client that went away is CANCELLED.

    With a context, an error is recorded on it and swallowed (`outcome.failed` is
    set; the caller sends the empty response that carries it, see the module
    docstring). Without one (a direct call in tests) it propagates; an unexpected
    error then becomes `Internal`, whose message points at the server log.
    """
    service = getattr(servicer, "metrics_service", "other")
    start, code = time.perf_counter(), "OK"
    outcome = _Outcome()
    try:
        yield outcome
    except (asyncio.CancelledError, GeneratorExit):
        code = "CANCELLED"
        raise
    except Exception as e:
        code = e.code if isinstance(e, HybridServeError) else "INTERNAL"
        set_status(grpc_context, e)
        if grpc_context is None:
            if isinstance(e, HybridServeError):
                raise
            raise Internal(status_of(e)[1]) from e
        outcome.failed = e
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
    """Wraps a unary servicer method: domain errors become the call's status (with
    rich details), and the call is counted by status code (and, with timed=True,
    timed as "total"). Unknown errors get a message that points at the server log
    instead of leaking internals.
    """

    @functools.wraps(method)
    async def wrapper(self, request, grpc_context=None):
        with _observed(self, method, grpc_context, timed) as outcome:
            return await method(self, request, grpc_context)
        if outcome.failed is not None:
            return response_type(self, method.__name__)()

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
        with _observed(self, method, grpc_context, timed) as outcome:
            async with contextlib.aclosing(method(self, request, grpc_context)) as stream:
                async for message in stream:
                    yield message
        if outcome.failed is not None:
            # The message that carries the status through Serve's proxy.
            yield response_type(self, method.__name__)()

    return wrapper
