"""The application gateway, transport-free: who may use which model, under which
quota, then the Ask pipeline, a plain generation or embeddings.

Both application-facing transports call it: the gRPC `RagService` servicer and the
OpenAI-compatible HTTP API (`hybridserve.openai`). So tenant and adapter resolution,
quota admission and its token debit, prompts and citations have one implementation;
a transport authenticates (the one place that reads a credential), converts, and
calls one of these methods.

    principal = await tenancy.authenticate(...)        # the transport
    async for event in gateway.ask(principal, inp, ...):   # SourcesEvent, Delta, AskDone
    async for item in gateway.generate(principal, inp, ...):  # Delta, GenerationDone
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from hybridserve.adapters import AdapterRecord
from hybridserve.adapters.ids import ID_RE, NAME_RE
from hybridserve.config import HybridServeConfig
from hybridserve.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from hybridserve.generation.engine import Delta
from hybridserve.generation.service import (
    GenerateInput,
    GenerationDone,
    estimated_prompt_tokens,
    validate_sampling,
)
from hybridserve.rag.service import AskInput, RagService, ReplicaFailed, Timings
from hybridserve.tenancy.auth import Tenancy
from hybridserve.tenancy.domain import Principal, Tenant
from hybridserve.tenancy.quotas import Lease

#: The `model` value that means the tenant's default (its default adapter, else the base).
DEFAULT_MODEL = "default"


@dataclass(frozen=True)
class ModelEntry:
    """A model a principal may use: the base model (adapter "") or an adapter."""

    id: str
    adapter: str
    #: The adapter's registration time (epoch seconds); 0 for the base model.
    created: float = 0.0


class Gateway:
    """Args:
        config: the platform config.
        tenancy: authentication and quotas (the transport authenticates with it).
        rag: the Ask pipeline; its generator is the one handle hop of every answer.
        adapters: the registry's records, by id (`AdapterRegistry.get`), and all of them
            (`AdapterRegistry.list`); both read files, so they run off the event loop.
        embed: the retrieval model's embedder, `(texts, timeout_s) -> (vectors, tokens)`.
        clock: perf-counter clock.
    """

    def __init__(self, config: HybridServeConfig, tenancy: Tenancy, rag: RagService, *,
                 adapter_exists: Callable[[str], bool],
                 list_adapters: Callable[[], Sequence[AdapterRecord]] | None = None,
                 embed: Callable[[list[str], float], Awaitable[tuple[list, int]]] | None = None,
                 clock=time.perf_counter):
        self.config = config
        self.tenancy = tenancy
        self.rag = rag
        self.adapter_exists = adapter_exists
        self.list_adapters = list_adapters
        self.embedder = embed
        self.clock = clock

    # -- which tenant, which model ----------------------------------------------------

    async def ask_target(self, p: Principal, tenant_field: str, adapter: str, *,
                         base_model: bool = False, prompt_only: bool = False,
                         ) -> tuple[Tenant, str]:
        """The tenant an Ask acts in and the adapter it answers with ("" = base model)."""
        if base_model and adapter:
            raise InvalidArgument(
                "base_model asks with the base model: leave adapter empty, or unset base_model",
                field_violations=[("adapter", "empty with base_model")])
        if not p.is_admin:
            p.own_tenant(tenant_field)
            if prompt_only and not adapter:
                # Nothing is generated: no model to authorize (a named adapter still is,
                # so that its grant is not probed through here).
                return p.tenant, ""
            if base_model:
                return p.tenant, p.authorize_adapter("")  # refused without allow_base
            return p.tenant, p.choose_adapter(adapter)
        tenant_id = await self.tenancy.resolve_tenant(p, tenant_field)
        tenant = await asyncio.to_thread(self.tenancy.store.get_tenant, tenant_id)
        chosen = "" if base_model else (adapter or tenant.default_adapter)
        await self._check_exists(chosen)
        return tenant, chosen

    async def _check_exists(self, adapter: str) -> None:
        if adapter and not await asyncio.to_thread(self.adapter_exists, adapter):
            raise NotFound(f"unknown adapter {adapter!r}; see `hybridserve adapters list`",
                           reason="ADAPTER_NOT_FOUND")

    async def models(self, p: Principal) -> list[ModelEntry]:
        """The models `p` may use: the base model (if allowed) and the registered
        adapters granted to its tenant (an admin: all). Read through the tenancy
        cache, so a grant shows within its TTL."""
        records = await asyncio.to_thread(self.list_adapters) if self.list_adapters else []
        out = [ModelEntry(self.config.model.name, "")] if p.may_use("") else []
        out += [ModelEntry(r.id, r.id, _epoch(r.registered_at)) for r in records if p.may_use(r.id)]
        return out

    async def resolve_model(self, p: Principal, model: str) -> str:
        """The adapter ("" = base model) an OpenAI-style `model` names, checked against
        `p`'s grants: an adapter id, an adapter name (its newest granted version), the
        base model's name, or `default` (the tenant's default adapter, else the base).

        A tenant naming an adapter it was not granted is refused (PERMISSION_DENIED) and
        a name it has no grant of is unknown (NOT_FOUND) whether or not another tenant
        has one: nothing here tells a tenant what others hold.
        """
        if not model:
            raise InvalidArgument("model is required: an adapter id or name, the base model's "
                                  "name, or `default`", field_violations=[("model", "required")])
        if model == DEFAULT_MODEL:
            return "" if p.is_admin else p.choose_adapter("")
        if model == self.config.model.name:
            return p.authorize_adapter("")
        if ID_RE.fullmatch(model):
            p.authorize_adapter(model)
            await self._check_exists(model)
            return model
        if NAME_RE.fullmatch(model) and self.list_adapters is not None:
            records = await asyncio.to_thread(self.list_adapters)
            mine = [r for r in records if r.name == model and p.may_use(r.id)]
            if mine:
                return max(mine, key=lambda r: (r.registered_at, r.version)).id
        raise NotFound(
            f"unknown model {model[:200]!r}: use an adapter your tenant is granted (by id or "
            f"name), {self.config.model.name!r} (the base model) or {DEFAULT_MODEL!r}; "
            "GET /v1/models lists them", reason="MODEL_NOT_FOUND")

    # -- the data paths --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admitted(self, p: Principal, lease: Lease | None, *, stream: bool):
        """`lease` when the transport admitted the request already (before reading its
        body), else a new admission under the tenant's quotas."""
        if lease is not None:
            yield lease
            return
        async with self.tenancy.admit(p, stream=stream) as admitted:
            yield admitted

    async def prompt_tokens(self, inp: GenerateInput) -> int:
        """The prompt's tokens by the served model's tokenizer (its contents, without the
        chat template), what a generation is charged until the replica reports the real
        count: a client hanging up early still pays its prompt."""
        if inp.prompt_token_ids is not None:
            return len(inp.prompt_token_ids)
        if inp.messages is None:
            text = inp.prompt or ""
        else:
            text = "\n".join(c for _, c in inp.messages)
        try:
            return await asyncio.to_thread(lambda: len(self.rag.prompts.tok.encode(text)))
        except Exception:  # noqa: BLE001 - the replica refuses what cannot be tokenized
            return estimated_prompt_tokens(inp)

    async def ask(self, p: Principal, inp: AskInput, *, tenant_field: str = "",
                  base_model: bool = False, started: float, deadline_s: float,
                  timings: Timings, adapter_resolved: bool = False,
                  lease: Lease | None = None) -> AsyncIterator:
        """Answers `inp` from the tenant's documents: SourcesEvent, Deltas, AskDone.
        Admitted under the tenant's quotas and debited with the tokens used, also when
        the consumer closes the stream early (which cancels the engine request);
        `lease`: the transport's own admission (a stream), if it admitted first.

        `adapter_resolved`: `inp.adapter` is already resolved and authorized (the HTTP
        API resolves `model` first); the tenant's default is then not applied again.
        """
        # NOTE: at most the quota lease's life, so a stream never outlives its slot.
        deadline = started + min(deadline_s, self.config.tenancy.stream_lease_s)
        if adapter_resolved:
            if p.is_admin:
                tenant_id = await self.tenancy.resolve_tenant(p, tenant_field)
                tenant = await asyncio.to_thread(self.tenancy.store.get_tenant, tenant_id)
            else:
                p.own_tenant(tenant_field)
                tenant = p.tenant
            adapter = inp.adapter
        else:
            tenant, adapter = await self.ask_target(p, tenant_field, inp.adapter,
                                                    base_model=base_model,
                                                    prompt_only=inp.prompt_only)
        t0 = self.clock()
        # NOTE: admitted first, then validated: checking a request (a JSON schema of up to
        # 64 KB, the filters) is work, so a refused request costs a request of the quota.
        async with self._admitted(p, lease, stream=True) as lease:
            if not timings.quota:
                timings.quota = self.clock() - t0
            plan = self.rag.plan(inp)
            usage = [0, 0]
            answer = self.rag.ask(tenant, adapter, inp, timings=timings, started=started,
                                  deadline=deadline, usage=usage, plan=plan)
            # NOTE: aclosing: a consumer going away closes the pipeline down to the
            # generation replica at once (the engine aborts the request).
            try:
                async with contextlib.aclosing(answer):
                    async for event in answer:
                        yield event
            finally:
                # Tokens per minute: the real usage, also of a cancelled answer.
                lease.tokens = usage[0] + usage[1]

    async def generate(self, p: Principal, inp: GenerateInput, *, started: float,
                       deadline_s: float, lease: Lease | None = None,
                       ) -> AsyncIterator[Delta | GenerationDone]:
        """A generation without retrieval through the same handle hop as Ask's: Deltas,
        then one GenerationDone. `inp.adapter` must be resolved (`resolve_model`).
        Admitted and debited as `ask` is; a replica that fails before the first token is
        retried once."""
        deadline = started + min(deadline_s, self.config.tenancy.stream_lease_s)
        p.authorize_adapter(inp.adapter)
        async with self._admitted(p, lease, stream=True) as lease:
            # An estimate until the replica reports the prompt's size (a cancel pays it).
            lease.tokens = estimated_prompt_tokens(inp)
            lease.tokens = await self.prompt_tokens(inp)
            validate_sampling(inp.temperature, inp.top_p, tuple(inp.stop), inp.json_schema,
                              inp.seed)

            def remaining() -> float:
                left = deadline - self.clock()
                if left <= 0:
                    raise DeadlineExceeded("the request's deadline passed; retry with a longer one")
                return left

            stream = self.rag.generate(inp.adapter, inp, p.tenant_id or "", remaining,
                                       Timings(), started)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, GenerationDone):
                        lease.tokens = item.prompt_tokens + item.completion_tokens
                    else:
                        lease.tokens += len(item.token_ids)
                    yield item

    async def embed(self, p: Principal, texts: list[str], *, deadline_s: float,
                    tenant_field: str = "", lease: Lease | None = None) -> tuple[list, int]:
        """Embeds `texts` with the retrieval model, charged to the caller's tenant as
        Search and Upsert are: a request, and the tokens the model read."""
        if self.embedder is None:
            raise NotFound("embeddings need the retrieval app, which this platform does not run",
                           reason="EMBEDDINGS_UNAVAILABLE")
        if not p.is_admin:
            p.own_tenant(tenant_field)
        async with self._admitted(p, lease, stream=False) as lease:
            lease.tokens = sum(-(-len(t) // 4) for t in texts)
            try:
                vectors, tokens = await self.embedder(texts, deadline_s)
            except ReplicaFailed as e:
                raise Unavailable(f"the retrieval replica failed ({e}); retry the request",
                                  reason="RETRIEVAL_REPLICA_FAILED", retry_after=1.0) from None
            lease.tokens = tokens
            return vectors, tokens


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
