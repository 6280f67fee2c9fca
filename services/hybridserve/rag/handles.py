"""The gateway's backends as Serve deployment handles: domain methods with plain
dataclasses, never the other services' gRPC servicers.

One handle hop carries the token stream (gateway -> generation replica), with the
adapter as Serve's multiplexed model id, so the request lands on a replica that
holds the adapter (the adapter router also reads it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from hybridserve import topology
from hybridserve.errors import DeadlineExceeded, HybridServeError, ResourceExhausted
from hybridserve.generation.service import GenerateInput
from hybridserve.rag.service import ReplicaFailed, RetrievalResult
from hybridserve.rerank.service import RerankInput
from hybridserve.retrieval.documents import FieldFilter


#: The retry delay an overloaded backend suggests (Serve gives none).
_OVERLOAD_RETRY_S = 1.0


def _domain_error(err: BaseException) -> BaseException:
    """The domain error a deployment raised, unwrapped from Ray's RayTaskError; a
    replica that died or cannot be reached becomes ReplicaFailed."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    cause = getattr(err, "cause", None)
    if isinstance(err, RayTaskError) and isinstance(cause, HybridServeError):
        return cause
    if isinstance(err, HybridServeError):
        return err
    if isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError)):
        return ReplicaFailed(type(err).__name__)
    from ray.serve.exceptions import BackPressureError

    if isinstance(err, BackPressureError) or isinstance(cause, BackPressureError):
        # Every replica is at max_ongoing_requests and this caller's queue is full.
        return ResourceExhausted(
            "the platform is at capacity (every replica busy and the queue full); retry "
            "after the delay given", reason="OVERLOADED", retry_after=_OVERLOAD_RETRY_S)
    try:
        from ray.serve.exceptions import DeploymentUnavailableError

        if isinstance(err, DeploymentUnavailableError):
            return ReplicaFailed(type(err).__name__)
    except ImportError:  # pragma: no cover - older Serve
        pass
    if isinstance(err, RayTaskError):
        # The engine or the replica broke while serving (e.g. vLLM's EngineDeadError).
        return ReplicaFailed(f"{type(cause).__name__ if cause else 'RayTaskError'}: {cause or err}")
    return err


async def _call(response, timeout_s: float):
    try:
        return await asyncio.wait_for(response, timeout_s)
    except TimeoutError:
        raise DeadlineExceeded("the request's deadline passed; retry with a longer one") from None
    except Exception as e:  # noqa: BLE001 - mapped to the domain's errors
        raise _domain_error(e) from None


class ServeRetriever:
    """Hybrid search in the retrieval app. With `embed` (the gateway's own query
    embedder), the query vector is computed here and passed along: no extra hop."""

    def __init__(self, app: str, embed=None):
        self.app = app
        self.embed = embed

    async def retrieve(self, tenant: str, query: str, top_k: int, alpha: float | None,
                       filters: Sequence[FieldFilter], timeout_s: float) -> RetrievalResult:
        from ray import serve

        vector, embed_s = None, 0.0
        if self.embed is not None and (alpha is None or alpha > 0):
            t0 = time.perf_counter()
            vector = await self.embed(query)
            embed_s = time.perf_counter() - t0
        handle = serve.get_deployment_handle(topology.RETRIEVAL.ingress, app_name=self.app)
        result = await _call(handle.retrieve_for_gateway.remote(
            tenant, query, top_k, alpha, tuple(filters), vector, timeout_s), timeout_s)
        if vector is not None:
            result = RetrievalResult(result.hits, embed_s, result.retrieve_s)
        return result


    async def embed_texts(self, texts: list[str], timeout_s: float) -> tuple[list, int]:
        """The retrieval model's embeddings of `texts` and the tokens it read."""
        from ray import serve

        handle = serve.get_deployment_handle(topology.RETRIEVAL.ingress, app_name=self.app)
        return await _call(handle.embed_for_gateway.remote(list(texts), timeout_s), timeout_s)


class ServeReranker:
    def __init__(self, app: str):
        self.app = app

    async def scores(self, query: str, passages: Sequence[str], timeout_s: float) -> list[float]:
        from ray import serve

        handle = serve.get_deployment_handle(topology.RERANK.ingress, app_name=self.app)
        ranked = await _call(handle.rerank.remote(RerankInput(query, tuple(passages))), timeout_s)
        out = [0.0] * len(passages)
        for r in ranked:
            out[r.index] = r.score
        return out


class ServeGenerator:
    def __init__(self, app: str):
        self.app = app

    def _handle(self, adapter: str):
        from ray import serve

        handle = serve.get_deployment_handle(topology.GENERATION.ingress, app_name=self.app)
        return handle.options(multiplexed_model_id=adapter) if adapter else handle

    async def prefetch(self, adapter: str, timeout_s: float) -> None:
        await _call(self._handle(adapter).prefetch_adapter.remote(adapter), timeout_s)

    async def generate(self, adapter: str, inp: GenerateInput, tenant: str,
                       timeout_s: float) -> AsyncIterator:
        stream = self._handle(adapter).options(stream=True).generate_for_gateway.remote(
            inp, tenant, timeout_s)
        try:
            async for item in stream:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to the domain's errors
            raise _domain_error(e) from None
        finally:
            # NOTE: a client that went away (or an error here) cancels the replica's
            # generator, which aborts the engine request.
            stream.cancel()
