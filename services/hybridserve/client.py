"""Python client SDK over the generated gRPC stubs: `HybridServeClient` (blocking) and
`AsyncHybridServeClient` (asyncio), with the same methods.

    from hybridserve.client import HybridServeClient

    with HybridServeClient("127.0.0.1:50051", api_key="hst_...") as client:
        answer = client.ask("How long does a refund take?")   # the key's tenant and adapter
        print(answer.text, [c.source for c in answer.cited])
        hits = client.search("", "refund policy")            # "" = the key's own tenant

Credentials: `api_key=`, else `$HYBRIDSERVE_API_KEY`, else `api_key_file=`. Pass
`tls=True` (and `root_certificates=` for a private CA) to reach the platform
through a TLS-terminating ingress. Failed calls raise the typed exceptions of
`hybridserve.exceptions` (`AuthenticationError`, `PermissionDeniedError`,
`RateLimitError` with `retry_after`, `NotFoundError`, `InvalidArgumentError`, ...),
which are `grpc.RpcError`s too; an API key file that does not exist or holds no key
raises `ApiKeyFileError` when the client is made.

The SDK imports grpc, protobuf, googleapis-common-protos (google.rpc) and v1/ only, so
`pip install hybridserve` gives it without the server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc

from hybridserve import topology
from hybridserve.answers import Answer, Final, Sources, Token, collect, event_of
from hybridserve.exceptions import (
    ApiKeyFileError,
    HybridServeAPIError,
    from_aio_error,
    from_rpc_error,
)
from hybridserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    rag_pb2,
    rag_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)

#: Serve apps hosting each service; sent as `application` metadata, which is
#: how Serve's gRPC proxy picks the app when several share it.
GENERATION_APP = topology.GENERATION.name
RETRIEVAL_APP = topology.RETRIEVAL.name
RERANK_APP = topology.RERANK.name
ADMIN_APP = topology.ADMIN.name
RAG_APP = topology.RAG.name
#: Environment variable the SDK and the CLI read the key from.
API_KEY_ENV = "HYBRIDSERVE_API_KEY"

_FILTER_OPS = {
    "equal": retrieval_pb2.FILTER_OP_EQUAL,
    "not_equal": retrieval_pb2.FILTER_OP_NOT_EQUAL,
    "any_of": retrieval_pb2.FILTER_OP_ANY_OF,
}

__all__ = [
    "API_KEY_ENV",
    "Answer",
    "ApiKeyFileError",
    "AsyncHybridServeClient",
    "HybridServeAPIError",
    "HybridServeClient",
    "Stream",
    "ask_request",
    "resolve_api_key",
]


def read_key_file(path: Path) -> str:
    """The key in a key file: its first non-empty line that is not a # comment."""
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            return line.strip()
    raise ApiKeyFileError(f"{path} holds no key")


def resolve_api_key(api_key: str | None = None, api_key_file: str | Path | None = None,
                    default_file: Path | None = None) -> str | None:
    """The key to send: `api_key`, else $HYBRIDSERVE_API_KEY, else the first
    key line of `api_key_file`, else of `default_file` if it exists.

    Raises:
        ApiKeyFileError: `api_key_file` does not exist, or a key file holds no key.
    """
    if api_key:
        return api_key.strip()
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip()
    if api_key_file is not None:
        path = Path(api_key_file).expanduser()
        if not path.is_file():
            raise ApiKeyFileError(f"the API key file {path} does not exist")
        return read_key_file(path)
    if default_file is not None and Path(default_file).expanduser().is_file():
        return read_key_file(Path(default_file).expanduser())
    return None


def make_channel(address: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 aio: bool = False):
    """A gRPC channel: plaintext (loopback, inside a cluster) or TLS."""
    mod = grpc.aio if aio else grpc
    if tls or root_certificates:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return mod.secure_channel(address, creds)
    return mod.insecure_channel(address)


def sampling_params(max_tokens=None, temperature=None, top_p=None, stop=(), seed=None):
    sampling = generation_pb2.SamplingParams(stop=list(stop))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    return sampling


