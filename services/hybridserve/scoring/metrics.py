"""Per-answer metrics, and their summary per arm.

Every text metric compares *normalized* text (`normalize_answer`, as SQuAD and
ALCE do, made Unicode-aware):

1. NFKC-normalize (full-width letters, ligatures and non-breaking spaces become
   their plain forms);
2. case-fold (Unicode lowercase: "Straße" and "STRASSE" both become "strasse");
3. delete every punctuation and symbol character (Unicode categories P* and S*,
   a superset of SQuAD's ASCII punctuation): "don't" becomes "dont", "U.S."
   becomes "us", "$5" becomes "5";
4. split on whitespace, drop the tokens "a", "an" and "the" (but a last one:
   "Stand A" reads "stand a"), and join the rest with single spaces.

The metrics of one answer (`score`, which builds a `QuestionScore`):

- containment (`contains_answer`): some reference answer, normalized and not
  empty, occurs in the normalized answer as whole words (ALCE's str_em, on word
  boundaries: "210" does not match inside "2100").
- token F1 (`token_f1`): SQuAD's token F1. The common tokens are the multiset
  intersection of the two token lists; precision is common / answer tokens,
  recall is common / reference tokens, and F1 is 2PR / (P + R). It is 0.0 when
  nothing is shared or either side is empty. The answer's F1 is its best over
  the references.
- refusal (`is_refusal`): the finish reason is "no_context" (the gateway found
  no passage and did not ask the model), or the normalized answer contains, as
  whole words, a normalized refusal message of the tenant or one of
  `REFUSAL_PHRASES`; but an answer that contains a reference is not a refusal
  (`score`), and an answer with no words is no answer, not a refusal.
- correct: an answerable question (one with gold documents) is answered
  correctly when the answer contains a reference (and so is not a refusal); an
  unanswerable one when the answer is a refusal.
- recall@k (`QuestionScore.recall`; RAG arms, answerable questions): the share
  of the question's distinct gold documents that are among the doc ids of the
  answer's sources (the k passages the model saw).
- citations (RAG arms): a citation mark is `[n]`, `[n, m]` or `[n; m]`
  (`CITATION_MARK`); a cited number is valid when a source has that number.
- grounding (`grounding`): the share of the answer's tokens that occur among
  the tokens of the passages it cites (valid citations only). Citation marks are
  removed first, and so is every token that occurs in the question (repeating
  the question proves nothing). Refusals and answers that cite no valid source
  have no grounding.

Before containment, token F1 and refusal detection, `score` removes citation
marks from the answer, so that "[1]" neither lowers a RAG answer's F1 nor counts
as a word; a format check sees the answer as it came.

A question that failed (`Outcome.error`, after retries) scores as wrong
everywhere and stays in every per-question denominator; the rates over answers
(citation precision and recall, grounding, format match, latency, tokens)
leave it out, because it has no answer.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from hybridserve.scoring.questions import Question
from hybridserve.scoring.stats import percentile

__all__ = [
    "CITATION_MARK",
    "REFUSAL_PHRASES",
    "ArmSummary",
    "Outcome",
    "QuestionScore",
    "SourceRef",
    "cited_numbers",
    "contains_answer",
    "grounding",
    "is_refusal",
    "normalize_answer",
    "score",
    "summarize",
    "token_f1",
]

_ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str) -> str:
    """`text` normalized for comparison: NFKC, case-folded, without punctuation or
    symbols (deleted, not replaced by a space), without the articles a/an/the before
    another word (a last word is kept: "Stand A" reads "stand a", not "stand"), with
    single spaces between words. See the module docstring."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if unicodedata.category(c)[0] not in "PS")
    words = text.split()
    return " ".join(t for i, t in enumerate(words) if t not in _ARTICLES or i == len(words) - 1)


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def contains_answer(answer: str, references: Sequence[str]) -> bool:
    """Whether some reference, normalized and not empty, occurs in the normalized
    answer as whole words ("210" is not in "2100", "lp" not in "help"). False without
    references."""
    normalized = normalize_answer(answer)
    return any(ref and _holds_words(normalized, ref) for ref in map(normalize_answer, references))


def token_f1(answer: str, references: Sequence[str]) -> float:
    """SQuAD token F1 of `answer`, the best over `references`; 0.0 without
    references, and against a reference when either side has no tokens."""
    answer_tokens = _tokens(answer)
    return max((_f1(answer_tokens, _tokens(ref)) for ref in references), default=0.0)


