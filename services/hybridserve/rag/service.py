"""The Ask pipeline, transport-free: a short list of awaited domain calls, each timed.

    validate -> [retrieve (embed + hybrid search) || prefetch the adapter]
             -> rerank (fused with the retrieval score) -> min score, top_n
             -> prompt (token budget, tokenized once) -> sources
             -> generate (token ids, one handle hop, retried once before the first token)
             -> final (usage, citations the answer used, timings)

The backends are protocols: Serve deployment handles in production
(`rag/handles.py`), fakes in unit tests. Nothing here knows gRPC or Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hybridserve.config import HybridServeConfig
from hybridserve.errors import (
    DeadlineExceeded,
    HybridServeError,
    InvalidArgument,
    Unavailable,
)
from hybridserve.generation.engine import Delta
from hybridserve.generation.service import GenerateInput, GenerationDone, validate_sampling
from hybridserve.rag import citations
from hybridserve.rag.prompt import BuiltPrompt, PromptBuilder
from hybridserve.rerank import fusion
from hybridserve.retrieval.documents import FieldFilter, Hit, RetrievalResult
from hybridserve.tenancy.domain import Tenant

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class AskInput:
    """An Ask as the caller sent it (unset options are None)."""

    question: str = ""
    messages: Sequence[tuple[str, str]] = ()
    adapter: str = ""
    top_k: int | None = None
    alpha: float | None = None
    filters: Sequence[FieldFilter] = ()
    rerank: bool | None = None
    top_n: int | None = None
    min_score: float | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    json_schema: str = ""
    client_request_id: str = ""
    #: Stop after the prompt is built: sources, then AskDone("prompt_only") with its ids.
    prompt_only: bool = False


@dataclass(frozen=True)
class Passage:
    """A candidate passage with every score the pipeline gave it."""

    hit: Hit
    score: float  # the ranking score: fused when reranked, else retrieval's
    rerank_score: float | None = None

    @property
    def relevance(self) -> float | None:
        """What min_score is compared with: the reranker's score, else the vector
        (cosine) score; None when neither exists (keyword-only, no rerank)."""
        if self.rerank_score is not None:
            return self.rerank_score
        return self.hit.vector_score


@dataclass(frozen=True)
class Source:
    number: int
    passage: Passage
    #: The text as the prompt holds it (it may be cut to fit).
    text: str


@dataclass
class Timings:
    auth: float = 0.0
    quota: float = 0.0
    embed: float = 0.0
    retrieve: float = 0.0
    rerank: float = 0.0
    prompt: float = 0.0
    queue: float = 0.0
    first_token: float = 0.0
    total: float = 0.0
    #: When the (last) generation call was made, on the service's clock; internal.
    generation_started: float = 0.0


@dataclass(frozen=True)
class SourcesEvent:
    sources: list[Source]


@dataclass(frozen=True)
class AskDone:
    finish_reason: str  # "stop", "length", "abort" or "no_context"
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    replica_id: str
    cited: list[int]
    invalid_citations: list[int]
    timings: Timings
    request_id: str
    client_request_id: str
    tenant: str
    passage_token_budget: int = 0
    passage_tokens: int = 0
    #: Prompt tokens the engine served from the tenant's own prefix cache.
    cached_prompt_tokens: int = 0
    #: The prompt's token ids as the engine got them (or, with prompt_only, would have).
    prompt_token_ids: tuple[int, ...] = ()


class Retriever(Protocol):
    async def retrieve(self, tenant: str, query: str, top_k: int, alpha: float | None,
                       filters: Sequence[FieldFilter], timeout_s: float) -> RetrievalResult: ...


class Reranker(Protocol):
    async def scores(self, query: str, passages: Sequence[str], timeout_s: float) -> list[float]: ...


class Generator(Protocol):
    async def prefetch(self, adapter: str, timeout_s: float) -> None: ...

    def generate(self, adapter: str, inp: GenerateInput, tenant: str,
                 timeout_s: float) -> AsyncIterator[Delta | GenerationDone]:
        """Deltas then one GenerationDone. Closing it cancels the generation."""


class ReplicaFailed(Exception):
    """The generation replica died or could not be reached (retryable before the
    first token)."""


@dataclass
class _Plan:
    query: str
    question: str
    history: list[tuple[str, str]]
    top_k: int
    top_n: int
    rerank: bool
    min_score: float
    max_tokens: int
    gen: dict[str, Any] = field(default_factory=dict)


class RagService:
    """Args:
        config: the platform config (rag, retrieval and generation defaults).
        retriever / reranker / generator: the backends (see the protocols).
        prompts: builds the prompt with the served model's tokenizer.
        clock: perf-counter clock (tests inject one).
    """

    def __init__(self, config: HybridServeConfig, retriever: Retriever, reranker: Reranker,
                 generator: Generator, prompts: PromptBuilder, clock=time.perf_counter):
        self.config = config
        self.cfg = config.rag
        self.retriever = retriever
        self.reranker = reranker
        self.generator = generator
        self.prompts = prompts
        self.clock = clock
        self._last_used: OrderedDict[str, float] = OrderedDict()

    # -- validation -------------------------------------------------------------------

    def plan(self, inp: AskInput) -> _Plan:
        cfg, limit = self.cfg, self.cfg.max_question_chars
        if inp.question and inp.messages:
            raise InvalidArgument("send a question or messages, not both",
                                  field_violations=[("messages", "leave empty with question")])
        history: list[tuple[str, str]] = []
        if inp.messages:
            if len(inp.messages) > cfg.max_messages:
                raise InvalidArgument(
                    f"{len(inp.messages)} messages; at most {cfg.max_messages} (rag.max_messages)",
                    field_violations=[("messages", f"at most {cfg.max_messages}")])
            for i, (role, content) in enumerate(inp.messages):
                if role not in ROLES:
                    raise InvalidArgument(f"messages[{i}].role is {role!r}; use one of "
                                          f"{', '.join(ROLES)}",
                                          field_violations=[(f"messages[{i}].role", "system, user or assistant")])
                if not content.strip():
                    raise InvalidArgument(f"messages[{i}].content is empty",
                                          field_violations=[(f"messages[{i}].content", "not empty")])
                if len(content) > limit:
                    raise InvalidArgument(
                        f"messages[{i}].content has {len(content)} characters; the limit is {limit}",
                        field_violations=[(f"messages[{i}].content", f"at most {limit} characters")])
            if inp.messages[-1][0] != "user":
                users = [m for m in inp.messages if m[0] == "user"]
                raise InvalidArgument(
                    "the history must end with the user's turn" if users else
                    "the history has no user turn: end it with the user's question",
                    field_violations=[("messages", "must end with a user message")])
            question = inp.messages[-1][1].strip()
            history = [(r, c) for r, c in inp.messages[:-1] if r != "system"]
            earlier = [c for r, c in inp.messages[:-1] if r == "user"][-cfg.history_turns:] \
                if cfg.history_turns else []
            # The last turn leads and stays whole; earlier user turns (newest first)
            # add context, cut to the query limit.
            query = question
            for turn in reversed(earlier):
                room = cfg.history_query_chars - len(query) - 1
                if room <= 0:
                    break
                query = f"{query} {turn.strip()[:room]}"
        else:
            question = inp.question.strip()
            if not question:
                raise InvalidArgument("the question is empty; send a question or messages",
                                      field_violations=[("question", "not empty")])
            if len(inp.question) > limit:
                raise InvalidArgument(
                    f"the question has {len(inp.question)} characters; the limit is {limit} "
                    "(rag.max_question_chars)",
                    field_violations=[("question", f"at most {limit} characters")])
            query = question
        max_top_k = self.config.retrieval.max_top_k
        top_k = cfg.top_k if inp.top_k is None else inp.top_k
        if not 1 <= top_k <= max_top_k:
            raise InvalidArgument(
                f"retrieval.top_k must be between 1 and {max_top_k} (retrieval.max_top_k), got {top_k}",
                field_violations=[("retrieval.top_k", f"1..{max_top_k}")])
        top_n = cfg.top_n if inp.top_n is None else inp.top_n
        if not 1 <= top_n <= max_top_k:
            raise InvalidArgument(f"retrieval.top_n must be between 1 and {max_top_k}, got {top_n}",
                                  field_violations=[("retrieval.top_n", f"1..{max_top_k}")])
        min_score = cfg.min_score if inp.min_score is None else inp.min_score
        if not math.isfinite(min_score):
            raise InvalidArgument("retrieval.min_score must be a finite number",
                                  field_violations=[("retrieval.min_score", "finite")])
        max_tokens = self.config.generation.max_tokens if inp.max_tokens is None else inp.max_tokens
        if max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}",
                                  field_violations=[("sampling.max_tokens", ">= 1")])
        if max_tokens >= self.prompts.max_model_len:
            raise InvalidArgument(
                f"max_tokens is {max_tokens} but the model's context window is "
                f"{self.prompts.max_model_len} tokens (prompt + answer); lower max_tokens",
                field_violations=[("sampling.max_tokens", f"below {self.prompts.max_model_len}")])
        # The generation replica checks these again; here so that bad input fails
        # before retrieval, quotas and the sources event.
        validate_sampling(inp.temperature, inp.top_p, tuple(inp.stop), inp.json_schema)
        gen = dict(temperature=inp.temperature, top_p=inp.top_p, stop=tuple(inp.stop),
                   seed=inp.seed, json_schema=inp.json_schema)
        return _Plan(query, question, history, top_k, min(top_n, top_k),
                     cfg.rerank if inp.rerank is None else inp.rerank, min_score, max_tokens, gen)

    # -- the pipeline -------------------------------------------------------------------

    async def ask(self, tenant: Tenant, adapter: str, inp: AskInput, *, timings: Timings,
                  started: float, deadline: float, usage: list[int] | None = None,
                  plan: _Plan | None = None) -> AsyncIterator[SourcesEvent | Delta | AskDone]:
        """Answers `inp` for `tenant` (authenticated) with `adapter` (authorized).

        `usage` (prompt, completion tokens so far) is kept current for the caller's
        quota debit, also when the stream is cancelled. `plan`: `self.plan(inp)`, when
        the caller has validated the input already.
        """
        plan = plan or self.plan(inp)
        request_id = uuid.uuid4().hex
        usage = usage if usage is not None else [0, 0]

        def remaining() -> float:
            left = deadline - self.clock()
            if left <= 0:
                raise DeadlineExceeded("the request's deadline passed; retry with a longer one")
            return left

        prefetch = None
        if (adapter and not inp.prompt_only and self.cfg.prefetch_adapter
                and not self._recently_used(adapter)):
            prefetch = asyncio.ensure_future(self._prefetch(adapter, remaining()))
        try:
            result = await self.retriever.retrieve(
                tenant.id, plan.query, plan.top_k, inp.alpha, tuple(inp.filters), remaining())
            timings.embed, timings.retrieve = result.embed_s, result.retrieve_s
            passages = await self._rank(plan, result.hits, remaining, timings)
            kept = [p for p in passages if p.relevance is None or p.relevance >= plan.min_score]
            kept = kept[: plan.top_n]
            if not kept and self.cfg.no_context == "refuse":
                yield SourcesEvent([])
                if not inp.prompt_only:
                    yield Delta(text=self.cfg.no_context_message, token_ids=())
                timings.total = self.clock() - started
                yield AskDone("no_context", 0, 0, "", "", [], [], timings, request_id,
                              inp.client_request_id, tenant.id)
                return
            t0 = self.clock()
            built: BuiltPrompt = await asyncio.to_thread(
                self.prompts.build, question=plan.question,
                passages=[(p.hit.title, p.hit.text) for p in kept], max_tokens=plan.max_tokens,
                system_prompt=tenant.system_prompt, history=plan.history, no_context=not kept)
            timings.prompt = self.clock() - t0
            if kept and not built.passages and self.cfg.no_context == "refuse":
                # Passages passed min_score, but none fits the context next to the
                # question and max_tokens: that is no context too.
                yield SourcesEvent([])
                if not inp.prompt_only:
                    yield Delta(text=self.cfg.no_context_message, token_ids=())
                timings.total = self.clock() - started
                yield AskDone("no_context", 0, 0, "", "", [], [], timings, request_id,
                              inp.client_request_id, tenant.id, built.passage_budget, 0)
                return
            sources = [Source(pp.number, kept[pp.number - 1], pp.text) for pp in built.passages]
            # Charged before the passages go out: a client that reads them and hangs up
            # (or asked for prompt_only) still pays the prompt's tokens.
            usage[0] = len(built.token_ids)
            yield SourcesEvent(sources)
            if inp.prompt_only:
                timings.total = self.clock() - started
                yield AskDone("prompt_only", len(built.token_ids), 0, adapter, "", [], [], timings,
                              request_id, inp.client_request_id, tenant.id, built.passage_budget,
                              built.passage_tokens, 0, tuple(built.token_ids))
                return
            if prefetch is not None:
                await self._settle(prefetch)
                prefetch = None
            gen_inp = GenerateInput(prompt_token_ids=built.token_ids, adapter=adapter,
                                    max_tokens=plan.max_tokens, client_request_id=request_id,
                                    **plan.gen)
            text: list[str] = []
            done = None
            # NOTE: aclosing at every level: a client going away must close the chain
            # down to the handle stream now (which cancels the engine request), not
            # whenever the garbage collector finalizes it.
            generation = self.generate(adapter, gen_inp, tenant.id, remaining, timings, started)
            async with contextlib.aclosing(generation):
                async for item in generation:
                    if isinstance(item, GenerationDone):
                        done = item
                        continue
                    text.append(item.text)
                    usage[1] += len(item.token_ids)
                    yield item
            assert done is not None
            usage[:] = [done.prompt_tokens, done.completion_tokens]
            if done.first_token_s is not None:
                # Gateway-to-first-token minus the replica's own receive-to-first-token.
                since_call = timings.first_token - (timings.generation_started - started)
                timings.queue = max(0.0, since_call - done.first_token_s)
            cited, invalid = citations.check("".join(text), len(sources))
            timings.total = self.clock() - started
            yield AskDone(done.finish_reason, done.prompt_tokens, done.completion_tokens,
                          done.adapter, done.replica_id, cited, invalid, timings, request_id,
                          inp.client_request_id, tenant.id, built.passage_budget,
                          built.passage_tokens, done.cached_prompt_tokens, tuple(built.token_ids))
        finally:
            if prefetch is not None and not prefetch.done():
                prefetch.cancel()

    def _recently_used(self, adapter: str) -> bool:
        """Whether this gateway answered with `adapter` within rag.prefetch_skip_s: then
        it is almost surely resident, and a prefetch would be a wasted call (if it was
        evicted meanwhile, generation loads it, as without prefetch)."""
        now = self.clock()
        last = self._last_used.get(adapter)
        self._last_used[adapter] = now
        self._last_used.move_to_end(adapter)
        while len(self._last_used) > 4096:
            self._last_used.popitem(last=False)
        return last is not None and now - last < self.cfg.prefetch_skip_s

    async def _prefetch(self, adapter: str, timeout_s: float) -> None:
        try:
            await self.generator.prefetch(adapter, timeout_s)
        except Exception as e:  # noqa: BLE001 - the generation call loads it anyway
            logger.info("prefetching adapter %s failed (%s); generation loads it", adapter, e)

    @staticmethod
    async def _settle(task: asyncio.Future) -> None:
        with contextlib.suppress(Exception):
            await task

    @property
    def rerank_is_the_embedder(self) -> bool:
        """Whether the reranker is the bi-encoder on retrieval's own embedding model:
        then its score of a chunk is the cosine of the query's and the chunk's
        embeddings, which hybrid search already returned as the vector score."""
        r = self.config.rerank
        return r.backend == "bi-encoder" and r.model in (None, self.config.retrieval.embedding_model)

    async def _rank(self, plan: _Plan, hits: list[Hit], remaining, timings: Timings) -> list[Passage]:
        if not hits:
            return []
        if not plan.rerank:
            return [Passage(h, h.score) for h in hits]
        t0 = self.clock()
        if self.rerank_is_the_embedder and all(h.vector_score is not None for h in hits):
            # NOTE: the same number the rerank service would compute (the query and
            # each chunk embedded by the same model; measured equal to 4e-7), without
            # its hop and forward passes. Keyword-only searches have no vector score
            # and still go to the reranker.
            scores = [float(h.vector_score) for h in hits]
        else:
            scores = await self.reranker.scores(plan.query, [h.text for h in hits], remaining())
        timings.rerank = self.clock() - t0
        weight = self.config.rerank.fusion_weight
        fused = fusion.fuse([h.score for h in hits], scores, weight)
        order = fusion.order([h.score for h in hits], scores, weight)
        return [Passage(hits[i], fused[i], float(scores[i])) for i in order]

    async def generate(self, adapter: str, inp: GenerateInput, tenant: str, remaining,
                       timings: Timings, started: float) -> AsyncIterator:
        """The generation stream (Deltas, then one GenerationDone) through the one handle
        hop; a replica that fails before the first token is retried once (Serve routes
        the retry away from a dead replica). `remaining()` gives the seconds left."""
        for attempt in (1, 2):
            timings.generation_started = self.clock()
            stream = self.generator.generate(adapter, inp, tenant, remaining())
            first = True
            try:
                async with contextlib.aclosing(stream):
                    async for item in stream:
                        if first and not isinstance(item, GenerationDone):
                            first = False
                            timings.first_token = self.clock() - started
                        yield item
                return
            except ReplicaFailed as e:
                if first and attempt == 1:
                    logger.warning("generation replica failed before the first token (%s); "
                                   "retrying once", e)
                    continue
                raise Unavailable(
                    "the generation replica failed "
                    + ("before the first token, twice" if first else "mid-answer")
                    + f" ({e}); retry the request", reason="GENERATION_REPLICA_FAILED",
                    retry_after=1.0) from None
            except HybridServeError:
                raise
