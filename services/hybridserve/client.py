"""Python client SDK over the generated gRPC stubs."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from hybridserve.v1 import (
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

_FILTER_OPS = {
    "equal": retrieval_pb2.FILTER_OP_EQUAL,
    "not_equal": retrieval_pb2.FILTER_OP_NOT_EQUAL,
    "any_of": retrieval_pb2.FILTER_OP_ANY_OF,
}


class HybridServeClient:
    """A blocking client.

    Args:
        address: host:port of the platform's gRPC endpoint.
        application: the Serve app that serves GenerationService.
    """

    def __init__(self, address: str, *, application: str = GENERATION_APP):
        self.address = address
        self.application = application
        self._channel = grpc.insecure_channel(address)
        self._gen = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._ret = retrieval_pb2_grpc.RetrievalServiceStub(self._channel)
        self._rerank = rerank_pb2_grpc.RerankServiceStub(self._channel)
        self.retrieval_app = RETRIEVAL_APP
        self.rerank_app = RERANK_APP

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> HybridServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metadata(self, adapter: str = "") -> list[tuple[str, str]]:
        md = [("application", self.application)]
        if adapter:
            # The server routes on the body's adapter field too; the header
            # is the standard Serve spelling of the same thing.
            md.append(("multiplexed_model_id", adapter))
        return md

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
        request_id: str = "",
        timeout: float | None = None,
    ):
        """Starts a Generate call; returns the gRPC stream (iterate it; `.cancel()` stops it)."""
        sampling = generation_pb2.SamplingParams(stop=list(stop))
        if max_tokens is not None:
            sampling.max_tokens = max_tokens
        if temperature is not None:
            sampling.temperature = temperature
        if top_p is not None:
            sampling.top_p = top_p
        if seed is not None:
            sampling.seed = seed
        req = generation_pb2.GenerateRequest(
            adapter=adapter, sampling=sampling, json_schema=json_schema, request_id=request_id
        )
        if messages is not None:
            req.messages.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in messages)
        else:
            req.prompt = prompt or ""
        return self._gen.Generate(req, timeout=timeout, metadata=self._metadata(adapter))

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
        reply = self._gen.ListAdapters(
            generation_pb2.ListAdaptersRequest(), timeout=timeout, metadata=self._metadata()
        )
        return list(reply.adapters)

    def register_adapter(
        self, name: str, path: str, *, version: str = "", metadata: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> generation_pb2.RegisterAdapterResponse:
        req = generation_pb2.RegisterAdapterRequest(
            name=name, path=path, version=version, metadata=metadata or {}
        )
        return self._gen.RegisterAdapter(req, timeout=timeout, metadata=self._metadata())

    def unregister_adapter(self, adapter_id: str, timeout: float = 30) -> None:
        self._gen.UnregisterAdapter(
            generation_pb2.UnregisterAdapterRequest(id=adapter_id), timeout=timeout,
            metadata=self._metadata(),
        )

    # -- knowledge: tenants, ingestion, search, rerank ---------------------------

    def _ret_md(self) -> list[tuple[str, str]]:
        return [("application", self.retrieval_app)]

    def create_tenant(self, tenant: str, timeout: float = 60) -> bool:
        """Creates a tenant's knowledge space; False if it already existed."""
        reply = self._ret.CreateTenant(
            retrieval_pb2.CreateTenantRequest(tenant=tenant), timeout=timeout, metadata=self._ret_md()
        )
        return reply.created

    def delete_tenant(self, tenant: str, timeout: float = 60) -> None:
        self._ret.DeleteTenant(
            retrieval_pb2.DeleteTenantRequest(tenant=tenant), timeout=timeout, metadata=self._ret_md()
        )

    def list_tenants(self, timeout: float = 60) -> list[retrieval_pb2.TenantInfo]:
        reply = self._ret.ListTenants(
            retrieval_pb2.ListTenantsRequest(), timeout=timeout, metadata=self._ret_md()
        )
        return list(reply.tenants)

    def upsert(
        self, tenant: str, documents: Sequence[dict | retrieval_pb2.Document], timeout: float = 600
    ) -> retrieval_pb2.UpsertResponse:
        """Inserts or replaces documents (dicts with id, text, title, source, metadata)."""
        docs = [d if isinstance(d, retrieval_pb2.Document) else retrieval_pb2.Document(**d) for d in documents]
        return self._ret.Upsert(
            retrieval_pb2.UpsertRequest(tenant=tenant, documents=docs),
            timeout=timeout,
            metadata=self._ret_md(),
        )

    def delete_documents(self, tenant: str, doc_ids: Sequence[str], timeout: float = 120) -> int:
        reply = self._ret.Delete(
            retrieval_pb2.DeleteRequest(tenant=tenant, doc_ids=list(doc_ids)),
            timeout=timeout,
            metadata=self._ret_md(),
        )
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
        req = retrieval_pb2.SearchRequest(
            tenant=tenant,
            query=query,
            top_k=top_k,
            filters=[
                retrieval_pb2.Filter(field=f, op=_FILTER_OPS.get(op, 0), values=list(v))
                for f, op, v in filters
            ],
        )
        if alpha is not None:
            req.alpha = alpha
        return list(self._ret.Search(req, timeout=timeout, metadata=self._ret_md()).hits)

    def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int = 0, timeout: float = 60
    ) -> rerank_pb2.RerankResponse:
        return self._rerank.Rerank(
            rerank_pb2.RerankRequest(query=query, passages=list(passages), top_n=top_n),
            timeout=timeout,
            metadata=[("application", self.rerank_app)],
        )
