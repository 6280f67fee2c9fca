"""Python client SDK over the generated gRPC stubs."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from hybridserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

#: Serve app that hosts GenerationService; sent so that routing stays right
#: once several apps share the proxy.
GENERATION_APP = "generation"


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