def _f1(answer_tokens: list[str], reference_tokens: list[str]) -> float:
    common = sum((Counter(answer_tokens) & Counter(reference_tokens)).values())
    if common == 0:  # also when either side is empty
        return 0.0
    precision = common / len(answer_tokens)
    recall = common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


#: Phrases that mark an answer as a refusal, normalized (so "not in the passages"
#: reads "not in passages"). An answer is a refusal when its normalized text holds
#: one of them as whole words: "As you know, ..." is not one.
REFUSAL_PHRASES: tuple[str, ...] = tuple(
    normalize_answer(p)
    for p in (
        "I do not know",
        "I don't know",
        "I cannot answer",
        "I can't answer",
        "unable to answer",
        "cannot be answered",
        "could not find",
        "couldn't find",
        "cannot find",
        "can't find",
        "unable to find",
        "not in the passages",
        "not in the provided passages",
        "not in the documents",
        "not in the provided documents",
        "not in the context",
        "not in the provided context",
        "no information",
        "no relevant information",
        "not enough information",
        "insufficient information",
        "not mentioned",
        "does not mention",
        "do not mention",
        "doesn't mention",
        "don't mention",
        "does not say",
        "doesn't say",
        "no mention",
    )
)


def _holds_words(normalized: str, phrase: str) -> bool:
    """Whether the normalized `phrase` occurs in `normalized` as whole words."""
    return f" {phrase} " in f" {normalized} "


def is_refusal(
    answer: str, finish_reason: str = "", refusal_messages: Sequence[str] = ()
) -> bool:
    """Whether `answer` declines to answer.

    True when `finish_reason` is "no_context" (the gateway's own refusal), when the
    normalized answer holds, as whole words, a normalized `refusal_messages` entry
    (the tenant's `no_context_message`; entries with no words are ignored) or one
    of `REFUSAL_PHRASES`. An answer with no words (empty, whitespace, punctuation or
    citation marks only) is no answer, not a refusal: it is wrong either way.
    """
    if finish_reason == "no_context":
        return True
    normalized = normalize_answer(answer)
    if not normalized:
        return False
    phrases = [m for m in map(normalize_answer, refusal_messages) if m]
    return any(_holds_words(normalized, p) for p in (*phrases, *REFUSAL_PHRASES))


#: One citation mark: `[2]`, `[1, 3]` or `[1; 3]` (numbers of 1 to 4 digits);
#: `[1][2]` is two marks. Group 1 holds the numbers and their separators.
CITATION_MARK = re.compile(r"\[(\s*\d{1,4}\s*(?:[,;]\s*\d{1,4}\s*)*)\]")


def cited_numbers(text: str) -> list[int]:
    """Every number cited in `text`, in the order first cited, without repeats."""
    seen: dict[int, None] = {}
    for group in CITATION_MARK.findall(text):
        for part in re.split(r"[,;]", group):
            seen.setdefault(int(part), None)
    return list(seen)


def _without_marks(text: str) -> str:
    return CITATION_MARK.sub(" ", text)


def grounding(answer: str, question: str, passages: Sequence[str]) -> float | None:
    """The share of the answer's tokens that occur among the passages' tokens.

    The answer's tokens are those of the normalized answer once its citation marks
    are removed, without the tokens that occur in the normalized question; each
    occurrence counts. None when no token is left, or the passages have no tokens.
    """
    question_tokens = set(_tokens(question))
    tokens = [t for t in _tokens(_without_marks(answer)) if t not in question_tokens]
    passage_tokens = {t for p in passages for t in _tokens(p)}
    if not tokens or not passage_tokens:
        return None
    return sum(t in passage_tokens for t in tokens) / len(tokens)


@dataclass(frozen=True)
class SourceRef:
    """A numbered source as the answer saw it: its number in the prompt, the
    document it came from, and the passage's text."""

    number: int
    doc_id: str
    text: str


@dataclass(frozen=True)
class Outcome:
    """What one arm answered for one question (built by the runner).

    `cited` and `invalid_citations` are the valid and the invalid cited numbers as
    the server reported them. Given as None, they are computed from the answer with
    `cited_numbers`: a number is valid when a source has it.
    """

    question_id: str
    arm: str
    answer: str = ""
    finish_reason: str = ""
    #: Empty for arms that do not retrieve.
    sources: tuple[SourceRef, ...] = ()
    cited: tuple[int, ...] | None = ()
    invalid_citations: tuple[int, ...] | None = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    #: Non-empty when the question failed after retries: the status name and message.
    error: str = ""
    #: Whether the arm retrieves.
    rag: bool = False

    def __post_init__(self) -> None:
        numbers = cited_numbers(self.answer)
        have = {s.number for s in self.sources}
        # The dataclass is frozen: fill the computed defaults in place.
        if self.cited is None:
            object.__setattr__(self, "cited", tuple(n for n in numbers if n in have))
        if self.invalid_citations is None:
            object.__setattr__(
                self, "invalid_citations", tuple(n for n in numbers if n not in have)
            )