def generate_request(prompt=None, *, messages=None, prompt_token_ids=None, adapter="",
                     max_tokens=None, temperature=None, top_p=None, stop=(), seed=None,
                     json_schema="", client_request_id="") -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(
        adapter=adapter, json_schema=json_schema, client_request_id=client_request_id,
        sampling=sampling_params(max_tokens, temperature, top_p, stop, seed),
    )
    if prompt_token_ids is not None:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
    elif messages is not None:
        req.messages.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in messages)
    else:
        req.prompt = prompt or ""
    return req


def search_request(query, tenant="", top_k=0, alpha=None, filters=()) -> retrieval_pb2.SearchRequest:
    req = retrieval_pb2.SearchRequest(
        tenant=tenant, query=query, top_k=top_k,
        filters=[retrieval_pb2.Filter(field=f, op=_FILTER_OPS.get(op, 0), values=list(v))
                 for f, op, v in filters],
    )
    if alpha is not None:
        req.alpha = alpha
    return req


def ask_request(question: str = "", *, messages: Sequence[tuple[str, str]] | None = None,
                tenant: str = "", adapter: str = "", top_k: int | None = None,
                alpha: float | None = None, filters: Sequence[tuple[str, str, Sequence[str]]] = (),
                rerank: bool | None = None, top_n: int | None = None,
                min_score: float | None = None, max_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None,
                stop: Sequence[str] = (), seed: int | None = None, json_schema: str = "",
                client_request_id: str = "", base_model: bool = False,
                include_prompt: bool = False, prompt_only: bool = False) -> rag_pb2.AskRequest:
    """The AskRequest for these options (None: the server's default).

    base_model: answer with the base model even when the tenant has a default
    adapter. include_prompt: return each source's whole text (Citation.text) and
    the prompt's token ids (Final.prompt_token_ids). prompt_only: build the
    prompt and stop (finish reason "prompt_only", no answer)."""
    req = rag_pb2.AskRequest(
        question=question, tenant=tenant, adapter=adapter, json_schema=json_schema,
        client_request_id=client_request_id, base_model=base_model,
        include_prompt=include_prompt, prompt_only=prompt_only,
        sampling=sampling_params(max_tokens, temperature, top_p, stop, seed),
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages or ()],
    )
    r = req.retrieval
    r.filters.extend(retrieval_pb2.Filter(field=f, op=_FILTER_OPS.get(op, 0), values=list(v))
                     for f, op, v in filters)
    for name, value in (("top_k", top_k), ("alpha", alpha), ("rerank", rerank), ("top_n", top_n),
                        ("min_score", min_score)):
        if value is not None:
            setattr(r, name, value)
    return req


def _has_payload(message) -> bool:
    # A message without payload only carries an error status through Serve's
    # proxy (see grpc_errors.py); it is never part of the answer.
    oneofs = message.DESCRIPTOR.oneofs
    return not oneofs or any(message.WhichOneof(o.name) for o in oneofs)


