"""The OpenAI-compatible HTTP routes (FastAPI), on the gateway's domain code.

    GET  /models               the base model (if allowed) and the tenant's granted adapters
    GET  /models/{id}          one of them
    POST /chat/completions     chat, streamed (SSE) or not; `rag` answers from documents
    POST /completions          the same for a text prompt
    POST /embeddings           the retrieval model's embeddings

Serve mounts them under the app's route prefix (`/v1`). Every route needs
`Authorization: Bearer <key>` (the platform's API keys, as over gRPC) and is admitted
under the key's tenant quotas, as the gRPC methods are: a route authenticates (no body
is read before), reads at most `openai.max_body_bytes`, converts, and calls the
gateway. Errors are OpenAI's error object (`errors.py`); a stream that fails after
its first byte ends with one `data: {"error": {...}}` event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from hybridserve import observability as obs
from hybridserve.config import HybridServeConfig
from hybridserve.errors import (
    Cancelled,
    HybridServeError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from hybridserve.generation.engine import Delta
from hybridserve.generation.service import GenerationDone
from hybridserve.openai import convert, schemas
from hybridserve.openai.errors import PayloadTooLarge, error_body
from hybridserve.rag.gateway import DEFAULT_MODEL, Gateway, ModelEntry
from hybridserve.rag.service import AskDone, SourcesEvent, Timings
from hybridserve.tenancy.auth import bearer_token
from hybridserve.tenancy.domain import Principal

logger = logging.getLogger(__name__)

#: The `service` label of this API's request metrics.
METRICS_SERVICE = "openai"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_NO_KEY = ("no API key: send the header `Authorization: Bearer <key>` (OpenAI's clients: "
           "api_key=... or $OPENAI_API_KEY)")


class _Stream(StreamingResponse):
    """A streamed answer whose `cleanup` runs however the response ends, also if the
    server never iterated its body (an async generator that never started runs no
    `finally` of its own)."""

    def __init__(self, content, cleanup, **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


class _Observed:
    """Counts a request by the code it ended with and times it (stage `total`)."""

    def __init__(self, method: str):
        self.method = method
        self.start = time.perf_counter()
        self.code = "OK"
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def fail(self, err: BaseException) -> None:
        self.code = err.code if isinstance(err, HybridServeError) else "INTERNAL"

    def finish(self) -> None:
        if not self._done:
            self._done = True
            obs.record_request(METRICS_SERVICE, self.method, self.code)
            obs.observe_stage("total", time.perf_counter() - self.start, service=METRICS_SERVICE)


def _error_response(err: BaseException) -> JSONResponse:
    status, body, headers = error_body(err)
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse(body: bytes, cls):
    """JSON `body` as `cls` (InvalidArgument for anything else): strict JSON (no NaN),
    and text that is valid Unicode (JSON's escapes can spell lone surrogates, which no
    tokenizer takes)."""
    try:
        data = json.loads(body, parse_constant=_no_constants)
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"the request body is not valid JSON ({str(e)[:200]})",
                              reason="INVALID_JSON") from None
    return schemas.parse(cls, data)


def build_api(gateway: Gateway, config: HybridServeConfig, *, embedding_model: str = "") -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over `gateway`.

    `embedding_model`: the name `/embeddings` answers to (the retrieval model's).
    """
    # No docs or schema routes: nothing on this app answers without a key.
    api = FastAPI(title="hybridserve OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None)
    started_at = int(time.time())
    tenancy = gateway.tenancy

    async def authenticate(request: Request) -> Principal:
        t0 = time.perf_counter()
        try:
            headers = [(k, v) for k, v in request.headers.items() if k == "authorization"]
            try:
                token = bearer_token(headers)
            except Unauthenticated as e:
                if e.reason == "API_KEY_MISSING":
                    raise Unauthenticated(_NO_KEY, reason="API_KEY_MISSING") from None
                raise Unauthenticated(e.message.replace("metadata", "header"),
                                      reason=e.reason) from None
            return await tenancy.authenticate_token(token)
        finally:
            obs.observe_stage("auth", time.perf_counter() - t0, service=METRICS_SERVICE)

    async def read_body(request: Request, cls):
        """The body as `cls`: at most `openai.max_body_bytes`, within
        `openai.body_timeout_s`, parsed off the event loop."""
        limit = config.openai.max_body_bytes
        too_big = PayloadTooLarge(
            f"the request body is larger than {limit} bytes (openai.max_body_bytes); send "
            "less", reason="BODY_TOO_LARGE")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        try:
            async with asyncio.timeout(config.openai.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise too_big
        except TimeoutError:
            raise InvalidArgument(
                f"the request body did not arrive within {config.openai.body_timeout_s:g} s "
                "(openai.body_timeout_s)", reason="BODY_TIMEOUT") from None
        except ClientDisconnect:
            raise Cancelled("the client went away while sending the body") from None
        return await asyncio.to_thread(_parse, bytes(body), cls)

    def model_json(p: Principal, m: ModelEntry) -> dict:
        base = config.model.name
        return {"id": m.id, "object": "model", "created": int(m.created) or started_at,
                "owned_by": (p.tenant_id or "hybridserve") if m.adapter else "hybridserve",
                "root": base, "parent": base if m.adapter else None}

    @api.get("/models")
    async def list_models(request: Request):
        seen = _Observed("ListModels")
        try:
            p = await authenticate(request)
            async with tenancy.admit(p):
                entries = await gateway.models(p)
            return JSONResponse({"object": "list", "data": [model_json(p, m) for m in entries]})
        except Exception as e:  # noqa: BLE001 - every error becomes OpenAI's error object
            seen.fail(e)
            return _error_response(e)
        except BaseException:
            seen.code = "CANCELLED"
            raise
        finally:
            seen.finish()

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        seen = _Observed("GetModel")
        try:
            p = await authenticate(request)
            async with tenancy.admit(p):
                adapter = await gateway.resolve_model(p, model_id)
                entries = await gateway.models(p)
            wanted = adapter or config.model.name
            for m in entries:
                if m.id == wanted:
                    return JSONResponse(model_json(p, m))
            raise NotFound(f"unknown model {model_id[:200]!r}; GET /v1/models lists yours",
                           reason="MODEL_NOT_FOUND")
        except Exception as e:  # noqa: BLE001
            seen.fail(e)
            return _error_response(e)
        except BaseException:
            seen.code = "CANCELLED"
            raise
        finally:
            seen.finish()

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, schemas.ChatRequest, "chat", "ChatCompletions")

    @api.post("/completions")
    async def completions(request: Request):
        return await complete(request, schemas.CompletionRequest, "text", "Completions")

    async def complete(request: Request, cls, kind: str, method: str):
        seen = _Observed(method)
        started = time.perf_counter()
        timings = Timings()
        events = None
        # The admission (a stream slot, a request) lasts as long as the answer does.
        stack = contextlib.AsyncExitStack()
        try:
            p = await authenticate(request)
            timings.auth = time.perf_counter() - started
            # Admitted before the body is read: reading, parsing and resolving the model
            # are work, and an over-quota caller gets its 429 without any of it.
            t0 = time.perf_counter()
            lease = await stack.enter_async_context(tenancy.admit(p, stream=True))
            timings.quota = time.perf_counter() - t0
            req = await read_body(request, cls)
            request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            rag = req.rag is not None
            if rag and req.model == DEFAULT_MODEL and p.is_admin:
                # The tenant an admin names is known to the pipeline only: it applies
                # that tenant's default adapter.
                adapter, resolved = "", False
            else:
                adapter, resolved = await gateway.resolve_model(p, req.model), True
            model = (adapter or config.model.name) if resolved else req.model
            if rag:
                events = gateway.ask(p, convert.ask_input(req, adapter, request_id),
                                     tenant_field=req.rag.tenant, started=started,
                                     deadline_s=config.rag.timeout_s, timings=timings,
                                     adapter_resolved=resolved, lease=lease)
            else:
                events = gateway.generate(p, convert.generate_input(req, adapter, request_id),
                                          started=started, lease=lease,
                                          deadline_s=config.serve.request_timeout_s)
            # The first event before any byte goes out: an error until then (quota,
            # validation, a failed replica) is a proper HTTP status.
            first = await anext(events)
        except Exception as e:  # noqa: BLE001
            if events is not None:
                await events.aclose()
            await stack.aclose()
            seen.fail(e)
            seen.finish()
            return _error_response(e)
        except BaseException:
            if events is not None:
                await events.aclose()
            await stack.aclose()
            seen.code = "CANCELLED"
            seen.finish()
            raise
        answer = _Answer(kind, request_id, int(time.time()), model, config, req)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def cleanup() -> None:
                # Also when the body never started (the client left before the first
                # chunk): the engine request ends and the quota slot is paid and freed.
                if not seen.finished:
                    seen.code = "CANCELLED"
                try:
                    await events.aclose()
                finally:
                    await stack.aclose()
                    seen.finish()

            return _Stream(answer.stream(first, events, seen, include_usage, stack), cleanup,
                           media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            async with contextlib.aclosing(events):
                answer.take(first)
                async for item in events:
                    answer.take(item)
            return JSONResponse(answer.whole())
        except Exception as e:  # noqa: BLE001
            seen.fail(e)
            return _error_response(e)
        except BaseException:
            seen.code = "CANCELLED"
            raise
        finally:
            await stack.aclose()
            seen.finish()

    @api.post("/embeddings")
    async def embeddings(request: Request):
        seen = _Observed("Embeddings")
        stack = contextlib.AsyncExitStack()
        try:
            p = await authenticate(request)
            lease = await stack.enter_async_context(tenancy.admit(p))
            req = await read_body(request, schemas.EmbeddingRequest)
            if not req.model:
                raise InvalidArgument(f"model is required: {embedding_model!r} or "
                                      f"{DEFAULT_MODEL!r}", field_violations=[("model", "required")])
            if req.model not in (embedding_model, DEFAULT_MODEL):
                raise NotFound(f"unknown embedding model {req.model[:200]!r}; this platform "
                               f"embeds with {embedding_model!r} (or say {DEFAULT_MODEL!r})",
                               reason="MODEL_NOT_FOUND")
            texts = _embedding_texts(req.input, config)
            vectors, tokens = await gateway.embed(p, texts, lease=lease,
                                                  deadline_s=config.serve.request_timeout_s)
            if req.dimensions is not None and vectors and req.dimensions != len(vectors[0]):
                raise InvalidArgument(
                    f"dimensions must be {len(vectors[0])} (the model's), got {req.dimensions}",
                    field_violations=[("dimensions", f"{len(vectors[0])}")])
            data = [{"object": "embedding", "index": i,
                     "embedding": _encode(v, req.encoding_format)} for i, v in enumerate(vectors)]
            return JSONResponse({"object": "list", "data": data, "model": embedding_model,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        except Exception as e:  # noqa: BLE001
            seen.fail(e)
            return _error_response(e)
        except BaseException:
            seen.code = "CANCELLED"
            raise
        finally:
            await stack.aclose()
            seen.finish()

    @api.exception_handler(404)
    async def _unknown_route(request: Request, exc):
        return _error_response(NotFound(
            f"no route {request.method} {request.url.path[:200]}; this API serves /v1/models, "
            "/v1/chat/completions, /v1/completions and /v1/embeddings", reason="ROUTE_NOT_FOUND"))

    @api.exception_handler(405)
    async def _wrong_method(request: Request, exc):
        status, body, headers = error_body(InvalidArgument(
            f"{request.method} is not allowed on {request.url.path[:200]}",
            reason="METHOD_NOT_ALLOWED"))
        return JSONResponse(body, status_code=405, headers=headers)

    return api


def _embedding_texts(inp, config: HybridServeConfig) -> list[str]:
    texts = [inp] if isinstance(inp, str) else inp
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidArgument("input must be a string or a non-empty list of strings (token "
                              "ids are not accepted)", field_violations=[("input", "text")])
    cfg = config.openai
    if len(texts) > cfg.max_embedding_inputs:
        raise InvalidArgument(f"{len(texts)} inputs; at most {cfg.max_embedding_inputs} per "
                              "request (openai.max_embedding_inputs)",
                              field_violations=[("input", f"at most {cfg.max_embedding_inputs}")])
    for i, t in enumerate(texts):
        if not t.strip() or len(t) > cfg.max_embedding_chars:
            raise InvalidArgument(
                f"input[{i}] must have 1 to {cfg.max_embedding_chars} characters "
                "(openai.max_embedding_chars)", field_violations=[(f"input[{i}]", "length")])
    return texts


def _encode(vector: list[float], encoding: str):
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


class _Answer:
    """One completion's state: its text so far, sources, and its end."""

    def __init__(self, kind: str, request_id: str, created: int, model: str,
                 config: HybridServeConfig, req):
        self.kind, self.id, self.created, self.model = kind, request_id, created, model
        self.config = config
        self.whole_passages = bool(req.rag and req.rag.include_passages)
        self.rag = req.rag is not None
        self.text: list[str] = []
        self.sources: list[dict] | None = None
        self.done: GenerationDone | AskDone | None = None

    def take(self, item) -> str | None:
        """Records an event; returns the text it adds (None for other events)."""
        if isinstance(item, SourcesEvent):
            snip = self.config.rag.snippet_chars
            self.sources = [convert.source_json(s, snip, self.whole_passages)
                            for s in item.sources]
            return None
        if isinstance(item, Delta):
            self.text.append(item.text)
            return item.text
        self.done = item
        if isinstance(item, AskDone):
            if item.adapter:
                self.model = item.adapter
            for stage in ("embed", "retrieve", "rerank", "prompt", "first_token"):
                if value := getattr(item.timings, stage):
                    obs.observe_stage(stage, value, service=METRICS_SERVICE)
        return None

    def _usage(self) -> dict:
        d = self.done
        assert d is not None
        return convert.usage(d.prompt_tokens, d.completion_tokens, d.cached_prompt_tokens)

    def _rag_fields(self) -> dict:
        if not self.rag:
            return {}
        assert isinstance(self.done, AskDone)
        sources = self.sources or []
        return {"sources": sources,
                "citations": convert.citation_spans("".join(self.text), sources),
                "rag": convert.rag_json(self.done)}

    def whole(self) -> dict:
        assert self.done is not None
        out = convert.completion_object(self.kind, self.id, self.created, self.model,
                                        "".join(self.text),
                                        convert.finish_reason(self.done.finish_reason),
                                        self._usage())
        out.update(self._rag_fields())
        return out

    async def stream(self, first, events: AsyncIterator, seen: _Observed,
                     include_usage: bool, admission: contextlib.AsyncExitStack,
                     ) -> AsyncIterator[bytes]:
        chunk = convert.chunk_object
        sent_first = False
        try:
            async with contextlib.aclosing(events):
                item = first
                while True:
                    if isinstance(item, SourcesEvent):
                        self.take(item)
                        out = chunk(self.kind, self.id, self.created, self.model, text="",
                                    first=True)
                        out["sources"] = self.sources
                        sent_first = True
                        yield _sse(out)
                    elif isinstance(item, Delta):
                        text = self.take(item)
                        if text:
                            yield _sse(chunk(self.kind, self.id, self.created, self.model,
                                             text=text, first=not sent_first))
                            sent_first = True
                    else:
                        self.take(item)
                        out = chunk(self.kind, self.id, self.created, self.model,
                                    finish=convert.finish_reason(item.finish_reason),
                                    first=not sent_first)
                        out.update({k: v for k, v in self._rag_fields().items()
                                    if k != "sources"})
                        yield _sse(out)
                        if include_usage:
                            yield _sse(chunk(self.kind, self.id, self.created, self.model,
                                             no_choice=True, usage_json=self._usage()))
                    try:
                        item = await anext(events)
                    except StopAsyncIteration:
                        break
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - after the first byte: an error event
            seen.fail(e)
            yield _sse(error_body(e)[1])
        except BaseException:
            # The client went away (Serve cancels the request): the aclosing above has
            # closed the chain down to the engine, which aborts the request.
            seen.code = "CANCELLED"
            raise
        finally:
            # The quota slot and the token debit end with the stream, however it ends.
            await admission.aclose()
            seen.finish()