@dataclass(frozen=True)
class QuestionScore:
    """One `Outcome` scored against its `Question` (see the module docstring).

    The citation fields are 0/False for arms that do not retrieve, and for
    unanswerable questions `cited_gold`, `gold_in_sources` and `cites_gold`.
    """

    question_id: str
    arm: str
    answerable: bool
    failed: bool
    contained: bool
    f1: float
    refused: bool
    #: Answerable: contained and not refused. Unanswerable: refused.
    correct: bool
    #: RAG arms, answerable questions: the share of gold docs among the sources' doc ids.
    recall: float | None
    #: The answer cites at least one valid source number.
    cites_valid: bool
    #: Valid cited numbers whose source is a gold document.
    cited_gold: int
    #: Cited numbers, valid and invalid.
    cited_total: int
    #: Invalid cited numbers.
    invalid: int
    #: Some source is a gold document.
    gold_in_sources: bool
    #: Some valid cited number's source is a gold document.
    cites_gold: bool
    #: None for refusals, failures and answers without sources (see `grounding`).
    grounding: float | None
    #: The format check's verdict on the answer; None without a check, or when failed.
    format_ok: bool | None


def score(
    question: Question,
    outcome: Outcome,
    *,
    refusal_messages: Sequence[str] = (),
    format_check: Callable[[str], bool] | None = None,
) -> QuestionScore:
    """Scores `outcome` against `question`.

    Args:
        refusal_messages: the tenant's refusal text(s) (its `no_context_message`),
            recognised as refusals in any case and punctuation.
        format_check: the acceptance check of a format-trained adapter, given the
            answer as it came (citation marks included).

    Raises:
        ValueError: the outcome is for another question.
    """
    if outcome.question_id != question.id:
        raise ValueError(
            f"outcome of question {outcome.question_id!r} scored against {question.id!r}"
        )
    answerable = question.answerable
    gold = set(question.gold_docs)
    rag_answerable = outcome.rag and answerable
    if outcome.error:
        return QuestionScore(
            question_id=question.id,
            arm=outcome.arm,
            answerable=answerable,
            failed=True,
            contained=False,
            f1=0.0,
            refused=False,
            correct=False,
            recall=0.0 if rag_answerable else None,
            cites_valid=False,
            cited_gold=0,
            cited_total=0,
            invalid=0,
            gold_in_sources=False,
            cites_gold=False,
            grounding=None,
            format_ok=None,
        )

    text = _without_marks(outcome.answer)
    contained = contains_answer(text, question.answers)
    # A hedged answer that states the fact ("it does not say X, but the fare is £2") answers.
    refused = is_refusal(text, outcome.finish_reason, refusal_messages) and not contained
    by_number = {s.number: s for s in outcome.sources} if outcome.rag else {}
    valid = [n for n in outcome.cited or () if n in by_number]
    cited_gold = sum(by_number[n].doc_id in gold for n in valid)
    return QuestionScore(
        question_id=question.id,
        arm=outcome.arm,
        answerable=answerable,
        failed=False,
        contained=contained,
        f1=token_f1(text, question.answers),
        refused=refused,
        correct=(contained and not refused) if answerable else refused,
        recall=(
            len(gold & {s.doc_id for s in outcome.sources}) / len(gold)
            if rag_answerable
            else None
        ),
        cites_valid=bool(valid),
        cited_gold=cited_gold,
        cited_total=(
            len(outcome.cited or ()) + len(outcome.invalid_citations or ()) if outcome.rag else 0
        ),
        invalid=len(outcome.invalid_citations or ()) if outcome.rag else 0,
        gold_in_sources=any(s.doc_id in gold for s in by_number.values()),
        cites_gold=cited_gold > 0,
        grounding=(
            None
            if refused or not outcome.rag or not valid
            else grounding(outcome.answer, question.question, [by_number[n].text for n in valid])
        ),
        format_ok=None if format_check is None else bool(format_check(outcome.answer)),
    )


