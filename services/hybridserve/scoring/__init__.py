"""Scoring of `hybridserve eval`: question files, per-answer metrics, summaries per
arm, and the paired test between arms.

Pure and stdlib-only: it imports nothing else of hybridserve, so the client-only
install has it. `metrics` defines every metric, `stats` the paired test,
`questions` the question file.
"""

from hybridserve.scoring.metrics import (
    CITATION_MARK,
    REFUSAL_PHRASES,
    ArmSummary,
    Outcome,
    QuestionScore,
    SourceRef,
    cited_numbers,
    contains_answer,
    grounding,
    is_refusal,
    normalize_answer,
    score,
    summarize,
    token_f1,
)
from hybridserve.scoring.questions import (
    Question,
    QuestionFileError,
    QuestionSet,
    load_questions,
)
from hybridserve.scoring.stats import Paired, paired, percentile

__all__ = [
    "CITATION_MARK",
    "REFUSAL_PHRASES",
    "ArmSummary",
    "Outcome",
    "Paired",
    "Question",
    "QuestionFileError",
    "QuestionScore",
    "QuestionSet",
    "SourceRef",
    "cited_numbers",
    "contains_answer",
    "grounding",
    "is_refusal",
    "load_questions",
    "normalize_answer",
    "paired",
    "percentile",
    "score",
    "summarize",
    "token_f1",
]
