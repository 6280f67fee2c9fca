"""hybridserve.scoring: every metric on hand-made cases with hand-computed values, the
summary of an arm field by field, the paired test against known p-values, and the
question-file validator naming FILE:LINE for each kind of problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hybridserve.scoring import (
    CITATION_MARK,
    REFUSAL_PHRASES,
    ArmSummary,
    Outcome,
    Question,
    QuestionFileError,
    SourceRef,
    cited_numbers,
    contains_answer,
    grounding,
    is_refusal,
    load_questions,
    normalize_answer,
    paired,
    percentile,
    score,
    summarize,
    token_f1,
)

ROOT = Path(__file__).resolve().parents[2]
TENANT_REFUSAL = "I could not find the answer in your documents."


# --------------------------------------------------------------------------- the package


def test_the_package_imports_only_the_standard_library():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import hybridserve.scoring\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(m for m in new if m not in sys.stdlib_module_names))\n"
        "print(sorted(m for m in sys.modules if m.startswith('hybridserve.')"
        " and not m.startswith('hybridserve.scoring')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(ROOT / "services")}, timeout=60,
    )
    assert proc.stdout.splitlines() == ["['hybridserve']", "[]"]


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("Hello, world... (really?)", "hello world really"),
        ("don't", "dont"),
        ("U.S.A.", "usa"),
        ("$5 + 10%", "5 10"),
        ("a cat and an owl and the dog", "cat and owl and dog"),
        ("The Theatre", "theatre"),  # "the" inside a word stays
        ("A", "a"),  # a last word is kept ("Stand A" is not "Stand")
        ("Stand A", "stand a"),
        ("  New\tYork \n City  ", "new york city"),
        ("", ""),
        ("?!...", ""),
        # Unicode: curly quotes and apostrophes, dashes, full-width letters,
        # non-breaking spaces, case folding, composed and decomposed accents
        ("“Café” — ＰＡＲＩＳ", "café paris"),
        ("don’t", "dont"),
        ("New\u00a0York", "new york"),
        ("Straße", "strasse"),
        ("STRASSE", "strasse"),
        ("Cafe\u0301", "café"),
        ("ÉCOLE", "école"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# --------------------------------------------------------------------------- containment


def test_containment_takes_any_of_several_references():
    answer = "It was built in 1889 by Gustave Eiffel."
    assert contains_answer(answer, ["1887", "Gustave Eiffel"])
    assert contains_answer(answer, ["1889"])
    assert not contains_answer(answer, ["1887", "Alexandre Gustave"])


def test_containment_compares_normalized_text():
    assert contains_answer("It's the EIFFEL   Tower.", ["eiffel tower"])
    assert contains_answer("“Straße”", ["STRASSE"])


def test_containment_skips_references_empty_once_normalized():
    assert not contains_answer("anything at all", [""])
    assert not contains_answer("anything at all", ["", "The", "?"])
    assert contains_answer("x marks it", ["", "X"])
    assert not contains_answer("anything", [])
    assert not contains_answer("", ["Paris"])


def test_containment_matches_whole_words():
    # Not inside a word or a longer number: "£2.10" is not in "until 21:00", "LP-" not in "help"
    assert not contains_answer("in 1999", ["99"])
    assert not contains_answer("Coaches run until 21:00.", ["£2.10"])
    assert not contains_answer("Ask for help.", ["LP-"])
    assert not contains_answer("Go to Stand K.", ["Stand A"])
    assert contains_answer("Go to Stand A.", ["Stand A"])
    assert contains_answer("It costs £2.10 [1].", ["£2.10"])


# --------------------------------------------------------------------------- token F1


@pytest.mark.parametrize(
    ("answer", "references", "expected"),
    [
        ("the Denver Broncos", ["Denver Broncos"], 1.0),
        # 2 common of 4 answer tokens (denver broncos won game), of 2 reference tokens
        ("Denver Broncos won the game", ["Denver Broncos"], 2 / 3),
        # P = 1, R = 1/2
        ("Broncos", ["Denver Broncos"], 2 / 3),
        # the intersection is a multiset: 1 common, P = 1/3, R = 1
        ("paris paris paris", ["Paris"], 0.5),
        # best over references
        ("Denver Broncos", ["Carolina Panthers", "Broncos", "Denver"], 2 / 3),
        ("Denver Broncos", ["Carolina Panthers", "Denver Broncos"], 1.0),
        # a SQuAD dev question (Super Bowl 50): P = 1/3 (1 of 3), R = 1/2 (1 of 2)
        ("Santa Clara Stadium", ["Levi's Stadium"], 0.4),
        ("Carolina Panthers", ["Denver Broncos"], 0.0),
        # empty sides
        ("", ["Paris"], 0.0),
        ("Paris", [""], 0.0),
        ("", [""], 0.0),
        ("...", ["The"], 0.0),
        ("Paris", [], 0.0),
    ],
)
def test_token_f1(answer, references, expected):
    assert token_f1(answer, references) == pytest.approx(expected)


# --------------------------------------------------------------------------- refusals


def test_the_no_context_finish_reason_is_a_refusal_whatever_the_text():
    assert is_refusal("Paris", "no_context")
    assert not is_refusal("Paris", "stop")


def test_the_tenants_refusal_message_in_another_case_and_punctuation():
    message = "Sorry: nothing on that in our knowledge base!"
    answer = "SORRY... Nothing on that in our Knowledge Base"
    assert is_refusal(answer, "stop", [message])
    assert not is_refusal(answer, "stop")  # not a built-in phrase: the message made it one
    assert is_refusal("i COULD not find the answer in your documents", "stop", [TENANT_REFUSAL])


def test_a_refusal_message_without_words_is_ignored():
    assert not is_refusal("Paris", "stop", ["...", ""])


@pytest.mark.parametrize(
    "answer",
    [
        "I don't know.",
        "I do not know the answer to that.",
        "I DON’T KNOW",
        "Sorry, that is not in the passages.",
        "The passages do not mention it.",
        "There is no information about his birthday.",
        "I cannot find that in the documents [1].",
    ],
)
def test_refusal_phrases(answer):
    assert is_refusal(answer)


@pytest.mark.parametrize("answer", ["", "   \n\t", "..."])
def test_an_answer_without_words_is_no_answer_not_a_refusal(answer):
    assert not is_refusal(answer)
    assert is_refusal(answer, finish_reason="no_context")


@pytest.mark.parametrize(
    "answer",
    [
        "As you know, the capital is Paris.",
        "I know: it is Paris.",
        "Nobody knows exactly; estimates say 300 BC.",
        "The report has no informational value.",  # whole words: not "no information"
        "Paris",
    ],
)
def test_answers_that_are_not_refusals(answer):
    assert not is_refusal(answer, "stop", [TENANT_REFUSAL])


def test_refusal_phrases_are_stored_normalized():
    assert all(normalize_answer(p) == p and p for p in REFUSAL_PHRASES)
    assert "not in passages" in REFUSAL_PHRASES


# --------------------------------------------------------------------------- citation marks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris [1].", [1]),
        ("Paris [1, 3].", [1, 3]),
        ("Paris [2][3].", [2, 3]),
        ("Paris [1;2]", [1, 2]),
        ("[3] then [1, 2], then [3] again", [3, 1, 2]),
        ("Paris [12].", [12]),
        ("no marks [] [x] [1-2] (1)", []),
    ],
)
def test_cited_numbers(text, expected):
    assert cited_numbers(text) == expected


def test_adjacent_marks_are_two_marks():
    assert [m.group(0) for m in CITATION_MARK.finditer("[2][3]")] == ["[2]", "[3]"]


SOURCES = (
    SourceRef(1, "d1", "Paris is the capital of France."),
    SourceRef(2, "d2", "Lyon is a city."),
    SourceRef(3, "d3", "Marseille is a port."),
)


def test_outcome_computes_citations_when_none_are_given():
    out = Outcome("q", "rag", answer="A [1] B [12] C [2][3] D [1]", sources=SOURCES,
                  cited=None, invalid_citations=None, rag=True)
    assert out.cited == (1, 2, 3)
    assert out.invalid_citations == (12,)  # [12] with 3 sources
    given = Outcome("q", "rag", answer="A [1] [12]", sources=SOURCES, cited=(1,), rag=True)
    assert given.cited == (1,) and given.invalid_citations == ()  # as the server reported


def test_scored_citations():
    question = Question("q", "What is the capital of France?", ("Paris",), ("d1",), 1)
    out = Outcome("q", "rag", answer="Paris [1][12].", sources=SOURCES,
                  cited=None, invalid_citations=None, rag=True)
    s = score(question, out)
    assert (s.cites_valid, s.cited_gold, s.cited_total, s.invalid) == (True, 1, 2, 1)
    assert s.gold_in_sources and s.cites_gold
    only_bad = score(question, Outcome("q", "rag", answer="Paris [12].", sources=SOURCES,
                                       cited=None, invalid_citations=None, rag=True))
    assert (only_bad.cites_valid, only_bad.cited_gold, only_bad.cited_total) == (False, 0, 1)
    other = score(question, Outcome("q", "rag", answer="Paris [2, 3].", sources=SOURCES,
                                    cited=None, invalid_citations=None, rag=True))
    assert (other.cites_valid, other.cited_gold, other.cites_gold) == (True, 0, False)


# --------------------------------------------------------------------------- grounding


def test_grounding_drops_question_tokens_and_citation_marks():
    question = "Who designed the Eiffel Tower?"
    passages = ["It was designed by Gustave Eiffel in 1889."]
    # answer tokens: eiffel tower was designed by gustave eiffel in paris; without the
    # question's (who designed eiffel tower): was by gustave in paris; 4 of 5 in the
    # passage. Were "[1]" kept, its "1" would be a sixth token.
    answer = "The Eiffel Tower was designed by Gustave Eiffel [1] in Paris."
    assert grounding(answer, question, passages) == pytest.approx(0.8)


def test_grounding_counts_every_occurrence():
    assert grounding("Paris, Paris, Rome", "", ["Paris"]) == pytest.approx(2 / 3)
    assert grounding("Rome", "", ["Paris", "Rome is old"]) == 1.0


@pytest.mark.parametrize(
    ("answer", "question", "passages"),
    [
        ("The Eiffel Tower?", "Who designed the Eiffel Tower?", ["anything"]),  # all in q
        ("[1]", "Who?", ["anything"]),  # only a citation mark
        ("", "Who?", ["anything"]),
        ("Gustave Eiffel", "Who?", []),  # no passages
        ("Gustave Eiffel", "Who?", ["", "..."]),  # passages without tokens
    ],
)
def test_grounding_none(answer, question, passages):
    assert grounding(answer, question, passages) is None


# --------------------------------------------------------------------------- score


PARIS = Question("q1", "What is the capital of France?", ("Paris",), ("d1", "d4"), 1)
UNANSWERABLE = Question("q2", "Who is the CEO in 2090?", (), (), 2)


def test_answerable_correct_means_contained_and_not_refused():
    right = score(PARIS, Outcome("q1", "base", answer="It is Paris."))
    assert (right.contained, right.refused, right.correct) == (True, False, True)
    # A hedged answer that states the fact answers it.
    hedge = score(PARIS, Outcome("q1", "base", answer="It does not say more, but it is Paris."))
    assert (hedge.contained, hedge.refused, hedge.correct) == (True, False, True)
    refusal = score(PARIS, Outcome("q1", "base", answer="I don't know."))
    assert (refusal.contained, refusal.refused, refusal.correct) == (False, True, False)
    wrong = score(PARIS, Outcome("q1", "base", answer="Lyon."))
    assert (wrong.contained, wrong.correct, wrong.f1) == (False, False, 0.0)


def test_unanswerable_correct_means_refused():
    refused = score(UNANSWERABLE, Outcome("q2", "rag", answer=TENANT_REFUSAL,
                                          finish_reason="no_context", rag=True))
    assert (refused.answerable, refused.refused, refused.correct) == (False, True, True)
    assert refused.recall is None and refused.f1 == 0.0 and not refused.contained
    made_up = score(UNANSWERABLE, Outcome("q2", "base", answer="Jane Doe."))
    assert (made_up.refused, made_up.correct) == (False, False)
    by_message = score(UNANSWERABLE, Outcome("q2", "base", answer="COULD NOT FIND the answer "
                                             "in your documents"),
                       refusal_messages=[TENANT_REFUSAL])
    assert by_message.correct


def test_citation_marks_do_not_count_against_f1():
    s = score(PARIS, Outcome("q1", "rag", answer="Paris [1].", sources=SOURCES, cited=(1,),
                             rag=True))
    assert s.f1 == 1.0 and s.contained


def test_recall_is_the_share_of_distinct_gold_docs_among_the_sources():
    sources = (SourceRef(1, "d1", "x"), SourceRef(2, "d9", "y"), SourceRef(3, "d1", "z"))
    s = score(PARIS, Outcome("q1", "rag", answer="Paris", sources=sources, rag=True))
    assert s.recall == 0.5  # d1 of {d1, d4}, once however often retrieved
    none = score(PARIS, Outcome("q1", "rag", answer="Paris", rag=True))
    assert none.recall == 0.0 and not none.gold_in_sources
    assert score(PARIS, Outcome("q1", "base", answer="Paris")).recall is None


def test_arms_that_do_not_retrieve_have_no_citation_scores():
    s = score(PARIS, Outcome("q1", "adapter", answer="Paris [1] [7]", cited=None,
                             invalid_citations=None))
    assert (s.cites_valid, s.cited_gold, s.cited_total, s.invalid) == (False, 0, 0, 0)
    assert (s.gold_in_sources, s.cites_gold, s.recall, s.grounding) == (False, False, None, None)


def test_an_answer_of_citation_marks_alone_is_no_answer():
    s = score(UNANSWERABLE, Outcome("q2", "rag", answer=" [1] ", sources=SOURCES, rag=True))
    assert not s.refused and not s.correct


def test_refusals_have_no_grounding():
    s = score(PARIS, Outcome("q1", "rag", answer="I don't know.", sources=SOURCES, rag=True))
    assert s.refused and s.grounding is None
    answered = score(PARIS, Outcome("q1", "rag", answer="Paris [1]", sources=SOURCES, cited=(1,),
                                    rag=True))
    assert answered.grounding == 1.0
    # Grounding is in the passages the answer cites: none cited, none measured.
    uncited = score(PARIS, Outcome("q1", "rag", answer="Paris", sources=SOURCES, rag=True))
    assert uncited.grounding is None
    elsewhere = score(PARIS, Outcome("q1", "rag", answer="Paris [2]", sources=SOURCES, cited=(2,),
                                     rag=True))
    assert elsewhere.grounding == 0.0  # "paris" is not in passage 2


def test_the_format_check_sees_the_answer_as_it_came():
    seen = []

    def check(answer: str) -> bool:
        seen.append(answer)
        return answer.endswith("].")

    s = score(PARIS, Outcome("q1", "rag", answer="Paris [1].", sources=SOURCES, rag=True),
              format_check=check)
    assert s.format_ok is True and seen == ["Paris [1]."]
    assert score(PARIS, Outcome("q1", "base", answer="Paris")).format_ok is None


def test_a_failed_outcome_is_wrong_everywhere():
    failed = Outcome("q1", "rag", answer="Paris [1]", sources=SOURCES, cited=(1,), rag=True,
                     error="UNAVAILABLE: the engine is down")
    s = score(PARIS, failed, format_check=lambda a: True)
    assert s.failed and s.answerable
    assert (s.contained, s.f1, s.refused, s.correct) == (False, 0.0, False, False)
    assert s.recall == 0.0  # counted in recall@k's denominator
    assert (s.cites_valid, s.cited_gold, s.cited_total, s.invalid) == (False, 0, 0, 0)
    assert (s.gold_in_sources, s.cites_gold, s.grounding, s.format_ok) == (
        False, False, None, None)
    unanswerable = score(UNANSWERABLE, Outcome("q2", "rag", rag=True, error="DEADLINE_EXCEEDED"))
    assert (unanswerable.refused, unanswerable.correct) == (False, False)


def test_score_refuses_an_outcome_of_another_question():
    with pytest.raises(ValueError, match="'q2' scored against 'q1'"):
        score(PARIS, Outcome("q2", "base", answer="Paris"))


# --------------------------------------------------------------------------- summarize


def _rag_table():
    """Six questions of one RAG arm; the expected values are computed in the test."""
    city = SourceRef(1, "d9", "Lyon is a city.")
    rows = [
        (
            Question("q1", "What is the capital of France?", ("Paris",), ("d1",), 1),
            Outcome("q1", "rag", answer="The capital is Paris [1].", finish_reason="stop",
                    sources=(SourceRef(1, "d1", "Paris is the capital of France."),
                             SourceRef(2, "d9", "Lyon is a city.")),
                    cited=(1,), prompt_tokens=100, completion_tokens=10, latency_s=1.0,
                    rag=True),
        ),
        (
            Question("q2", "When was the tower built?", ("1889",), ("d2", "d3"), 2),
            Outcome("q2", "rag", answer="It was built in 1889 [2][7].", finish_reason="stop",
                    sources=(city, SourceRef(2, "d2", "The tower was built in 1889.")),
                    cited=(2,), invalid_citations=(7,), prompt_tokens=200,
                    completion_tokens=20, latency_s=2.0, rag=True),
        ),
        (
            Question("q3", "What colour is the logo?", ("blue",), ("d4",), 3),
            Outcome("q3", "rag", answer="I don't know.", finish_reason="stop",
                    sources=(SourceRef(1, "d4", "The logo is blue."),), prompt_tokens=300,
                    completion_tokens=30, latency_s=3.0, rag=True),
        ),
        (
            Question("q4", "Who is the CEO in 2090?", (), (), 4),
            Outcome("q4", "rag", answer=TENANT_REFUSAL, finish_reason="no_context",
                    latency_s=0.5, rag=True),
        ),
        (
            Question("q5", "What is the answer?", ("42",), ("d5",), 5),
            Outcome("q5", "rag", error="UNAVAILABLE: engine down", latency_s=9.0,
                    prompt_tokens=999, rag=True),
        ),
        (
            Question("q6", "Who is the CEO in 2091?", (), (), 6),
            Outcome("q6", "rag", answer="The CEO is Jane [4].", finish_reason="stop",
                    sources=(city,), invalid_citations=(4,), prompt_tokens=400,
                    completion_tokens=40, latency_s=4.0, rag=True),
        ),
    ]
    scores = [score(q, o, format_check=lambda a: "[" in a) for q, o in rows]
    return scores, [o for _, o in rows]


def test_the_scores_of_the_table():
    scores, _ = _rag_table()
    by_id = {s.question_id: s for s in scores}
    # q1: "capital is paris" vs "paris": P = 1/3, R = 1; grounding: "paris" (the rest is
    # in the question) is in the passages
    assert by_id["q1"].f1 == pytest.approx(0.5)
    assert (by_id["q1"].recall, by_id["q1"].grounding) == (1.0, 1.0)
    # q2: 5 tokens vs 1: F1 = 1/3; recall d2 of {d2, d3}; grounding: it, in, 1889 left,
    # "in" and "1889" in the passages
    assert by_id["q2"].f1 == pytest.approx(1 / 3)
    assert by_id["q2"].recall == 0.5
    assert by_id["q2"].grounding == pytest.approx(2 / 3)
    assert (by_id["q2"].cited_gold, by_id["q2"].cited_total, by_id["q2"].invalid) == (1, 2, 1)
    # q3 refused with the gold doc in its sources
    assert by_id["q3"].refused and by_id["q3"].gold_in_sources and not by_id["q3"].cites_gold
    # q6 cites no valid source: no grounding to measure
    assert by_id["q6"].grounding is None and not by_id["q6"].correct


def test_summarize_a_rag_arm():
    scores, outcomes = _rag_table()
    summary = summarize("rag", scores, list(reversed(outcomes)))  # matched by id
    expected = ArmSummary(
        arm="rag",
        questions=6,
        answerable=4,  # q1 q2 q3 q5
        unanswerable=2,  # q4 q6
        failed=1,  # q5
        containment=2 / 4,  # q1 q2
        token_f1=(0.5 + 1 / 3 + 0 + 0) / 4,
        recall_at_k=(1 + 0.5 + 1 + 0) / 4,  # the failed q5 counts, as 0
        citation_rate=2 / 4,  # q1 q2 cite a valid source
        citation_precision=2 / 3,  # gold citations 1 + 1 of 1 + 2 cited
        citation_recall=2 / 3,  # q1 q2 cite gold, of q1 q2 q3 whose sources hold gold
        invalid_citations=2,  # q2's [7] and q6's [4]: over all questions
        grounding=(1 + 2 / 3) / 2,  # q1 q2; refusals, failures and uncited answers have none
        refusal_correct=1 / 2,  # q4 of q4 q6
        false_refusals=1 / 3,  # q3, of the answered q1 q2 q3 (the failed q5 is no answer)
        format_match=3 / 5,  # "[" in q1 q2 q6, not q3 q4; q5 failed, left out
        latency_p50_s=2.0,  # of 0.5 1 2 3 4 (q5's 9 s left out)
        latency_p95_s=3.8,  # position 3.8: 3 + 0.8 * (4 - 3)
        prompt_tokens_mean=(100 + 200 + 300 + 0 + 400) / 5,
        completion_tokens_mean=(10 + 20 + 30 + 0 + 40) / 5,
    )
    assert summary.to_dict() == pytest.approx(expected.to_dict())
    assert set(summary.to_dict()) == set(ArmSummary.__dataclass_fields__)
    json.dumps(summary.to_dict())


def test_summarize_an_arm_that_does_not_retrieve():
    questions = [PARIS, UNANSWERABLE]
    outcomes = [
        Outcome("q1", "base", answer="Paris [1]", cited=None, invalid_citations=None,
                prompt_tokens=10, completion_tokens=2, latency_s=0.25),
        Outcome("q2", "base", answer="I don't know", prompt_tokens=12, completion_tokens=4,
                latency_s=0.75),
    ]
    scores = [score(q, o) for q, o in zip(questions, outcomes)]
    assert summarize("base", scores, outcomes) == ArmSummary(
        arm="base", questions=2, answerable=1, unanswerable=1, failed=0,
        containment=1.0, token_f1=1.0, recall_at_k=None, citation_rate=None,
        citation_precision=None, citation_recall=None, invalid_citations=0, grounding=None,
        refusal_correct=1.0, false_refusals=0.0, format_match=None,
        latency_p50_s=0.5, latency_p95_s=0.725, prompt_tokens_mean=11.0,
        completion_tokens_mean=3.0,
    )


def test_summarize_empty_denominators_are_none():
    failed = Outcome("q2", "rag", error="UNAVAILABLE", rag=True)
    summary = summarize("rag", [score(UNANSWERABLE, failed)], [failed])
    assert (summary.questions, summary.answerable, summary.failed) == (1, 0, 1)
    assert summary.containment is None and summary.token_f1 is None
    assert summary.recall_at_k is None and summary.citation_rate is None
    assert summary.citation_precision is None and summary.citation_recall is None
    assert summary.false_refusals is None and summary.refusal_correct == 0.0
    assert summary.latency_p50_s is None and summary.prompt_tokens_mean is None


def test_summarize_refuses_mismatched_inputs():
    a = Outcome("q1", "rag", answer="Paris", rag=True)
    b = Outcome("q2", "rag", answer="x", rag=True)
    with pytest.raises(ValueError, match="arm"):
        summarize("base", [score(PARIS, a)], [a])
    with pytest.raises(ValueError, match="same questions"):
        summarize("rag", [score(PARIS, a)], [b])
    with pytest.raises(ValueError, match="same questions"):
        summarize("rag", [score(PARIS, a), score(PARIS, a)], [a, a])
    c = Outcome("q2", "rag", answer="x")
    with pytest.raises(ValueError, match="retrieves"):
        summarize("rag", [score(PARIS, a), score(UNANSWERABLE, c)], [a, c])


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4, 10], 0, 1.0),
        ([1, 2, 3, 4, 10], 25, 2.0),
        ([1, 2, 3, 4, 10], 50, 3.0),
        ([1, 2, 3, 4, 10], 95, 8.8),  # numpy.percentile([1, 2, 3, 4, 10], 95)
        ([10, 4, 3, 2, 1], 100, 10.0),  # any order
        ([1, 2], 50, 1.5),
        ([1, 2, 3, 4], 90, 3.7),
        ([7.5], 95, 7.5),
    ],
)
def test_percentile(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_and_out_of_range():
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def _pairs(wins: int, losses: int, both: int = 0, neither: int = 0):
    a = [False] * wins + [True] * losses + [True] * both + [False] * neither
    b = [True] * wins + [False] * losses + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [
        (14, 1, 2 * (1 + 15) / 2**15),  # = 0.0009765625
        (0, 0, 1.0),
        (5, 5, 1.0),
        (8, 2, 0.109375),  # 2 * (1 + 10 + 45) / 1024
        (2, 8, 0.109375),  # two-sided: symmetric
        (0, 20, 2 / 2**20),
        (1, 0, 1.0),
        (6, 0, 0.03125),  # 2 / 64
    ],
)
def test_paired_sign_test(wins, losses, p):
    a, b = _pairs(wins, losses, both=3, neither=2)
    result = paired("base", a, "adapter", b)
    assert (result.a, result.b) == ("base", "adapter")
    assert (result.wins, result.losses, result.ties) == (wins, losses, 5)
    assert result.p_value == pytest.approx(p, rel=1e-12)


def test_paired_known_values_exactly():
    a, b = _pairs(14, 1)
    assert paired("a", a, "b", b).p_value == 0.0009765625
    assert paired("a", [], "b", []).p_value == 1.0


def test_paired_wins_are_b_better():
    result = paired("base", [False, True, True], "rag", [True, True, False])
    assert (result.wins, result.losses, result.ties) == (1, 1, 1)
    assert paired("base", [False], "rag", [True]).wins == 1


def test_paired_needs_the_same_questions():
    with pytest.raises(ValueError, match="same questions"):
        paired("a", [True], "b", [True, False])


def test_paired_large_n_stays_finite():
    a, b = _pairs(600, 400)
    result = paired("a", a, "b", b)
    assert 0 < result.p_value < 1e-9 and math.isfinite(result.p_value)


# --------------------------------------------------------------------------- question files


GOOD_LINE = {"question": "What is the capital of France?", "answers": ["Paris"],
             "gold_docs": ["d1"]}


def _line(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode()


def _write(path: Path, *lines) -> Path:
    path.write_bytes(b"\n".join(_line(v) for v in lines) + b"\n")
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(QuestionFileError) as info:
        load_questions(path)
    assert isinstance(info.value, ValueError)
    return info.value.problems


def test_a_good_file(tmp_path):
    path = _write(
        tmp_path / "q.jsonl",
        {"id": "capital", **GOOD_LINE},
        "",
        {"question": "When was it built?", "answers": ["1889", "in 1889"],
         "gold_docs": ["d2", "d3"]},
        "   ",
        {"question": "Who is the CEO in 2090?", "answers": [], "gold_docs": []},
    )
    qs = load_questions(str(path))
    assert qs.path == path
    assert qs.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert qs.questions == [
        Question("capital", "What is the capital of France?", ("Paris",), ("d1",), 1),
        Question("line-3", "When was it built?", ("1889", "in 1889"), ("d2", "d3"), 3),
        Question("line-5", "Who is the CEO in 2090?", (), (), 5),
    ]
    assert [q.answerable for q in qs.questions] == [True, True, False]


def test_a_byte_order_mark_and_crlf_line_ends_are_fine(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_LINE).encode() + b"\r\n\r\n")
    assert [q.id for q in load_questions(path).questions] == ["line-1"]


# (case id, line 3 of the file, what the one problem must say)
BAD_LINES = [
    ("invalid-utf8", b'{"question": "\xff", "answers": [], "gold_docs": []}',
     "not valid UTF-8"),
    ("malformed-json", '{"question": "x", ', "malformed JSON"),
    ("non-object", '["What?"]', "expected a JSON object, got an array"),
    ("non-object-string", '"What?"', "expected a JSON object, got a string"),
    ("missing-question", {"answers": [], "gold_docs": []}, "missing 'question'"),
    ("empty-question", {**GOOD_LINE, "question": "  "}, "'question' is empty"),
    ("question-not-string", {**GOOD_LINE, "question": 5},
     "'question' must be a string, got a number"),
    ("question-too-long", {**GOOD_LINE, "question": "x" * 4001},
     "'question' has 4001 characters; at most 4000"),
    ("answers-not-list", {**GOOD_LINE, "answers": "Paris"},
     "'answers' must be a list of strings, got a string"),
    ("answers-non-string", {**GOOD_LINE, "answers": ["Paris", 1]},
     "answers[1] must be a non-empty string, got a number"),
    ("answers-empty-string", {**GOOD_LINE, "answers": [""]},
     "answers[0] must be a non-empty string, got an empty one"),
    ("missing-answers", {"question": "x", "gold_docs": []}, "missing 'answers'"),
    ("answerable-without-answers", {**GOOD_LINE, "answers": []},
     "'answers' is empty, but the question has gold_docs"),
    ("unanswerable-with-answers", {**GOOD_LINE, "gold_docs": []},
     "'gold_docs' is empty (the question is unanswerable"),
    ("gold-docs-not-list", {**GOOD_LINE, "gold_docs": "d1"},
     "'gold_docs' must be a list of strings, got a string"),
    ("gold-docs-null-item", {**GOOD_LINE, "gold_docs": [None]},
     "gold_docs[0] must be a non-empty string, got null"),
    ("missing-gold-docs", {"question": "x", "answers": []}, "missing 'gold_docs'"),
    ("unknown-key", {**GOOD_LINE, "notes": "x"}, "unknown key 'notes'"),
    ("id-not-string", {**GOOD_LINE, "id": 7}, "'id' must be a non-empty string, got a number"),
    ("id-empty", {**GOOD_LINE, "id": ""}, "'id' must be a non-empty string, got an empty one"),
]


@pytest.mark.parametrize(("line", "says"), [case[1:] for case in BAD_LINES],
                         ids=[case[0] for case in BAD_LINES])
def test_each_problem_is_reported_at_its_line(tmp_path, line, says):
    path = _write(tmp_path / "q.jsonl", GOOD_LINE, "", line, GOOD_LINE)
    problems = _problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:3: ")
    assert says in problems[0]


def test_a_typo_in_a_key_gets_a_hint(tmp_path):
    path = _write(tmp_path / "q.jsonl",
                  {"question": "x", "answer": ["Paris"], "gold_docs": ["d1"]})
    assert _problems(path) == [
        f"{path}:1: unknown key 'answer'; did you mean 'answers'?",
        f"{path}:1: missing 'answers' (the accepted answers; [] for an unanswerable question)",
    ]


def test_duplicate_ids(tmp_path):
    path = _write(tmp_path / "q.jsonl", {"id": "a", **GOOD_LINE}, {"id": "line-3", **GOOD_LINE},
                  GOOD_LINE, {"id": "a", **GOOD_LINE})
    assert _problems(path) == [
        f"{path}:3: duplicate id 'line-3' (first on line 2)",  # the default id of line 3
        f"{path}:4: duplicate id 'a' (first on line 1)",
    ]


def test_a_duplicate_of_a_line_with_other_problems_is_still_reported(tmp_path):
    path = _write(tmp_path / "q.jsonl", {"id": "a", **GOOD_LINE, "answers": []},
                  {"id": "a", **GOOD_LINE})
    problems = _problems(path)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:1", f"{path}:2"]
    assert "duplicate id 'a' (first on line 1)" in problems[1]


@pytest.mark.parametrize("content", [b"", b"\n  \n\r\n"])
def test_an_empty_file(tmp_path, content):
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:1: the file has no questions")


def test_a_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert _problems(path) == [
        f"{path}:1: cannot read the question file: No such file or directory"
    ]


def test_several_problems_are_reported_at_once(tmp_path):
    path = _write(
        tmp_path / "q.jsonl",
        "not json",
        GOOD_LINE,
        {"question": "", "answers": "x", "gold_docs": [1], "extra": True},
        b"\xff",
    )
    problems = _problems(path)
    assert problems == [
        f"{path}:1: malformed JSON: Expecting value at column 1",
        f"{path}:3: unknown key 'extra'; the keys are id, question, answers, gold_docs",
        f"{path}:3: 'question' is empty",
        f"{path}:3: 'answers' must be a list of strings, got a string",
        f"{path}:3: gold_docs[0] must be a non-empty string, got a number",
        f"{path}:4: not valid UTF-8 (invalid start byte at byte 0)",
    ]
    with pytest.raises(QuestionFileError) as info:
        load_questions(path)
    assert str(info.value) == "\n".join(problems)


def test_the_message_lists_twenty_problems_then_counts(tmp_path):
    path = _write(tmp_path / "q.jsonl", *(["[]"] * 25))
    with pytest.raises(QuestionFileError) as info:
        load_questions(path)
    assert len(info.value.problems) == 25
    lines = str(info.value).splitlines()
    assert lines[:20] == info.value.problems[:20]
    assert lines[20:] == ["... and 5 more"]
