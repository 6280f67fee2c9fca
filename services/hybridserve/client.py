"""Python client SDK over the generated gRPC stubs.

    from hybridserve.client import HybridServeClient

    with HybridServeClient("127.0.0.1:50051", api_key="hst_...") as client:
        hits = client.search("refund policy")            # the key's own tenant
        text, ids, final = client.generate("Hi", adapter="support-formal@3f2a1b9c0d4e")

Credentials: `api_key=`, else `$HYBRIDSERVE_API_KEY`, else `api_key_file=`. Pass
`tls=True` (and `root_certificates=` for a private CA) to reach the platform
through a TLS-terminating ingress. Failed calls raise the typed exceptions of
`hybridserve.exceptions` (`AuthenticationError`, `PermissionDeniedError`,
`RateLimitError` with `retry_after`, `NotFoundError`, `InvalidArgumentError`, ...),
which are `grpc.RpcError`s too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from hybridserve.exceptions import HybridServeAPIError, from_rpc_error
from hybridserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)

#: Serve apps hosting each service; sent as `application` metadata, which is
#: how Serve's gRPC proxy picks the app when several share it.
GENERATION_APP = "generation"
RETRIEVAL_APP = "retrieval"
RERANK_APP = "rerank"
ADMIN_APP = "admin"
#: Environment variable the SDK and the CLI read the key from.
API_KEY_ENV = "HYBRIDSERVE_API_KEY"

_FILTER_OPS = {
    "equal": retrieval_pb2.FILTER_OP_EQUAL,
    "not_equal": retrieval_pb2.FILTER_OP_NOT_EQUAL,
    "any_of": retrieval_pb2.FILTER_OP_ANY_OF,
}

__all__ = [
    "API_KEY_ENV",
    "HybridServeAPIError",
    "HybridServeClient",
    "Stream",
    "resolve_api_key",
]


def resolve_api_key(api_key: str | None = None, api_key_file: str | Path | None = None,
                    default_file: Path | None = None) -> str | None:
    """The key to send: `api_key`, else $HYBRIDSERVE_API_KEY, else the first
    key line of `api_key_file`, else of `default_file` if it exists."""
    from hybridserve.errors import InvalidArgument
    from hybridserve.tenancy.bootstrap import read_key_file

    if api_key:
        return api_key.strip()
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip()
    if api_key_file is not None:
        path = Path(api_key_file).expanduser()
        if not path.is_file():
            raise InvalidArgument(f"the API key file {path} does not exist")
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


def generate_request(prompt=None, *, messages=None, adapter="", max_tokens=None,
                     temperature=None, top_p=None, stop=(), seed=None, json_schema="",
                     client_request_id="") -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(
        adapter=adapter, json_schema=json_schema, client_request_id=client_request_id,
        sampling=sampling_params(max_tokens, temperature, top_p, stop, seed),
    )
    if messages is not None:
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


class HybridServeClient:
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
        self.address = address
        self.application = application
        self.api_key = resolve_api_key(api_key, api_key_file, default_key_file)
        self._channel = make_channel(address, tls=tls, root_certificates=root_certificates)
        self._gen = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._ret = retrieval_pb2_grpc.RetrievalServiceStub(self._channel)
        self._rerank = rerank_pb2_grpc.RerankServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self.retrieval_app = RETRIEVAL_APP
        self.rerank_app = RERANK_APP
        self.admin_app = ADMIN_APP

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> HybridServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _md(self, app: str, adapter: str = "") -> list[tuple[str, str]]:
        md = [("application", app)]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        if adapter:
            # The server routes on the body's adapter field too; the header is the
            # standard Serve spelling of the same thing.
            md.append(("multiplexed_model_id", adapter))
        return md

    def _unary(self, method, request, app: str, timeout: float | None):
        try:
            return method(request, timeout=timeout, metadata=self._md(app))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # -- generation -------------------------------------------------------------------

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[tuple[str, str]] | None = None,
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
        req = generate_request(prompt, messages=messages, adapter=adapter, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                               json_schema=json_schema, client_request_id=client_request_id)
        return Stream(self._gen.Generate(req, timeout=timeout,
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

    def list_adapters(self, timeout: float = 30) -> list[generation_pb2.Adapter]:
        """Registered adapters (a tenant key sees only the ones it may use)."""
        reply = self._unary(self._gen.ListAdapters, generation_pb2.ListAdaptersRequest(),
                            self.application, timeout)
        return list(reply.adapters)

    def register_adapter(
        self, name: str, path: str, *, version: str = "", metadata: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> generation_pb2.RegisterAdapterResponse:
        req = generation_pb2.RegisterAdapterRequest(
            name=name, path=path, version=version, metadata=metadata or {}
        )
        return self._unary(self._gen.RegisterAdapter, req, self.application, timeout)

    def unregister_adapter(self, adapter_id: str, timeout: float = 30) -> None:
        self._unary(self._gen.UnregisterAdapter,
                    generation_pb2.UnregisterAdapterRequest(id=adapter_id), self.application, timeout)

    # -- knowledge: ingestion, search, rerank -----------------------------------------

    def knowledge_stats(self, timeout: float = 60) -> list[retrieval_pb2.TenantInfo]:
        """Chunks per tenant: every tenant for an admin key, its own for a tenant key."""
        reply = self._unary(self._ret.ListTenants, retrieval_pb2.ListTenantsRequest(),
                            self.retrieval_app, timeout)
        return list(reply.tenants)

    def upsert(
        self, tenant: str, documents: Sequence[dict | retrieval_pb2.Document], timeout: float = 600
    ) -> retrieval_pb2.UpsertResponse:
        """Inserts or replaces documents (dicts with id, text, title, source, metadata).
        `tenant` may be "" with a tenant key (its own)."""
        docs = [d if isinstance(d, retrieval_pb2.Document) else retrieval_pb2.Document(**d) for d in documents]
        return self._unary(self._ret.Upsert, retrieval_pb2.UpsertRequest(tenant=tenant, documents=docs),
                           self.retrieval_app, timeout)

    def delete_documents(self, tenant: str, doc_ids: Sequence[str], timeout: float = 120) -> int:
        reply = self._unary(self._ret.Delete,
                            retrieval_pb2.DeleteRequest(tenant=tenant, doc_ids=list(doc_ids)),
                            self.retrieval_app, timeout)
        return reply.deleted_chunks

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
        return list(self._unary(self._ret.Search, req, self.retrieval_app, timeout).hits)

    def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int = 0, timeout: float = 60
    ) -> rerank_pb2.RerankResponse:
        return self._unary(
            self._rerank.Rerank,
            rerank_pb2.RerankRequest(query=query, passages=list(passages), top_n=top_n),
            self.rerank_app, timeout,
        )

    # -- the control plane (admin key) ---------------------------------------------------

    def _adm(self, method: str, request, timeout: float = 60):
        return self._unary(getattr(self._admin, method), request, self.admin_app, timeout)

    def whoami(self, timeout: float = 30) -> admin_pb2.WhoAmIResponse:
        return self._adm("WhoAmI", admin_pb2.WhoAmIRequest(), timeout)

    def create_tenant(self, tenant_id: str, *, display_name: str = "", allow_base: bool = False,
                      system_prompt: str = "", requests_per_minute: int = 0,
                      tokens_per_minute: int = 0, concurrent_streams: int = 0,
                      timeout: float = 60) -> admin_pb2.CreateTenantResponse:
        """Creates a tenant and its knowledge space (`created` is False if it existed)."""
        return self._adm("CreateTenant", admin_pb2.CreateTenantRequest(
            id=tenant_id, display_name=display_name, allow_base=allow_base,
            system_prompt=system_prompt,
            quotas=admin_pb2.Quotas(requests_per_minute=requests_per_minute,
                                    tokens_per_minute=tokens_per_minute,
                                    concurrent_streams=concurrent_streams),
        ), timeout)

    def get_tenant(self, tenant_id: str, timeout: float = 30) -> admin_pb2.Tenant:
        return self._adm("GetTenant", admin_pb2.GetTenantRequest(id=tenant_id), timeout)

    def list_tenants(self, timeout: float = 30) -> list[admin_pb2.Tenant]:
        return list(self._adm("ListTenants", admin_pb2.ListTenantsAdminRequest(), timeout).tenants)

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
        return list(self._adm("ListKeys", admin_pb2.ListKeysRequest(
            tenant=tenant, include_revoked=include_revoked), timeout).keys)

    def revoke_key(self, key_id: str, timeout: float = 30) -> admin_pb2.ApiKey:
        return self._adm("RevokeKey", admin_pb2.RevokeKeyRequest(key_id=key_id), timeout)

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

    def apply(self, document: str, *, dry_run: bool = False,
              timeout: float = 120) -> admin_pb2.ApplyResponse:
        """Applies a tenants file (YAML text)."""
        return self._adm("Apply", admin_pb2.ApplyRequest(document=document, dry_run=dry_run), timeout)

    def audit(self, *, limit: int = 100, tenant: str = "",
              timeout: float = 30) -> list[admin_pb2.AuditEntry]:
        return list(self._adm("ListAudit", admin_pb2.ListAuditRequest(limit=limit, tenant=tenant),
                              timeout).entries)
