"""Retrieval-aware training data (finetune.raft): the gold share is exact for a seed, the
gold passage is removed in the rest, the split holds out whole documents, targets state the
fact and cite it, and a prompt that differs from Ask's is refused."""

from __future__ import annotations

import pytest
from hybridserve.errors import FailedPrecondition
from hybridserve.finetune import raft
from hybridserve.finetune.data import IGNORE
from hybridserve.rag.prompt import PromptBuilder
from hybridserve.scoring import Question


class WordTokenizer:
    def render(self, messages):
        return " ".join(f"<{r}> {c}" for r, c in messages) + " <assistant>"

    def encode(self, text):
        return [len(w) for w in text.split()]


def _builder(instructions="Cite passages like [1].", max_model_len=4000):
    return PromptBuilder(WordTokenizer(), max_model_len, instructions)


DOCS = {
    f"d{i}.md": [f"Doc {i} is about topic {i}. The fee for item {i} is {i}0 pounds. "
                 f"Office {i} opens at {i} am."]
    for i in range(10)
}


class FakeSource:
    """Ask with prompt_only over DOCS: the first 3 chunks the filters allow, in doc order,
    with the prompt the builder makes (as the gateway would)."""

    def __init__(self, builder, system_prompt=""):
        self.builder, self.system_prompt = builder, system_prompt
        self.calls = []

    def prompt(self, question, *, only_docs=(), exclude_docs=()):
        self.calls.append((question, tuple(only_docs), tuple(exclude_docs)))
        passages = []
        for doc, chunks in DOCS.items():
            if (only_docs and doc not in only_docs) or doc in exclude_docs:
                continue
            passages += [(doc, i, text) for i, text in enumerate(chunks)]
        passages = passages[:3]
        built = self.builder.build(question=question,
                                   passages=[(f"T {d}", t) for d, _, t in passages],
                                   max_tokens=50, system_prompt=self.system_prompt)
        return raft.AskPrompt(
            tuple(raft.PromptPassage(n, d, f"{d}#{i}", f"T {d}", t)
                  for n, (d, i, t) in enumerate(passages, 1)),
            tuple(built.token_ids), built.passage_budget)


def _questions():
    qs = [Question(f"q{i}", f"What is the fee for item {i}?", (f"{i}0 pounds",), (f"d{i}.md",), i)
          for i in range(10)]
    qs += [Question(f"u{i}", f"Is there a ferry number {i}?", (), (), 20 + i) for i in range(4)]
    return qs


def _build(questions, p_gold=0.8, seed=0, **kw):
    builder = _builder()
    return raft.build_examples(questions, FakeSource(builder, "Be kind."), builder,
                               system_prompt="Be kind.", refusal="I could not find it.",
                               max_tokens=50, p_gold=p_gold, seed=seed, **kw)


def test_the_gold_share_is_exact_and_the_gold_passage_is_removed_in_the_rest():
    examples, report = _build(_questions(), p_gold=0.8)
    gold = [e for e in examples if e.kind == "gold"]
    no_gold = [e for e in examples if e.kind == "no_gold"]
    assert len(gold) == 8 and len(no_gold) == 2 and report.unanswerable == 4
    assert report.examples == 14 and not report.skipped
    for e in gold:
        doc = f"d{e.question_id[1:]}.md"
        assert e.passages[e.gold_number - 1].doc_id == doc
        assert [p.doc_id for p in e.passages].count(doc) == 1
        assert e.target == f"The fee for item {e.question_id[1:]} is {e.question_id[1:]}0 pounds [{e.gold_number}]."
    for e in no_gold:
        assert f"d{e.question_id[1:]}.md" not in {p.doc_id for p in e.passages}
        assert e.target == "I could not find it." and e.gold_number == 0
    for e in examples:
        assert [p.number for p in e.passages] == list(range(1, len(e.passages) + 1))
    # The gold passage lands at different positions.
    assert len({e.gold_number for e in gold}) > 1


def test_the_same_seed_gives_the_same_examples_and_another_seed_other_ones():
    a, _ = _build(_questions(), seed=3)
    b, _ = _build(list(reversed(_questions())), seed=3)  # order of the file does not matter
    c, _ = _build(_questions(), seed=4)
    assert a == b
    assert [(e.kind, e.gold_number) for e in a] != [(e.kind, e.gold_number) for e in c]


