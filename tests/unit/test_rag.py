"""The Ask pipeline without Serve: prompt budget, citations, fusion, and the pipeline
with fakes of its three backends (the same protocols the Serve handles implement)."""

from __future__ import annotations

import asyncio

import pytest
from hybridserve.config import HybridServeConfig
from hybridserve.errors import DeadlineExceeded, InvalidArgument, Unavailable
from hybridserve.generation.engine import Delta
from hybridserve.generation.service import GenerationDone
from hybridserve.rag import citations
from hybridserve.rag.prompt import PromptBuilder
from hybridserve.rag.service import (
    AskDone,
    AskInput,
    RagService,
    ReplicaFailed,
    RetrievalResult,
    SourcesEvent,
    Timings,
)
from hybridserve.rerank import fusion
from hybridserve.retrieval.documents import Hit
from hybridserve.tenancy.domain import Tenant


class WordTokenizer:
    """One token per whitespace-separated word; a chat "template" of tagged turns."""

    def render(self, messages):
        return " ".join(f"<{r}> {c}" for r, c in messages) + " <assistant>"

    def encode(self, text):
        return [len(w) for w in text.split()]


def _builder(max_len=200):
    return PromptBuilder(WordTokenizer(), max_len, "Cite passages like [1].")


# -- prompt budget ----------------------------------------------------------------------


def test_passages_fill_the_budget_best_first_and_the_last_is_cut_at_a_sentence():
    long = " ".join(f"Sentence number {i} is here." for i in range(40))  # 5 words each
    built = _builder(200).build(question="what is it", max_tokens=60,
                                passages=[("A", "short one."), ("B", long), ("C", "never seen.")])
    assert len(built.token_ids) <= 200 - 60
    assert [p.number for p in built.passages] == [1, 2]
    cut = built.passages[1].text
    assert cut.endswith(".") and len(cut) < len(long) and long.startswith(cut)
    assert built.passage_tokens <= built.passage_budget


@pytest.mark.parametrize("max_len, max_tokens", [(64, 10), (120, 60), (400, 1), (90, 40)])
def test_the_prompt_never_exceeds_the_context(max_len, max_tokens):
    passages = [(f"T{i}", " ".join(f"w{i}x{j}." for j in range(30))) for i in range(10)]
    try:
        built = _builder(max_len).build(question="q q q", max_tokens=max_tokens, passages=passages)
    except InvalidArgument:
        return  # no room even for the question: refused with the numbers
    assert len(built.token_ids) <= max_len - max_tokens


def test_no_room_and_too_many_max_tokens_are_invalid_with_the_numbers():
    with pytest.raises(InvalidArgument) as e:
        _builder(100).build(question="q", max_tokens=100, passages=[])
    assert "100" in e.value.message and e.value.field_violations
    with pytest.raises(InvalidArgument) as e:
        _builder(30).build(question=" ".join(["word"] * 40), max_tokens=5, passages=[])
    assert "exceed the context window of 30" in e.value.message


def test_the_tenant_system_prompt_and_history_are_in_the_prompt():
    built = _builder(400).build(question="and now?", max_tokens=10, passages=[("T", "fact.")],
                                system_prompt="You are Acme.",
                                history=[("user", "hello"), ("assistant", "hi")])
    text = WordTokenizer().render  # the ids are lengths; check the rendering instead
    rendered = _builder(400)._messages("You are Acme.", [("user", "hello"), ("assistant", "hi")],
                                       "and now?", built.passages, False)
    assert rendered[0] == ("system", "You are Acme.\n\nCite passages like [1].")
    assert rendered[1:3] == [("user", "hello"), ("assistant", "hi")]
    assert "[1] T\nfact." in rendered[-1][1] and rendered[-1][1].endswith("Question: and now?")
    assert text


# -- citations and fusion -------------------------------------------------------------------


def test_citations_are_parsed_and_invalid_ones_reported():
    assert citations.cited_numbers("a [2] b [1, 3] c [2][4; 5] [x] [] [12]") == [2, 1, 3, 4, 5, 12]
    assert citations.check("see [1] and [3], also [9]", 3) == ([1, 3], [9])
    assert citations.check("no citations", 2) == ([], [])


def test_fusion_keeps_retrieval_order_on_rerank_near_ties():
    # Products: hybrid is sure (1.0 vs 0.8), the reranker barely prefers the wrong one.
    assert fusion.order([1.0, 0.8], [0.70, 0.72], weight=5)[0] == 0
    # Paraphrase: hybrid slightly prefers the wrong one, the reranker clearly the right.
    assert fusion.order([0.8, 0.5], [0.1, 0.5], weight=5)[0] == 1
    assert fusion.order([0.8, 0.5], [0.1, 0.5], weight=0)[0] == 0


