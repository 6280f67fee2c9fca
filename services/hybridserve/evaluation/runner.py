"""Runs a tenant's question set through the arms of `hybridserve eval`, on the served
platform, through the SDK's asyncio client.

The four arms, each the same question with the same sampling options:

- ``base``: GenerationService.Generate, chat messages (the tenant's system prompt as a
  system turn, if it has one, then the question), no adapter;
- ``adapter``: the same with the adapter;
- ``rag``: RagService.Ask with ``base_model=True`` (the base model, even when the tenant
  has a default adapter);
- ``rag+adapter``: RagService.Ask with the adapter.

Both RAG arms ask with ``include_prompt=True``, so each source's whole text (as the
prompt holds it) is scored, not only its snippet.

Everything that can be wrong with the input (the question file, the arms, the tenant,
the adapter, the tenant's base-model permission) is found by `resolve_target` and the
loaders before any question is asked (`EvalInputError`). A call that fails is retried
when the platform says so (RESOURCE_EXHAUSTED, UNAVAILABLE), else it becomes a failed
`Outcome` that still counts in every denominator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from hybridserve.exceptions import HybridServeAPIError, NotFoundError
from hybridserve.scoring import (
    ArmSummary,
    Outcome,
    Paired,
    Question,
    QuestionScore,
    QuestionSet,
    SourceRef,
    paired,
    score,
    summarize,
)
from hybridserve.v1 import admin_pb2, common_pb2

#: Every arm, in the order they run and are reported.
ARMS = ("base", "adapter", "rag", "rag+adapter")
#: Arms that answer with the adapter.
ADAPTER_ARMS = frozenset({"adapter", "rag+adapter"})
#: Arms that answer with the base model (they need the tenant's allow_base).
BASE_ARMS = frozenset({"base", "rag"})
#: Arms that retrieve (RagService.Ask).
RAG_ARMS = frozenset({"rag", "rag+adapter"})
#: The paired comparisons, as (a, b): "b vs a", how often b is right where a is wrong.
PAIRS = (("rag", "rag+adapter"), ("base", "rag"), ("base", "adapter"), ("adapter", "rag+adapter"))

#: Statuses a call is retried on, after the error's retry hint.
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
#: The longest a retry waits, whatever the hint says; and the wait when there is none.
MAX_RETRY_WAIT_S = 30.0
DEFAULT_RETRY_WAIT_S = 1.0

Sleep = Callable[[float], Awaitable[object]]


class EvalInputError(ValueError):
    """Bad input, found before any question is asked (`hybridserve eval` exits 2)."""

    @property
    def message(self) -> str:
        return str(self)


def parse_arms(text: str) -> tuple[str, ...]:
    """The arms a comma-separated list names, in the canonical order.

    Raises:
        EvalInputError: an unknown arm, or none at all.
    """
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise EvalInputError(
            f"unknown arm(s) {', '.join(unknown) or '(none given)'}: --arms takes a "
            f"comma-separated list of {', '.join(ARMS)}")
    return tuple(a for a in ARMS if a in names)


@dataclass(frozen=True)
class Sampling:
    """The sampling options every arm sends (the same for all, or the arms are not
    comparable)."""

    max_tokens: int = 96
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    def kwargs(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}


@dataclass(frozen=True)
class RunOptions:
    """How the questions are asked."""

    sampling: Sampling = field(default_factory=Sampling)
    #: Sent as json_schema on every arm ("" for none).
    json_schema: str = ""
    #: Calls in flight at once.
    concurrency: int = 4
    #: Retries of a call refused with RESOURCE_EXHAUSTED or UNAVAILABLE.
    retries: int = 3
    #: Deadline of one call, seconds (None: the SDK's default).
    timeout_s: float | None = 300.0
    #: The Serve app Ask goes to ("": the platform's own; the Generate arms go to the
    #: client's `application`).
    rag_app: str = ""


@dataclass(frozen=True)
class Target:
    """Whom the arms ask: the tenant and the adapter, checked before any question."""

    tenant: str
    #: The requests' tenant field: "" for a tenant key (its own), the id for an admin key.
    request_tenant: str
    system_prompt: str
    allow_base: bool
    #: The adapter of the adapter arms ("" when no arm uses one).
    adapter: str = ""
    #: Where the adapter came from: "--adapter" or "default" ("" when none).
    adapter_source: str = ""
    #: "admin" or "tenant": the kind of key that runs the evaluation.
    key_kind: str = "tenant"


# -- pre-checks ------------------------------------------------------------------------

async def resolve_target(client, arms: Sequence[str], *, tenant: str = "",
                         adapter: str | None = None) -> Target:
    """The tenant and adapter the arms ask with, checked: whoami() for a tenant key,
    get_tenant(tenant) for an admin key (which must name one); the adapter granted;
    allow_base for the arms that use the base model.

    Raises:
        EvalInputError: anything that would make an arm fail on every question.
    """
    me = await client.whoami()
    if me.kind == "admin":
        t = await _admin_tenant(client, tenant)
        request_tenant = t.id
    else:
        t = me.tenant
        if tenant and tenant != t.id:
            raise EvalInputError(
                f"this API key belongs to tenant {t.id!r}, not {tenant!r}: leave --tenant out, "
                f"or evaluate {tenant!r} with its own key or an admin key")
        request_tenant = ""
    chosen, source = choose_adapter(t, arms, adapter)
    check_base_allowed(t, arms)
    return Target(tenant=t.id, request_tenant=request_tenant, system_prompt=t.system_prompt,
                  allow_base=t.allow_base, adapter=chosen, adapter_source=source,
                  key_kind=me.kind or "tenant")


async def _admin_tenant(client, tenant: str) -> admin_pb2.Tenant:
    if not tenant:
        raise EvalInputError(
            "an admin key must name the tenant to evaluate: pass --tenant T "
            "(or run with one of the tenant's own keys)")
    try:
        return await client.get_tenant(tenant)
    except NotFoundError:
        raise EvalInputError(
            f"unknown tenant {tenant!r}; see `hybridserve admin tenants list`") from None


def _granted(t: admin_pb2.Tenant) -> str:
    return ", ".join(t.adapters) or "(none)"


def choose_adapter(t: admin_pb2.Tenant, arms: Sequence[str],
                   adapter: str | None) -> tuple[str, str]:
    """(adapter, where it came from) for the adapter arms: --adapter, else the
    tenant's default; ("", "") when no arm needs one.

    Raises:
        EvalInputError: an adapter arm has no adapter, or it is not granted.
    """
    needing = [a for a in arms if a in ADAPTER_ARMS]
    if not needing:
        return "", ""
    if adapter:
        chosen, source = adapter, "--adapter"
    elif t.default_adapter:
        chosen, source = t.default_adapter, "default"
    else:
        raise EvalInputError(
            f"the {', '.join(needing)} arm(s) need an adapter and tenant {t.id} has no default "
            f"one: pass --adapter ID (its adapters: {_granted(t)}), or leave those arms out "
            "with --arms base,rag")
    if chosen not in t.adapters:
        raise EvalInputError(
            f"adapter {chosen} is not granted to tenant {t.id}; its adapters: {_granted(t)}")
    return chosen, source


def check_base_allowed(t: admin_pb2.Tenant, arms: Sequence[str]) -> None:
    """Raises EvalInputError when a base-model arm runs for a tenant without allow_base."""
    needing = [a for a in arms if a in BASE_ARMS]
    if needing and not t.allow_base:
        raise EvalInputError(
            f"tenant {t.id} may not use the base model (allow_base is off), which the "
            f"{', '.join(needing)} arm(s) need: run --arms adapter,rag+adapter, or allow it "
            f"with `hybridserve admin tenants update {t.id} --allow-base true`")


# -- one call --------------------------------------------------------------------------

def _finish_name(value: int) -> str:
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def chat_messages(target: Target, question: str) -> list[tuple[str, str]]:
    """The Generate arms' messages: the tenant's system prompt (if any), the question."""
    system = [("system", target.system_prompt)] if target.system_prompt.strip() else []
    return system + [("user", question)]


async def generate_arm(client, arm: str, q: Question, target: Target,
                       options: RunOptions) -> Outcome:
    """One answer of the base or adapter arm (GenerationService.Generate)."""
    text, _ids, final = await client.generate(
        messages=chat_messages(target, q.question),
        adapter=target.adapter if arm in ADAPTER_ARMS else "",
        json_schema=options.json_schema, timeout=options.timeout_s, **options.sampling.kwargs())
    if final is None:
        raise RuntimeError("the generation ended without its final message")
    return Outcome(question_id=q.id, arm=arm, answer=text,
                   finish_reason=_finish_name(final.finish_reason),
                   prompt_tokens=final.usage.prompt_tokens,
                   completion_tokens=final.usage.completion_tokens, rag=False)


async def ask_arm(client, arm: str, q: Question, target: Target, options: RunOptions) -> Outcome:
    """One answer of the rag or rag+adapter arm (RagService.Ask, with the prompt's
    passages)."""
    with_adapter = arm in ADAPTER_ARMS
    answer = await client.ask(
        q.question, tenant=target.request_tenant, adapter=target.adapter if with_adapter else "",
        base_model=not with_adapter, include_prompt=True, json_schema=options.json_schema,
        timeout=options.timeout_s, **options.sampling.kwargs(),
        **({"app": options.rag_app} if options.rag_app else {}))
    sources = tuple(SourceRef(number=c.number, doc_id=c.doc_id, text=c.text or c.snippet)
                    for c in answer.citations)
    final = answer.final
    return Outcome(question_id=q.id, arm=arm, answer=answer.text,
                   finish_reason=final.finish_reason, sources=sources,
                   cited=tuple(final.cited), invalid_citations=tuple(final.invalid_citations),
                   prompt_tokens=final.usage.prompt_tokens,
                   completion_tokens=final.usage.completion_tokens, rag=True)


def retry_delay(e: HybridServeAPIError) -> float:
    """Seconds to wait before retrying `e`: its retry hint, at most MAX_RETRY_WAIT_S;
    DEFAULT_RETRY_WAIT_S without one."""
    if e.retry_after is None:
        return DEFAULT_RETRY_WAIT_S
    return min(max(e.retry_after, 0.0), MAX_RETRY_WAIT_S)


def failed(q: Question, arm: str, error: str) -> Outcome:
    return Outcome(question_id=q.id, arm=arm, error=error, rag=arm in RAG_ARMS)


async def answer_one(client, arm: str, q: Question, target: Target, options: RunOptions, *,
                     sleep: Sleep = asyncio.sleep,
                     clock: Callable[[], float] = time.perf_counter) -> Outcome:
    """The arm's answer to one question, retried on RESOURCE_EXHAUSTED / UNAVAILABLE
    up to options.retries times; any other failure (or the last) is a failed Outcome
    naming the status and message. Latency is the wall time of the answering call."""
    call = ask_arm if arm in RAG_ARMS else generate_arm
    for attempt in range(options.retries + 1):
        started = clock()
        try:
            outcome = await call(client, arm, q, target, options)
        except HybridServeAPIError as e:
            if e.status in RETRYABLE and attempt < options.retries:
                await sleep(retry_delay(e))
                continue
            return failed(q, arm, f"{e.status.name}: {e.message}")
        except TimeoutError:
            return failed(q, arm, "DEADLINE_EXCEEDED: the call timed out")
        except Exception as e:  # noqa: BLE001 - one call's failure is its question's outcome
            return failed(q, arm, f"{type(e).__name__}: {e}")
        return replace(outcome, latency_s=clock() - started)
    raise AssertionError("unreachable: the last attempt returns")


async def run_arms(client, questions: Sequence[Question], arms: Sequence[str], target: Target,
                   options: RunOptions, *, sleep: Sleep = asyncio.sleep,
                   clock: Callable[[], float] = time.perf_counter,
                   on_done: Callable[[Outcome], None] | None = None) -> dict[str, list[Outcome]]:
    """Every arm's outcome for every question ({arm: outcomes in question order}), at
    most options.concurrency calls in flight; `on_done` sees each outcome as it
    arrives (the progress bar)."""
    # Question-major: a question's arms run close together, so load drifts hit them alike.
    jobs = iter([(arm, i, q) for i, q in enumerate(questions) for arm in arms])
    results: dict[str, list[Outcome | None]] = {arm: [None] * len(questions) for arm in arms}

    async def worker() -> None:
        # NOTE: the workers share one iterator, so each job is taken exactly once.
        for arm, i, q in jobs:
            outcome = await answer_one(client, arm, q, target, options, sleep=sleep, clock=clock)
            results[arm][i] = outcome
            if on_done is not None:
                on_done(outcome)

    workers = max(1, min(options.concurrency, len(questions) * len(arms)))
    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
    return results  # type: ignore[return-value]  # the workers fill every slot


# -- the result ------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalResult:
    """Everything `hybridserve eval` reports."""

    question_set: QuestionSet
    #: The questions asked (the file's, or its first --limit).
    questions: list[Question]
    arms: tuple[str, ...]
    target: Target
    #: The settings used, as the JSON output and the report show them.
    settings: dict
    outcomes: dict[str, list[Outcome]]
    scores: dict[str, list[QuestionScore]]
    summaries: dict[str, ArmSummary]
    comparisons: list[Paired]

    @property
    def failures(self) -> list[Outcome]:
        return [o for arm in self.arms for o in self.outcomes[arm] if o.error]


def compare(scores: dict[str, list[QuestionScore]]) -> list[Paired]:
    """The paired comparisons (PAIRS) whose two arms both ran, on the questions both
    answered (a question that failed in either arm says nothing about which is better;
    the failures are reported apart)."""
    out = []
    for a, b in PAIRS:
        if a in scores and b in scores:
            both = [(x, y) for x, y in zip(scores[a], scores[b], strict=True)
                    if not x.failed and not y.failed]
            out.append(paired(a, [x.correct for x, _ in both], b, [y.correct for _, y in both]))
    return out


def score_arms(questions: Sequence[Question], outcomes: dict[str, list[Outcome]], *,
               format_check: Callable[[str], bool] | None = None,
               refusal_messages: Sequence[str] = (),
               ) -> tuple[dict[str, list[QuestionScore]], dict[str, ArmSummary]]:
    """(scores, summaries) per arm; `refusal_messages` are recognised as refusals
    besides scoring's built-in phrases (the platform's own refusal text)."""
    scores = {arm: [score(q, o, format_check=format_check, refusal_messages=refusal_messages)
                    for q, o in zip(questions, outs, strict=True)]
              for arm, outs in outcomes.items()}
    summaries = {arm: summarize(arm, scores[arm], outcomes[arm]) for arm in outcomes}
    return scores, summaries


async def evaluate(client, question_set: QuestionSet, questions: Sequence[Question],
                   arms: Sequence[str], target: Target, options: RunOptions, *,
                   format_check: Callable[[str], bool] | None = None,
                   refusal_messages: Sequence[str] = (),
                   settings: dict | None = None, sleep: Sleep = asyncio.sleep,
                   clock: Callable[[], float] = time.perf_counter,
                   on_done: Callable[[Outcome], None] | None = None) -> EvalResult:
    """Runs `questions` through `arms` and scores them (the pre-checks are done: see
    `resolve_target`)."""
    outcomes = await run_arms(client, questions, arms, target, options, sleep=sleep,
                              clock=clock, on_done=on_done)
    scores, summaries = score_arms(questions, outcomes, format_check=format_check,
                                   refusal_messages=refusal_messages)
    return EvalResult(question_set=question_set, questions=list(questions), arms=tuple(arms),
                      target=target, settings=dict(settings or {}), outcomes=outcomes,
                      scores=scores, summaries=summaries, comparisons=compare(scores))
