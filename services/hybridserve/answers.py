"""Typed results of RagService.Ask for the SDK: the events of `ask_stream()` and the
`Answer` that `ask()` returns. Plain dataclasses, built from the protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridserve.v1 import common_pb2, rag_pb2

__all__ = ["Answer", "Citation", "Final", "Sources", "StageTimings", "Token", "Usage", "event_of"]


@dataclass(frozen=True)
class Citation:
    number: int
    chunk_id: str
    doc_id: str
    chunk_index: int
    title: str
    source: str
    snippet: str
    score: float
    retrieval_score: float
    keyword_score: float | None = None
    vector_score: float | None = None
    rerank_score: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: The whole passage as the prompt holds it (asked with include_prompt; else "").
    text: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds per stage."""

    auth_ms: float
    quota_ms: float
    embed_ms: float
    retrieve_ms: float
    rerank_ms: float
    prompt_ms: float
    queue_ms: float
    first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class Sources:
    """The first event: the passages the answer may cite, numbered."""

    citations: list[Citation]


@dataclass(frozen=True)
class Token:
    """New answer text."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Final:
    """The last event."""

    finish_reason: str  # "stop", "length", "abort", "no_context", "prompt_only"
    usage: Usage
    adapter: str
    replica_id: str
    cited: list[int]
    invalid_citations: list[int]
    timings: StageTimings
    request_id: str
    client_request_id: str
    tenant: str
    passage_token_budget: int
    passage_tokens: int
    #: The prompt's token ids (asked with include_prompt or prompt_only; else empty).
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Answer:
    """A whole answer (what `ask()` returns)."""

    text: str
    citations: list[Citation]
    final: Final

    @property
    def usage(self) -> Usage:
        return self.final.usage

    @property
    def timings(self) -> StageTimings:
        return self.final.timings

    @property
    def cited(self) -> list[Citation]:
        """The sources the answer actually cited."""
        by_number = {c.number: c for c in self.citations}
        return [by_number[n] for n in self.final.cited if n in by_number]


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


def _finish(value: int) -> str:
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def event_of(msg: rag_pb2.AskResponse) -> Sources | Token | Final | None:
    """The typed event of one stream message (None for a message without payload)."""
    which = msg.WhichOneof("payload")
    if which == "sources":
        return Sources([
            Citation(c.number, c.chunk_id, c.doc_id, c.chunk_index, c.title, c.source, c.snippet,
                     c.score, c.retrieval_score, _opt(c, "keyword_score"), _opt(c, "vector_score"),
                     _opt(c, "rerank_score"), dict(c.metadata), c.text)
            for c in msg.sources.citations
        ])
    if which == "delta":
        return Token(msg.delta.text, list(msg.delta.token_ids))
    if which == "final":
        f = msg.final
        t = f.timings
        return Final(
            _finish(f.finish_reason), Usage(f.usage.prompt_tokens, f.usage.completion_tokens),
            f.adapter, f.replica_id, list(f.cited), list(f.invalid_citations),
            StageTimings(t.auth_ms, t.quota_ms, t.embed_ms, t.retrieve_ms, t.rerank_ms,
                         t.prompt_ms, t.queue_ms, t.first_token_ms, t.total_ms),
            f.request_id, f.client_request_id, f.tenant, f.passage_token_budget, f.passage_tokens,
            list(f.prompt_token_ids),
        )
    return None


def collect(events) -> Answer:
    """An Answer from the events of one stream."""
    citations, text, final = [], [], None
    for ev in events:
        if isinstance(ev, Sources):
            citations = ev.citations
        elif isinstance(ev, Token):
            text.append(ev.text)
        elif isinstance(ev, Final):
            final = ev
    if final is None:
        raise RuntimeError("the stream ended without its final message")
    return Answer("".join(text), citations, final)