# -- the pipeline with fakes -------------------------------------------------------------------


def _hit(i, text, score, vector=None):
    return Hit(f"c{i}", f"d{i}", 0, text, f"Doc {i}", f"src/{i}.md", {}, score,
               vector_score=vector)


class FakeRetriever:
    def __init__(self, hits):
        self.hits = hits
        self.calls = []

    async def retrieve(self, tenant, query, top_k, alpha, filters, timeout_s):
        self.calls.append((tenant, query, top_k))
        return RetrievalResult(self.hits[:top_k], 0.001, 0.002)


class FakeReranker:
    def __init__(self, scores):
        self.scores_ = scores
        self.calls = 0

    async def scores(self, query, passages, timeout_s):
        self.calls += 1
        return self.scores_[: len(passages)]


class FakeGenerator:
    def __init__(self, text="Refunds take 14 days [1] [7].", fail=(), mid_fail=False):
        self.text = text
        self.fail = list(fail)  # errors for the first calls, before any token
        self.mid_fail = mid_fail
        self.calls = []
        self.prefetched = []
        self.closed_early = 0

    async def prefetch(self, adapter, timeout_s):
        self.prefetched.append(adapter)

    async def generate(self, adapter, inp, tenant, timeout_s):
        self.calls.append(inp)
        if self.fail:
            raise self.fail.pop(0)
        words = self.text.split(" ")
        try:
            for i, w in enumerate(words):
                if self.mid_fail and i == 1:
                    raise ReplicaFailed("ActorDiedError")
                yield Delta(text=w + (" " if i < len(words) - 1 else ""), token_ids=(i,))
        except GeneratorExit:
            self.closed_early += 1  # what cancels the replica's stream under Serve
            raise
        yield GenerationDone("stop", len(inp.prompt_token_ids), len(words), "replica-1", adapter,
                             "rid", first_token_s=0.001)


def _service(hits, rerank_scores, generator, **rag):
    cfg = HybridServeConfig(rag=rag)
    return RagService(cfg, FakeRetriever(hits), FakeReranker(rerank_scores), generator,
                      _builder(600))


async def _run(svc, inp, adapter="tone@v1", deadline_s=60.0):
    started = svc.clock()
    return [e async for e in svc.ask(Tenant("acme", system_prompt="Be brief."), adapter, inp,
                                     timings=Timings(), started=started,
                                     deadline=started + deadline_s)]


async def test_sources_then_tokens_then_final_with_checked_citations():
    gen = FakeGenerator()
    svc = _service([_hit(1, "Refunds take 14 days.", 0.9), _hit(2, "Shipping is fast.", 0.5),
                    _hit(3, "Bananas are yellow.", 0.4)], [0.6, 0.3, 0.1], gen)
    events = await _run(svc, AskInput(question="How long do refunds take?"))
    # d3 is below rag.min_score (0.2 on the rerank score): it never reaches the prompt.
    assert isinstance(events[0], SourcesEvent) and isinstance(events[-1], AskDone)
    assert all(isinstance(e, Delta) for e in events[1:-1])
    assert [s.passage.hit.doc_id for s in events[0].sources] == ["d1", "d2"]
    done = events[-1]
    assert done.cited == [1] and done.invalid_citations == [7]
    assert done.adapter == "tone@v1" and gen.prefetched == ["tone@v1"]
    # Generation got token ids, never text.
    assert gen.calls[0].prompt_token_ids and gen.calls[0].prompt is None


async def test_min_score_drops_irrelevant_passages_and_refuses_without_the_engine():
    gen = FakeGenerator()
    svc = _service([_hit(1, "Unrelated.", 0.9)], [0.05], gen)
    events = await _run(svc, AskInput(question="What is the capital of Mongolia?"))
    assert events[0].sources == []
    assert [e.text for e in events[1:-1]] == [HybridServeConfig().rag.no_context_message]
    assert events[-1].finish_reason == "no_context" and gen.calls == []
    # `generate` asks the model anyway and says nothing was found.
    gen2 = FakeGenerator()
    svc2 = _service([_hit(1, "Unrelated.", 0.9)], [0.05], gen2, no_context="generate")
    events = await _run(svc2, AskInput(question="Capital of Mongolia?"))
    assert events[-1].finish_reason == "stop" and len(gen2.calls) == 1


async def test_a_replica_failing_before_the_first_token_is_retried_once():
    gen = FakeGenerator(fail=[ReplicaFailed("ActorDiedError")])
    svc = _service([_hit(1, "Refunds take 14 days.", 0.9, 0.5)], [0.6], gen)
    events = await _run(svc, AskInput(question="refunds?"))
    assert events[-1].finish_reason == "stop" and len(gen.calls) == 2
    twice = FakeGenerator(fail=[ReplicaFailed("a"), ReplicaFailed("b")])
    with pytest.raises(Unavailable):
        await _run(_service([_hit(1, "Refunds.", 0.9)], [0.6], twice), AskInput(question="r?"))