@dataclass(frozen=True)
class ArmSummary:
    """The scores of one arm over a question set.

    A rate is None when its denominator is empty, and the RAG-only ones (recall@k,
    citation rate/precision/recall) are None for arms that do not retrieve.
    """

    arm: str
    questions: int
    answerable: int
    unanswerable: int
    failed: int
    #: Mean over answerable questions of containment (0/1); None without any.
    containment: float | None
    #: Mean over answerable questions of token F1; None without any.
    token_f1: float | None
    #: RAG: mean recall over answerable questions.
    recall_at_k: float | None
    #: RAG: answerable questions whose answer cites >= 1 valid source / answerable.
    citation_rate: float | None
    #: RAG: cited numbers naming a gold source / all cited numbers (valid and invalid),
    #: over answerable questions; None when nothing was cited.
    citation_precision: float | None
    #: RAG: answers citing a gold source / answerable answers whose sources hold a
    #: gold document; None when no sources held one.
    citation_recall: float | None
    #: Invalid cited numbers, over all questions.
    invalid_citations: int
    #: Mean grounding over the answers that have one.
    grounding: float | None
    #: Refused unanswerable questions / unanswerable questions.
    refusal_correct: float | None
    #: Refused answerable questions / answerable questions.
    false_refusals: float | None
    #: Answers passing the format check / answers (failed questions left out);
    #: None without a check.
    format_match: float | None
    #: Latency percentiles and mean token counts over the questions that did not fail.
    latency_p50_s: float | None
    latency_p95_s: float | None
    prompt_tokens_mean: float | None
    completion_tokens_mean: float | None

    def to_dict(self) -> dict:
        """The summary as a JSON-ready dict, field by field."""
        return asdict(self)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def summarize(
    arm: str, scores: Sequence[QuestionScore], outcomes: Sequence[Outcome]
) -> ArmSummary:
    """Summarizes one arm: `scores` and the `outcomes` they were scored from (the
    same questions, matched by question id, in any order).

    Raises:
        ValueError: a score or outcome of another arm, scores and outcomes that are
            not of the same questions, or outcomes that disagree on `rag`.
    """
    others = {x.arm for x in (*scores, *outcomes)} - {arm}
    if others:
        raise ValueError(f"summary of arm {arm!r} given results of arm(s) {sorted(others)}")
    score_ids = [s.question_id for s in scores]
    if len(set(score_ids)) != len(score_ids) or sorted(score_ids) != sorted(
        o.question_id for o in outcomes
    ):
        raise ValueError("scores and outcomes must be of the same questions, each once")
    if len({o.rag for o in outcomes}) > 1:
        raise ValueError(f"the outcomes of arm {arm!r} disagree on whether it retrieves")

    rag = any(o.rag for o in outcomes)
    answerable = [s for s in scores if s.answerable]
    unanswerable = [s for s in scores if not s.answerable]
    done = [o for o in outcomes if not o.error]
    checked = [s.format_ok for s in scores if s.format_ok is not None]
    latencies = [o.latency_s for o in done]
    recall_at_k = citation_rate = citation_precision = citation_recall = None
    if rag:
        recall_at_k = _mean([s.recall for s in answerable if s.recall is not None])
        citation_rate = _share(sum(s.cites_valid for s in answerable), len(answerable))
        citation_precision = _share(
            sum(s.cited_gold for s in answerable), sum(s.cited_total for s in answerable)
        )
        with_gold = [s for s in answerable if s.gold_in_sources]
        citation_recall = _share(sum(s.cites_gold for s in with_gold), len(with_gold))
    return ArmSummary(
        arm=arm,
        questions=len(scores),
        answerable=len(answerable),
        unanswerable=len(unanswerable),
        failed=sum(s.failed for s in scores),
        containment=_mean([float(s.contained) for s in answerable]),
        token_f1=_mean([s.f1 for s in answerable]),
        recall_at_k=recall_at_k,
        citation_rate=citation_rate,
        citation_precision=citation_precision,
        citation_recall=citation_recall,
        invalid_citations=sum(s.invalid for s in scores),
        grounding=_mean([s.grounding for s in scores if s.grounding is not None]),
        refusal_correct=_share(sum(s.refused for s in unanswerable), len(unanswerable)),
        # Over the answers: a failed question is no refusal, and must not lower the rate.
        false_refusals=_share(sum(s.refused for s in answerable),
                              sum(not s.failed for s in answerable)),
        format_match=_share(sum(checked), len(checked)),
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        prompt_tokens_mean=_mean([o.prompt_tokens for o in done]),
        completion_tokens_mean=_mean([o.completion_tokens for o in done]),
    )