class Stream:
    """A server stream: iterate it for messages; `cancel()` ends the call (the
    server aborts the work). Errors surface as typed exceptions."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            if _has_payload(message):
                return message

    def cancel(self) -> bool:
        return self._call.cancel()

    def trailing_metadata(self):
        return self._call.trailing_metadata()


class _Api:
    """Every unary RPC, written once: each method builds its request and returns
    `self._invoke(...)`, which the blocking client runs now and the asyncio client
    returns as an awaitable. `post` turns the reply into what the method returns."""

    application: str = GENERATION_APP
    retrieval_app: str = RETRIEVAL_APP
    rerank_app: str = RERANK_APP
    admin_app: str = ADMIN_APP

    def _invoke(self, stub: str, method: str, request, app: str, timeout: float | None,
                post=lambda r: r):
        raise NotImplementedError

    # -- generation -------------------------------------------------------------------

    def list_adapters(self, timeout: float = 30) -> list[generation_pb2.Adapter]:
        """Registered adapters (a tenant key sees only the ones it may use)."""
        return self._invoke("gen", "ListAdapters", generation_pb2.ListAdaptersRequest(),
                            self.application, timeout, lambda r: list(r.adapters))

    # -- knowledge: ingestion, search, rerank -----------------------------------------

    def knowledge_stats(self, timeout: float = 60) -> list[retrieval_pb2.TenantInfo]:
        """Chunks per tenant: every tenant for an admin key, its own for a tenant key."""
        return self._invoke("ret", "ListTenants", retrieval_pb2.ListTenantsRequest(),
                            self.retrieval_app, timeout, lambda r: list(r.tenants))

    def upsert(
        self, tenant: str, documents: Sequence[dict | retrieval_pb2.Document], timeout: float = 600
    ) -> retrieval_pb2.UpsertResponse:
        """Inserts or replaces documents (dicts with id, text, title, source, metadata).
        `tenant` may be "" with a tenant key (its own)."""
        docs = [d if isinstance(d, retrieval_pb2.Document) else retrieval_pb2.Document(**d)
                for d in documents]
        return self._invoke("ret", "Upsert", retrieval_pb2.UpsertRequest(tenant=tenant, documents=docs),
                            self.retrieval_app, timeout)

    def delete_documents(self, tenant: str, doc_ids: Sequence[str], timeout: float = 120) -> int:
        return self._invoke("ret", "Delete",
                            retrieval_pb2.DeleteRequest(tenant=tenant, doc_ids=list(doc_ids)),
                            self.retrieval_app, timeout, lambda r: r.deleted_chunks)

    def search(
        self,
        tenant: str,
        query: str,
        *,
        top_k: int = 0,
        alpha: float | None = None,
        filters: Sequence[tuple[str, str, Sequence[str]]] = (),
        timeout: float = 60,
    ) -> list[retrieval_pb2.Hit]:
        """Hybrid search. `filters`: (field, op, values) with op equal / not_equal / any_of."""
        req = search_request(query, tenant, top_k, alpha, filters)
        return self._invoke("ret", "Search", req, self.retrieval_app, timeout, lambda r: list(r.hits))

    def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int = 0, timeout: float = 60
    ) -> rerank_pb2.RerankResponse:
        return self._invoke(
            "rerank", "Rerank",
            rerank_pb2.RerankRequest(query=query, passages=list(passages), top_n=top_n),
            self.rerank_app, timeout,
        )

    # -- the control plane (admin key) ---------------------------------------------------

    def _adm(self, method: str, request, timeout: float = 60, post=lambda r: r):
        return self._invoke("admin", method, request, self.admin_app, timeout, post)

    def whoami(self, timeout: float = 30) -> admin_pb2.WhoAmIResponse:
        return self._adm("WhoAmI", admin_pb2.WhoAmIRequest(), timeout)

    def create_tenant(self, tenant_id: str, *, display_name: str = "", allow_base: bool = False,
                      system_prompt: str = "", requests_per_minute: int | None = None,
                      tokens_per_minute: int | None = None, concurrent_streams: int | None = None,
                      timeout: float = 60) -> admin_pb2.CreateTenantResponse:
        """Creates a tenant and its knowledge space (`created` is False if it existed).

        A quota not given (None) takes the platform's default (`tenancy.default_quotas`);
        0 is no limit."""
        req = admin_pb2.CreateTenantRequest(
            id=tenant_id, display_name=display_name, allow_base=allow_base,
            system_prompt=system_prompt)
        for name, value in (("requests_per_minute", requests_per_minute),
                            ("tokens_per_minute", tokens_per_minute),
                            ("concurrent_streams", concurrent_streams)):
            if value is not None:
                setattr(req.quotas, name, value)
        return self._adm("CreateTenant", req, timeout)

    def get_tenant(self, tenant_id: str, timeout: float = 30) -> admin_pb2.Tenant:
        return self._adm("GetTenant", admin_pb2.GetTenantRequest(id=tenant_id), timeout)

    def list_tenants(self, timeout: float = 30) -> list[admin_pb2.Tenant]:
        return self._adm("ListTenants", admin_pb2.ListTenantsAdminRequest(), timeout,
                         lambda r: list(r.tenants))

    def update_tenant(self, tenant_id: str, *, display_name: str | None = None,
                      allow_base: bool | None = None, system_prompt: str | None = None,
                      timeout: float = 30) -> admin_pb2.Tenant:
        req = admin_pb2.UpdateTenantRequest(id=tenant_id)
        if display_name is not None:
            req.display_name = display_name
        if allow_base is not None:
            req.allow_base = allow_base
        if system_prompt is not None:
            req.system_prompt = system_prompt
        return self._adm("UpdateTenant", req, timeout)

    def delete_tenant(self, tenant_id: str, timeout: float = 120) -> admin_pb2.DeleteTenantAdminResponse:
        return self._adm("DeleteTenant", admin_pb2.DeleteTenantAdminRequest(id=tenant_id), timeout)

    def create_key(self, tenant: str = "", *, name: str = "", kind: str = "tenant",
                   ttl_seconds: int = 0, timeout: float = 30) -> admin_pb2.CreateKeyResponse:
        """A new key; `.secret` is the whole key, shown this once."""
        return self._adm("CreateKey", admin_pb2.CreateKeyRequest(
            tenant=tenant, name=name, kind=kind, ttl_seconds=ttl_seconds), timeout)

    def list_keys(self, tenant: str = "", *, include_revoked: bool = False,
                  timeout: float = 30) -> list[admin_pb2.ApiKey]:
        return self._adm("ListKeys", admin_pb2.ListKeysRequest(
            tenant=tenant, include_revoked=include_revoked), timeout, lambda r: list(r.keys))

    def revoke_key(self, key_id: str, timeout: float = 30) -> admin_pb2.ApiKey:
        return self._adm("RevokeKey", admin_pb2.RevokeKeyRequest(key_id=key_id), timeout)

    def register_adapter(
        self, name: str, path: str, *, version: str = "", metadata: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> generation_pb2.RegisterAdapterResponse:
        """Registers the adapter folder `path` (inside the adapter store) as `name`."""
        req = generation_pb2.RegisterAdapterRequest(
            name=name, path=path, version=version, metadata=metadata or {}
        )
        return self._adm("RegisterAdapter", req, timeout)

    def unregister_adapter(self, adapter_id: str, timeout: float = 30) -> None:
        return self._adm("UnregisterAdapter",
                         generation_pb2.UnregisterAdapterRequest(id=adapter_id), timeout,
                         lambda r: None)

    def grant_adapter(self, tenant: str, adapter: str, *, make_default: bool = False,
                      timeout: float = 30) -> admin_pb2.Tenant:
        return self._adm("GrantAdapter", admin_pb2.GrantAdapterRequest(
            tenant=tenant, adapter=adapter, make_default=make_default), timeout)

    def revoke_adapter(self, tenant: str, adapter: str, timeout: float = 30) -> admin_pb2.Tenant:
        return self._adm("RevokeAdapter", admin_pb2.RevokeAdapterRequest(
            tenant=tenant, adapter=adapter), timeout)

    def set_quotas(self, tenant: str, *, requests_per_minute: int | None = None,
                   tokens_per_minute: int | None = None, concurrent_streams: int | None = None,
                   timeout: float = 30) -> admin_pb2.Tenant:
        """Sets the given quotas (None leaves one as it is; 0 removes the limit)."""
        req = admin_pb2.SetQuotasRequest(tenant=tenant)
        for name, value in (("requests_per_minute", requests_per_minute),
                            ("tokens_per_minute", tokens_per_minute),
                            ("concurrent_streams", concurrent_streams)):
            if value is not None:
                setattr(req, name, value)
        return self._adm("SetQuotas", req, timeout)

    def apply(self, document: str, *, dry_run: bool = False, keep_grants: bool = False,
              timeout: float = 120) -> admin_pb2.ApplyResponse:
        """Applies a tenants file (YAML text). `keep_grants`: never remove a grant the
        file does not list (grants managed by LoRAAdapter resources)."""
        return self._adm("Apply", admin_pb2.ApplyRequest(
            document=document, dry_run=dry_run, keep_grants=keep_grants), timeout)

    def audit(self, *, limit: int = 100, tenant: str = "", after_id: int | None = None,
              timeout: float = 30) -> list[admin_pb2.AuditEntry]:
        """Newest first; with `after_id`, the oldest entries above that id first
        (export page by page, passing the last id you got; 0 the first time)."""
        req = admin_pb2.ListAuditRequest(limit=limit, tenant=tenant)
        if after_id is not None:
            req.after_id = after_id
        return self._adm("ListAudit", req, timeout, lambda r: list(r.entries))


class _Base(_Api):
    def _setup(self, address, api_key, api_key_file, tls, root_certificates, application,
               default_key_file, aio: bool) -> None:
        self.address = address
        self.application = application
        self.api_key = resolve_api_key(api_key, api_key_file, default_key_file)
        self._channel = make_channel(address, tls=tls, root_certificates=root_certificates, aio=aio)
        self._stubs = {
            "gen": generation_pb2_grpc.GenerationServiceStub(self._channel),
            "ret": retrieval_pb2_grpc.RetrievalServiceStub(self._channel),
            "rerank": rerank_pb2_grpc.RerankServiceStub(self._channel),
            "admin": admin_pb2_grpc.AdminServiceStub(self._channel),
            "rag": rag_pb2_grpc.RagServiceStub(self._channel),
        }

    def _md(self, app: str, adapter: str = "", timeout: float | None = None) -> list[tuple[str, str]]:
        md = [(topology.APPLICATION_HEADER, app)]
        if self.api_key:
            md.append((topology.AUTHORIZATION_HEADER, f"Bearer {self.api_key}"))
        if timeout is not None:
            # gRPC's own deadline stops at Serve's proxy; this one reaches the gateway.
            md.append((topology.TIMEOUT_HEADER, str(int(timeout * 1000))))
        return md


class HybridServeClient(_Base):
    """A blocking client for every service of the platform.

    Args:
        address: host:port of the platform's gRPC endpoint.
        api_key: the key to send (default: $HYBRIDSERVE_API_KEY, then api_key_file).
        api_key_file: a file whose first non-comment line is the key.
        tls: connect with TLS (through an ingress); root_certificates for a private CA.
        application: the Serve app that serves GenerationService.
        default_key_file: read when no key is given otherwise (the CLI passes the
            local admin key file).
    """

    def __init__(self, address: str, *, api_key: str | None = None,
                 api_key_file: str | Path | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, application: str = GENERATION_APP,
                 default_key_file: Path | None = None):
        self._setup(address, api_key, api_key_file, tls, root_certificates, application,
                    default_key_file, aio=False)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> HybridServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _invoke(self, stub, method, request, app, timeout, post=lambda r: r):
        try:
            reply = getattr(self._stubs[stub], method)(request, timeout=timeout, metadata=self._md(app))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return post(reply)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[tuple[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        adapter: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        json_schema: str = "",
        client_request_id: str = "",
        timeout: float | None = None,
    ) -> Stream:
        """Starts a Generate call: iterate the Stream for GenerateResponse messages."""
        req = generate_request(prompt, messages=messages, prompt_token_ids=prompt_token_ids,
                               adapter=adapter, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                               json_schema=json_schema, client_request_id=client_request_id)
        return Stream(self._stubs["gen"].Generate(req, timeout=timeout,
                                                  metadata=self._md(self.application, adapter)))

    def generate(self, prompt: str | None = None, **kwargs) -> tuple[str, list[int], generation_pb2.GenerationFinal]:
        """Runs a generation to the end: (text, token ids, final message)."""
        text, ids, final = [], [], None
        for msg in self.generate_stream(prompt, **kwargs):
            if msg.HasField("delta"):
                text.append(msg.delta.text)
                ids.extend(msg.delta.token_ids)
            else:
                final = msg.final
        return "".join(text), ids, final

    def ask_stream(self, question: str = "", *, timeout: float | None = 300,
                   app: str = RAG_APP, **kwargs) -> Iterator[Sources | Token | Final]:
        """Asks the tenant's documents through its adapter; yields Sources, then
        Tokens, then one Final. Closing the iterator (or breaking out of the loop)
        cancels the call, and the server aborts the generation. kwargs: see
        `ask_request`."""
        call = self._stubs["rag"].Ask(ask_request(question, **kwargs), timeout=timeout,
                                      metadata=self._md(app, timeout=timeout))
        try:
            for msg in call:
                event = event_of(msg)
                if event is not None:
                    yield event
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def ask(self, question: str = "", **kwargs) -> Answer:
        """`ask_stream` to the end, as one Answer (text, citations, usage, timings)."""
        return collect(self.ask_stream(question, **kwargs))


class AsyncHybridServeClient(_Base):
    """The asyncio client (grpc.aio): the same methods as HybridServeClient, each
    awaitable; `generate_stream` and `ask_stream` are async iterators, and
    cancelling the task that iterates one (or closing it) cancels the call.

        async with AsyncHybridServeClient("127.0.0.1:50051", api_key="hst_...") as client:
            answer = await client.ask("How long does a refund take?")
    """

    def __init__(self, address: str, *, api_key: str | None = None,
                 api_key_file: str | Path | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, application: str = GENERATION_APP,
                 default_key_file: Path | None = None):
        self._setup(address, api_key, api_key_file, tls, root_certificates, application,
                    default_key_file, aio=True)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncHybridServeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, stub, method, request, app, timeout, post):
        try:
            reply = await getattr(self._stubs[stub], method)(request, timeout=timeout,
                                                             metadata=self._md(app))
        except grpc.aio.AioRpcError as e:
            raise await from_aio_error(e) from None
        return post(reply)

    def _invoke(self, stub, method, request, app, timeout, post=lambda r: r):
        return self._call(stub, method, request, app, timeout, post)

    async def generate_stream(self, prompt: str | None = None, *, adapter: str = "",
                              timeout: float | None = None, **kwargs) -> AsyncIterator:
        """GenerateResponse messages (deltas, then the final one)."""
        call = self._stubs["gen"].Generate(generate_request(prompt, adapter=adapter, **kwargs),
                                           timeout=timeout,
                                           metadata=self._md(self.application, adapter))
        try:
            async for msg in call:
                if _has_payload(msg):
                    yield msg
        except grpc.aio.AioRpcError as e:
            raise await from_aio_error(e) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | None = None, **kwargs):
        """(text, token ids, final message)."""
        text, ids, final = [], [], None
        async for msg in self.generate_stream(prompt, **kwargs):
            if msg.HasField("delta"):
                text.append(msg.delta.text)
                ids.extend(msg.delta.token_ids)
            else:
                final = msg.final
        return "".join(text), ids, final

    async def ask_stream(self, question: str = "", *, timeout: float | None = 300,
                         app: str = RAG_APP, **kwargs) -> AsyncIterator[Sources | Token | Final]:
        """See HybridServeClient.ask_stream."""
        call = self._stubs["rag"].Ask(ask_request(question, **kwargs), timeout=timeout,
                                      metadata=self._md(app, timeout=timeout))
        try:
            async for msg in call:
                event = event_of(msg)
                if event is not None:
                    yield event
        except grpc.aio.AioRpcError as e:
            raise await from_aio_error(e) from None
        finally:
            call.cancel()

    async def ask(self, question: str = "", **kwargs) -> Answer:
        events = [ev async for ev in self.ask_stream(question, **kwargs)]
        return collect(events)