@pytest.mark.parametrize("p_gold, expected", [(0.0, 0), (0.5, 5), (1.0, 10)])
def test_p_gold_extremes(p_gold, expected):
    examples, _ = _build(_questions(), p_gold=p_gold)
    assert sum(e.kind == "gold" for e in examples) == expected


def test_the_prompt_is_asks_prompt_with_the_passages_reordered():
    builder = _builder()
    examples, _ = _build(_questions())
    e = next(e for e in examples if e.kind == "gold")
    q = next(q for q in _questions() if q.id == e.question_id)
    same = builder.build(question=q.question, passages=[(p.title, p.text) for p in e.passages],
                         max_tokens=50, system_prompt="Be kind.")
    assert list(e.prompt_ids) == same.token_ids


def test_a_local_config_that_builds_other_prompts_is_refused():
    served = _builder("Cite passages like [1].")
    local = _builder("Other instructions.")
    with pytest.raises(FailedPrecondition, match="differ"):
        raft.build_examples(_questions(), FakeSource(served), local, system_prompt="",
                            refusal="No.", max_tokens=50)


def test_a_local_context_window_other_than_the_served_one_is_refused():
    # The same ids rebuild from passages that fit either way; the budget tells them apart.
    served, local = _builder(max_model_len=4000), _builder(max_model_len=8000)
    with pytest.raises(FailedPrecondition, match="passages may use"):
        raft.build_examples(_questions(), FakeSource(served), local, system_prompt="",
                            refusal="No.", max_tokens=50)


def test_a_distractor_that_states_the_answer_is_dropped():
    q = Question("dup", "What is the fee for item 1?", ("10 pounds",), ("d1.md",), 1)
    # d0 says "00 pounds", d2 "20 pounds": only d1 holds "10 pounds"; make d3 hold it too.
    DOCS["d3.md"].append("Item 1 also costs 10 pounds here.")
    try:
        examples, _ = _build([q], p_gold=0.0)
    finally:
        DOCS["d3.md"].pop()
    (e,) = examples
    assert e.kind == "no_gold" and not any("10 pounds" in p.text for p in e.passages)


def test_held_out_documents_never_appear_in_training_prompts():
    train, held, held_docs = raft.split_by_document(_questions(), 0.3, seed=0)
    examples, _ = _build(train, exclude_docs=held_docs)
    seen = {p.doc_id for e in examples for p in e.passages}
    assert held_docs and not seen & set(held_docs)


def test_the_split_is_by_document():
    qs = _questions() + [Question("q1b", "When does office 1 open?", ("1 am",), ("d1.md",), 40),
                         Question("q12", "Fee of items 1 and 2?", ("10 pounds",),
                                  ("d1.md", "d2.md"), 41)]
    for seed in range(5):
        train, held, held_docs = raft.split_by_document(qs, 0.3, seed=seed)
        assert held_docs and len(train) + len(held) == len(qs)
        train_docs = {d for q in train for d in q.gold_docs}
        held_gold = {d for q in held for d in q.gold_docs}
        assert not train_docs & held_gold, seed
        assert held_gold <= set(held_docs)
    with pytest.raises(FailedPrecondition, match="at least 2"):
        raft.split_by_document(qs[:1], 0.3)


def test_a_question_whose_answer_is_in_no_chunk_is_skipped_and_said_why():
    qs = [Question("bad", "What is the fee?", ("999 pounds",), ("d1.md",), 1), *_questions()[:3]]
    examples, report = _build(qs, p_gold=1.0)
    assert "bad" in report.skipped and "reference phrase" in report.skipped["bad"]
    assert {e.question_id for e in examples} == {"q0", "q1", "q2"}


def test_fact_sentence_and_cite():
    text = "Intro sentence. The ferry leaves at 09:15 from Pier Head! Last line"
    assert raft.fact_sentence(text, ["09:15"]) == "The ferry leaves at 09:15 from Pier Head!"
    assert raft.fact_sentence(text, ["nowhere"]) is None
    assert raft.fact_sentence("- Bikes: 2 per tram\n- Dogs: free", ["2 per tram"]) == "Bikes: 2 per tram"
    long = "A " * 45 + "x; the cap is £7.20 a day; more"
    assert raft.fact_sentence(long, ["£7.20"]) == "the cap is £7.20 a day"
    assert raft.cite("It costs £2.", 3) == "It costs £2 [3]."
    assert raft.cite("It costs £2", 1) == "It costs £2 [1]."


