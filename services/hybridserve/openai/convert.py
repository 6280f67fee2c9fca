"""OpenAI's request and response shapes <-> the gateway's inputs and events.

Nothing here calls anything: the routes (`api.py`) do. The RAG extension's objects
(`sources`, `citations`, `rag`) are documented with their exact JSON in docs/openai.md.
"""

from __future__ import annotations

import re
from typing import Any

from hybridserve.errors import InvalidArgument
from hybridserve.generation.service import GenerateInput
from hybridserve.openai.schemas import ChatRequest, CompletionRequest, RagOptions
from hybridserve.rag import citations
from hybridserve.rag.service import AskDone, AskInput, Source, Timings
from hybridserve.retrieval.documents import FieldFilter

#: OpenAI's finish reasons; the pipeline's others (no_context) are reported in `rag`.
_FINISH = {"stop": "stop", "length": "length", "abort": "stop", "no_context": "stop"}
#: Roles OpenAI clients send; `developer` is OpenAI's newer name for `system`.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def finish_reason(reason: str) -> str:
    return _FINISH.get(reason, "stop")


def messages_of(req: ChatRequest) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(req.messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise InvalidArgument(
                f"messages[{i}].role is {m.role!r}; this server takes system, developer, user "
                "and assistant messages (no tools)",
                field_violations=[(f"messages[{i}].role", "system, developer, user or assistant")])
        out.append((role, m.text(i)))
    return out


def _prompt_of(req: CompletionRequest) -> tuple[str | None, list[int] | None]:
    p = req.prompt
    if isinstance(p, str):
        return p, None
    if p and all(isinstance(x, int) for x in p):
        return None, list(p)  # one prompt as token ids
    if len(p) == 1:
        one = p[0]
        return (one, None) if isinstance(one, str) else (None, list(one))
    raise InvalidArgument(f"prompt holds {len(p)} prompts; send one per request",
                          field_violations=[("prompt", "one prompt")])


def generate_input(req: ChatRequest | CompletionRequest, adapter: str, request_id: str
                   ) -> GenerateInput:
    """A chat or completion request without `rag`, for the gateway's `generate`."""
    common = dict(adapter=adapter, temperature=req.temperature, top_p=req.top_p,
                  max_tokens=req.token_limit(), stop=req.stops(), seed=req.seed,
                  json_schema=req.json_schema(), client_request_id=request_id)
    if isinstance(req, ChatRequest):
        return GenerateInput(messages=messages_of(req), **common)
    prompt, ids = _prompt_of(req)
    return GenerateInput(prompt=prompt, prompt_token_ids=ids, **common)


def ask_input(req: ChatRequest | CompletionRequest, adapter: str, request_id: str) -> AskInput:
    """A request with `rag`, for the gateway's `ask` (the Ask pipeline)."""
    rag: RagOptions = req.rag  # type: ignore[assignment]
    if isinstance(req, ChatRequest):
        question, messages = "", messages_of(req)
    else:
        prompt, ids = _prompt_of(req)
        if ids is not None:
            raise InvalidArgument("with rag, the prompt must be text (the question)",
                                  field_violations=[("prompt", "text with rag")])
        question, messages = prompt or "", []
    return AskInput(
        question=question, messages=messages, adapter=adapter,
        top_k=rag.top_k, alpha=rag.alpha, rerank=rag.rerank, top_n=rag.top_n,
        min_score=rag.min_score,
        filters=[FieldFilter(f.field, f.op, tuple(f.values)) for f in rag.filters],
        max_tokens=req.token_limit(), temperature=req.temperature, top_p=req.top_p,
        stop=req.stops(), seed=req.seed, json_schema=req.json_schema(),
        client_request_id=request_id)


# -- responses ---------------------------------------------------------------------------


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def source_json(src: Source, snippet_chars: int, whole: bool) -> dict:
    h = src.passage.hit
    out = {"number": src.number, "doc_id": h.doc_id, "chunk_id": h.chunk_id,
           "chunk_index": h.chunk_index, "title": h.title, "source": h.source,
           "score": src.passage.score, "retrieval_score": h.score,
           "rerank_score": src.passage.rerank_score, "metadata": dict(h.metadata),
           "snippet": src.text[:snippet_chars]}
    if whole:
        out["text"] = src.text
    return out


def citation_spans(text: str, sources: list[dict]) -> list[dict]:
    """Every citation marker in `text` that names a source: where it is (`start`, `end`:
    `text[start:end]` is the marker, offsets in Unicode code points), the numbers it
    cites and those sources. Markers citing only unknown numbers are left out (the
    `rag.invalid_citations` field lists those numbers)."""
    by_number = {s["number"]: s for s in sources}
    out = []
    # The markers the Ask pipeline counts (`[2]`, `[1, 3]`, `[1; 3]`), by its own pattern.
    for m in citations.MARKER.finditer(text):
        numbers = [int(x) for x in re.split(r"[,;]", m.group(1))]
        known = [n for n in dict.fromkeys(numbers) if n in by_number]
        if known:
            out.append({"start": m.start(), "end": m.end(), "numbers": known,
                        "sources": [_cited(by_number[n]) for n in known]})
    return out


def _cited(src: dict) -> dict:
    keys = ("number", "doc_id", "chunk_id", "title", "source", "score")
    return {k: src[k] for k in keys}


def timings_ms(t: Timings) -> dict[str, float]:
    return {f"{k}_ms": round(max(0.0, v) * 1e3, 3) for k, v in vars(t).items()
            if k != "generation_started"}


def rag_json(done: AskDone) -> dict:
    """The `rag` object of a RAG response's final part."""
    return {"tenant": done.tenant, "finish_reason": done.finish_reason, "cited": done.cited,
            "invalid_citations": done.invalid_citations,
            "passage_tokens": done.passage_tokens,
            "passage_token_budget": done.passage_token_budget,
            "timings": timings_ms(done.timings)}


def completion_object(kind: str, request_id: str, created: int, model: str, text: str,
                      finish: str, usage_json: dict | None) -> dict:
    """A whole (non-streamed) chat completion (`kind` "chat") or text completion."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model,
                           "choices": [choice], "system_fingerprint": None}
    if usage_json is not None:
        out["usage"] = usage_json
    return out


def chunk_object(kind: str, request_id: str, created: int, model: str, *, text: str | None = None,
                 finish: str | None = None, first: bool = False, usage_json: dict | None = None,
                 no_choice: bool = False) -> dict:
    """One streamed chunk: a delta of text, the finish, or (`no_choice`) the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    choices: list[dict] = []
    if not no_choice:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None,
                        "finish_reason": finish}]
    out: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model,
                           "choices": choices, "system_fingerprint": None}
    if no_choice:
        out["usage"] = usage_json
    return out