async def test_a_replica_failing_mid_answer_is_unavailable_never_a_fake_final():
    svc = _service([_hit(1, "Refunds take 14 days.", 0.9)], [0.6], FakeGenerator(mid_fail=True))
    seen = []
    with pytest.raises(Unavailable) as e:
        async for ev in svc.ask(Tenant("acme"), "", AskInput(question="r?"), timings=Timings(),
                                started=svc.clock(), deadline=svc.clock() + 60):
            seen.append(ev)
    assert e.value.reason == "GENERATION_REPLICA_FAILED"
    assert not any(isinstance(ev, AskDone) for ev in seen)


async def test_a_passed_deadline_is_deadline_exceeded():
    svc = _service([_hit(1, "x.", 0.9)], [0.6], FakeGenerator())
    with pytest.raises(DeadlineExceeded):
        await _run(svc, AskInput(question="r?"), deadline_s=-1)


async def test_history_forms_the_query_last_turn_first():
    retriever_svc = _service([_hit(1, "x.", 0.9)], [0.6], FakeGenerator(), history_turns=1,
                             history_query_chars=40)
    await _run(retriever_svc, AskInput(messages=[
        ("user", "Tell me about refunds for opened items please"),
        ("assistant", "Opened items: 14 days."),
        ("user", "and unopened?")]))
    query = retriever_svc.retriever.calls[0][1]
    assert query.startswith("and unopened? Tell me about refunds") and len(query) <= 40


@pytest.mark.parametrize("inp, needle", [
    (AskInput(), "question is empty"),
    (AskInput(question="x" * 5000), "the limit is 4000"),
    (AskInput(question="x", top_k=0), "top_k must be between 1"),
    (AskInput(question="x", top_k=101), "top_k must be between 1"),
    (AskInput(question="x", max_tokens=0), "max_tokens must be >= 1"),
    (AskInput(question="x", max_tokens=700), "context window"),
    (AskInput(messages=[("assistant", "hi")]), "no user turn"),
    (AskInput(messages=[("robot", "hi")]), "role"),
    (AskInput(question="x", messages=[("user", "y")]), "not both"),
])
def test_bad_input_is_invalid_argument(inp, needle):
    svc = _service([], [], FakeGenerator())
    with pytest.raises(InvalidArgument) as e:
        svc.plan(inp)
    assert needle in e.value.message


async def test_a_cancelled_answer_reports_its_usage_so_far():
    gen = FakeGenerator(text=" ".join(["tok"] * 50))
    svc = _service([_hit(1, "Refunds take 14 days.", 0.9)], [0.6], gen)
    usage = [0, 0]
    stream = svc.ask(Tenant("acme"), "", AskInput(question="r?"), timings=Timings(),
                     started=svc.clock(), deadline=svc.clock() + 60, usage=usage)
    async for ev in stream:
        if isinstance(ev, Delta) and usage[1] >= 3:
            break
    await stream.aclose()
    assert usage[0] > 0 and usage[1] == 3
    # Closing the answer closed the generation stream at once (not at GC time).
    assert gen.closed_early == 1
    await asyncio.sleep(0)


async def test_the_default_bi_encoder_rerank_reuses_the_vector_scores():
    """The default reranker is retrieval's own embedder: its score of a chunk is the
    vector score hybrid search returned, so no rerank call is made. A keyword-only
    search (no vector scores) or another rerank model still calls the reranker."""
    hits = [_hit(1, "Refunds take 14 days.", 0.6, vector=0.3),
            _hit(2, "Shipping is fast.", 0.9, vector=0.1)]
    svc = _service(hits, [0.0, 0.0], FakeGenerator())
    assert svc.rerank_is_the_embedder
    events = await _run(svc, AskInput(question="refunds?"))
    assert svc.reranker.calls == 0
    top = events[0].sources[0].passage
    assert top.hit.doc_id == "d1" and top.rerank_score == 0.3  # 0.6 + 5*0.3 > 0.9 + 5*0.1
    keyword_only = _service([_hit(1, "Refunds.", 0.6)], [0.5], FakeGenerator())
    await _run(keyword_only, AskInput(question="refunds?", alpha=0.0))
    assert keyword_only.reranker.calls == 1
    cross = RagService(HybridServeConfig(rerank={"backend": "cross-encoder", "model": "/m"}),
                       FakeRetriever(hits), FakeReranker([0.9, 0.1]), FakeGenerator(), _builder(600))
    assert not cross.rerank_is_the_embedder
    await _run(cross, AskInput(question="refunds?"))
    assert cross.reranker.calls == 1