class _Tok:
    eos_token_id = 99

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_tokenize_learns_the_target_and_its_end_only():
    e = raft.RaftExample("q", "gold", (), 1, "It is 10 pounds [1].", (5, 6, 7))
    t = raft.tokenize(e, _Tok())
    assert t.input_ids == [5, 6, 7, 2, 2, 2, 6, 4, 99]
    assert t.labels == [IGNORE] * 3 + [2, 2, 2, 6, 4, 99]
    assert t.prompt_ids == [5, 6, 7]


def test_acceptance_needs_more_containment_and_no_fewer_correct_refusals():
    from hybridserve.finetune.evaluate import EvalResult, rag_rates

    qs = [Question("a", "Fee?", ("10 pounds",), ("d1.md",), 1),
          Question("b", "Office?", ("1 am",), ("d1.md",), 2),
          Question("u", "Ferry?", (), (), 3)]
    base = rag_rates(qs, ["It is free.", "I could not find it.", "I could not find it."], "I could not find it.")
    assert base == {"containment": 0.0, "refusal_correct": 1.0, "false_refusals": 0.5, "citing": 0.0}
    never_refuses = rag_rates(qs, ["10 pounds [1].", "At 1 am [1].", "At noon [2]."], "I could not find it.")
    assert never_refuses == {"containment": 1.0, "refusal_correct": 0.0, "false_refusals": 0.0,
                             "citing": 1.0}

    def result(b, a):
        return EvalResult("containment", None, 3, 0, 1.0, 0.5, b["containment"], a["containment"],
                          require_metric=True, guards=("refusal_correct",),
                          extra={k: (b[k], a[k]) for k in b if k != "containment"})

    assert not result(base, never_refuses).beats_base  # fewer correct refusals
    good = rag_rates(qs, ["10 pounds [1].", "I could not find it.", "I could not find it."],
                     "I could not find it.")
    assert result(base, good).beats_base
    assert not result(good, good).beats_base  # not higher


def test_the_platform_source_filters_retries_quota_refusals_and_reads_the_budget():
    import grpc
    from hybridserve.answers import Answer, Citation, Final, StageTimings, Usage
    from hybridserve.cli.finetune import AskPromptSource
    from hybridserve.exceptions import RateLimitError

    calls, slept = [], []

    class Client:
        def ask(self, question, **kw):
            calls.append(kw)
            if len(calls) == 1:
                raise RateLimitError(grpc.StatusCode.RESOURCE_EXHAUSTED, "over quota",
                                     retry_after=2.5)
            c = Citation(1, "c1", "d1.md", 0, "T", "s", "snip", 1.0, 1.0, text="whole text")
            final = Final("prompt_only", Usage(7, 0), "", "", [], [],
                          StageTimings(*[0.0] * 9), "r", "", "t", 123, 50, [1, 2, 3])
            return Answer("", [c], final)

    source = AskPromptSource(Client(), tenant="t", max_tokens=64, app="rag-x", sleep=slept.append)
    got = source.prompt("q?", only_docs=("d1.md",), exclude_docs=("d2.md",))
    assert slept == [2.5] and len(calls) == 2
    kw = calls[-1]
    assert kw["prompt_only"] and kw["app"] == "rag-x" and kw["max_tokens"] == 64
    assert kw["filters"] == [("doc_id", "any_of", ["d1.md"]), ("doc_id", "not_equal", ["d2.md"])]
    assert kw["min_score"] == -1.0  # the gold chunks whatever their score
    assert got.passages[0].text == "whole text" and got.token_ids == (1, 2, 3)
    assert got.passage_budget == 123
    # At most 16 filters go out; the builder drops the other exclusions itself.
    source.prompt("q?", exclude_docs=tuple(f"x{i}" for i in range(30)))
    assert len(calls[-1]["filters"]) == 16 and "min_score" not in calls[-1]