async def test_a_recently_used_adapter_is_not_prefetched_again():
    gen = FakeGenerator()
    svc = _service([_hit(1, "Refunds take 14 days.", 0.9, 0.5)], [0.6], gen)
    clock = [100.0]
    svc.clock = lambda: clock[0]
    for _ in range(3):
        await _run(svc, AskInput(question="r?"))
    assert gen.prefetched == ["tone@v1"]  # warm after the first answer
    clock[0] += svc.cfg.prefetch_skip_s + 1
    await _run(svc, AskInput(question="r?"))
    assert gen.prefetched == ["tone@v1", "tone@v1"]


def test_a_passage_without_sentence_ends_is_cut_at_a_word():
    table = " ".join(f"cell{i}" for i in range(400))  # no sentence end at all
    built = _builder(200).build(question="q", max_tokens=20, passages=[("T", table), ("U", "x.")])
    assert len(built.passages) == 1 and built.passages[0].text.endswith(" …")
    assert len(built.token_ids) <= 180


async def test_passages_that_cannot_fit_at_all_are_no_context():
    gen = FakeGenerator()
    svc = RagService(HybridServeConfig(), FakeRetriever([_hit(1, "fact.", 0.9, 0.9)]),
                     FakeReranker([0.9]), gen, PromptBuilder(WordTokenizer(), 40, "Cite."))
    # The question and instructions leave no room for even one word of the passage.
    events = await _run(svc, AskInput(question=" ".join(["word"] * 21), max_tokens=10))
    assert events[-1].finish_reason == "no_context" and gen.calls == []


async def test_bad_sampling_fails_before_retrieval():
    svc = _service([_hit(1, "x.", 0.9)], [0.6], FakeGenerator())
    for inp in (AskInput(question="q", temperature=-1), AskInput(question="q", top_p=0.0),
                AskInput(question="q", json_schema="{nope")):
        with pytest.raises(InvalidArgument):
            await _run(svc, inp)
    assert svc.retriever.calls == []


def test_a_history_the_chat_template_refuses_is_invalid_argument(tmp_path):
    from hybridserve.rag.prompt import HFChatTokenizer
    from testkit.tiny import build_tiny_llama

    tok = HFChatTokenizer(build_tiny_llama(tmp_path / "tiny"))
    tok._tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(InvalidArgument) as e:
        tok.render([("user", "a"), ("user", "b")])
    assert "roles must alternate" in e.value.message


async def test_prompt_only_stops_after_the_prompt_with_its_token_ids():
    gen = FakeGenerator()
    svc = _service([_hit(1, "Refunds take 14 days.", 0.9), _hit(2, "Shipping is fast.", 0.5)],
                   [0.6, 0.3], gen)
    events = await _run(svc, AskInput(question="How long do refunds take?", prompt_only=True))
    assert [type(e).__name__ for e in events] == ["SourcesEvent", "AskDone"]
    done = events[-1]
    assert done.finish_reason == "prompt_only" and done.completion_tokens == 0
    # The ids are the prompt that generation would have got, for the same passages.
    built = svc.prompts.build(question="How long do refunds take?",
                              passages=[("Doc 1", "Refunds take 14 days."),
                                        ("Doc 2", "Shipping is fast.")],
                              max_tokens=HybridServeConfig().generation.max_tokens,
                              system_prompt="Be brief.")
    assert list(done.prompt_token_ids) == built.token_ids
    assert done.prompt_tokens == len(built.token_ids)
    assert gen.calls == [] and gen.prefetched == []  # no generation, no adapter load
    # A generated answer carries the same ids.
    answered = await _run(svc, AskInput(question="How long do refunds take?"))
    assert answered[-1].prompt_token_ids == done.prompt_token_ids


async def test_the_prompt_is_charged_before_the_passages_go_out():
    svc = _service([_hit(1, "Refunds take 14 days.", 0.9)], [0.6], FakeGenerator())
    usage = [0, 0]
    started = svc.clock()
    stream = svc.ask(Tenant("acme"), "", AskInput(question="Refunds?"), timings=Timings(),
                     started=started, deadline=started + 60, usage=usage)
    first = await stream.__anext__()
    await stream.aclose()  # the client read the passages and hung up
    assert isinstance(first, SourcesEvent) and usage[0] > 0


async def test_prompt_only_with_no_context_sends_no_refusal_text():
    svc = _service([_hit(1, "Unrelated.", 0.9)], [0.05], FakeGenerator())
    events = await _run(svc, AskInput(question="Capital of Mongolia?", prompt_only=True))
    assert [type(e).__name__ for e in events] == ["SourcesEvent", "AskDone"]
    assert events[-1].finish_reason == "no_context" and not events[-1].prompt_token_ids
