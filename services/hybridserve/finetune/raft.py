"""Retrieval-aware training data (RAFT): a tenant's questions, its own retrieval, and the
prompts Ask builds -> chats that teach an adapter to answer from the passages and cite them.

For each training question (`hybridserve.scoring.Question`):

- answerable, in a share `p_gold` of them (exactly round(p_gold * n), drawn with the seed):
  the passages are the gold passage (the chunk of a gold document that holds a reference
  phrase) inserted at a random position among the hard negatives that retrieval and rerank
  return when the gold documents are filtered out; the target is the gold passage's sentence
  that states the fact, citing its number: `... £2.40 [3].`
- answerable, in the other 1 - p_gold: the hard negatives alone; the target is the refusal.
- unanswerable (no gold documents): the passages Ask retrieves; the target is the refusal.

The passages come from the platform (`PromptSource`: an Ask with `prompt_only`), and the
prompt is built by Ask's own `PromptBuilder` with the tenant's system prompt and the same
token budget: only the order of the passages differs. Every question's distractor prompt is
also rebuilt in Ask's order and compared with the token ids Ask returned, so a local config
that differs from the served one fails loudly instead of training on other prompts.

The split is by gold document (`split_by_document`): no held-out question's gold document is
a gold document or a distractor in training, so the held-out score measures the skill, not
memorised facts.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hybridserve.errors import FailedPrecondition
from hybridserve.finetune.data import IGNORE, TokenizedExample
from hybridserve.scoring import Question, contains_answer

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
#: Sentences longer than this many words are cut to the clause holding the fact.
_LONG_SENTENCE_WORDS = 40


@dataclass(frozen=True)
class PromptPassage:
    """A passage as Ask's prompt held it."""

    number: int
    doc_id: str
    chunk_id: str
    title: str
    text: str


@dataclass(frozen=True)
class AskPrompt:
    """What an Ask with `prompt_only` returned: its passages, in order, its token ids, and
    the tokens its passages could use (-1: not reported)."""

    passages: tuple[PromptPassage, ...]
    token_ids: tuple[int, ...]
    passage_budget: int = -1


class PromptSource(Protocol):
    """The tenant's served retrieval: an Ask with `prompt_only` (see the CLI's client)."""

    def prompt(self, question: str, *, only_docs: Sequence[str] = (),
               exclude_docs: Sequence[str] = ()) -> AskPrompt: ...


class PromptBuilderLike(Protocol):
    def build(self, *, question: str, passages: Sequence[tuple[str, str]], max_tokens: int,
              system_prompt: str = "", history=(), no_context: bool = False): ...


@dataclass(frozen=True)
class RaftExample:
    """One training chat: the prompt Ask would build, and the answer to learn."""

    question_id: str
    #: "gold" (the gold passage is among the passages), "no_gold" (removed), "unanswerable".
    kind: str
    passages: tuple[PromptPassage, ...] = field(repr=False)
    #: The gold passage's number in the prompt (0: none).
    gold_number: int
    target: str
    prompt_ids: tuple[int, ...] = field(repr=False)


@dataclass
class BuildReport:
    """What building skipped, and why (shown to the user, never silent)."""

    questions: int = 0
    examples: int = 0
    gold: int = 0
    no_gold: int = 0
    unanswerable: int = 0
    #: question id -> why it gave no example
    skipped: dict[str, str] = field(default_factory=dict)


def split_by_document(questions: Sequence[Question], held_out_fraction: float, seed: int = 0
                      ) -> tuple[list[Question], list[Question], list[str]]:
    """(train, held_out, held-out documents): no gold document is on both sides.

    Documents that one question names together stay together (a group). A group is held
    out when a hash of (seed, its first document id), read as a number in [0, 1), is below
    `held_out_fraction`; at least one group is held out and at least one kept. A question
    goes with its documents' group; unanswerable questions are split by a hash of their id
    the same way. Order is kept.
    """
    if not 0 < held_out_fraction < 1:
        raise ValueError("held_out_fraction must be between 0 and 1")
    parent: dict[str, str] = {}

    def root(d: str) -> str:
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    for q in questions:
        for d in q.gold_docs:
            parent.setdefault(d, d)
        for d in q.gold_docs[1:]:
            a, b = sorted((root(q.gold_docs[0]), root(d)))
            parent[b] = a
    groups: dict[str, list[str]] = {}
    for d in sorted(parent):
        groups.setdefault(root(d), []).append(d)
    if len(groups) < 2:
        raise FailedPrecondition(
            f"the questions name {len(parent)} gold document(s) in {len(groups)} group(s) of "
            "documents asked about together; a split by document needs at least 2 (one to "
            "train on, one held out)")

    def unit(key: str) -> float:
        return int(hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()[:16], 16) / 2**64

    held_groups = {g for g in groups if unit(g) < held_out_fraction}
    if not held_groups:
        held_groups = {min(groups, key=unit)}
    if len(held_groups) == len(groups):
        held_groups.discard(max(groups, key=unit))
    held_docs = sorted(d for g in held_groups for d in groups[g])
    train, held = [], []
    for q in questions:
        out = (root(q.gold_docs[0]) in held_groups if q.answerable
               else unit(q.id) < held_out_fraction)
        (held if out else train).append(q)
    return train, held, held_docs


def fact_sentence(passage: str, references: Sequence[str]) -> str | None:
    """The sentence of `passage` that holds a reference phrase (normalised containment),
    cut to its clause when it is long; None when no sentence holds one."""
    for sentence in (s.strip() for s in _SENTENCE.split(passage)):
        if not sentence or not contains_answer(sentence, references):
            continue
        if len(sentence.split()) > _LONG_SENTENCE_WORDS:
            for clause in (c.strip() for c in re.split(r";\s+", sentence)):
                if contains_answer(clause, references):
                    return clause.lstrip("-*# ").strip()
        return sentence.lstrip("-*# ").strip()
    return None


def cite(sentence: str, number: int) -> str:
    """`sentence` with `[number]` before its final punctuation: `It costs £2 [3].`"""
    sentence = sentence.rstrip()
    if sentence and sentence[-1] in ".!?":
        return f"{sentence[:-1]} [{number}]{sentence[-1]}"
    return f"{sentence} [{number}]."


def _gold_passage(q: Question, candidates: Sequence[PromptPassage]) -> tuple[PromptPassage, str] | None:
    """The gold chunk holding the fact, and the target sentence (None: no chunk holds it)."""
    for p in candidates:
        if p.doc_id in q.gold_docs:
            sentence = fact_sentence(p.text, q.answers)
            if sentence is not None:
                return p, sentence
    return None


def build_examples(
    questions: Sequence[Question],
    source: PromptSource,
    builder: PromptBuilderLike,
    *,
    system_prompt: str,
    refusal: str,
    max_tokens: int,
    p_gold: float = 0.8,
    seed: int = 0,
    exclude_docs: Sequence[str] = (),
    progress: Callable[[int, int], object] | None = None,
) -> tuple[list[RaftExample], BuildReport]:
    """RAFT examples for `questions` (see the module docstring), deterministic for a seed.

    `exclude_docs` (the held-out documents) never appear as passages. Raises
    FailedPrecondition when a prompt built here differs from the one Ask built.
    """
    if not 0 <= p_gold <= 1:
        raise ValueError("p_gold must be between 0 and 1")
    ordered = sorted(questions, key=lambda q: q.id)
    rng = random.Random(seed)
    answerable = [q.id for q in ordered if q.answerable]
    with_gold = set(rng.sample(answerable, round(p_gold * len(answerable))))
    report = BuildReport(questions=len(ordered))
    examples: list[RaftExample] = []
    for i, q in enumerate(ordered, 1):
        position = rng.random()  # drawn for every question: one question never shifts another
        hidden = tuple(dict.fromkeys([*q.gold_docs, *exclude_docs]))
        negatives = source.prompt(q.question, exclude_docs=hidden)
        check_same_prompt(q, negatives, builder, system_prompt, max_tokens)
        # A source may send only some exclusions as filters (the filter limit): the
        # rest are dropped here, and the prompt is rebuilt without them below. So is a
        # passage of another document that states the answer too: with it, the refusal
        # would be the wrong target, and the gold citation ambiguous.
        distractors = [p for p in negatives.passages
                       if p.doc_id not in hidden and not contains_answer(p.text, q.answers)]
        kind = "unanswerable"
        gold_number = 0
        target = refusal
        passages = distractors
        if q.answerable:
            kind = "no_gold"
            if q.id in with_gold:
                golden = source.prompt(q.question, only_docs=q.gold_docs)
                check_same_prompt(q, golden, builder, system_prompt, max_tokens)
                found = _gold_passage(q, golden.passages)
                if found is None:
                    report.skipped[q.id] = ("no chunk of its gold documents holds a reference "
                                            "phrase (check `answers` against the documents)")
                    _tick(progress, i, len(ordered))
                    continue
                gold, sentence = found
                keep = distractors[: max(len(distractors) - 1, 0)] if distractors else []
                at = int(position * (len(keep) + 1))
                passages = [*keep[:at], gold, *keep[at:]]
                kind, gold_number = "gold", at + 1
                target = cite(sentence, gold_number)
        if not passages:
            report.skipped[q.id] = "retrieval found no passage for it (Ask refuses it without the model)"
            _tick(progress, i, len(ordered))
            continue
        built = builder.build(question=q.question, passages=[(p.title, p.text) for p in passages],
                              max_tokens=max_tokens, system_prompt=system_prompt)
        if kind == "gold" and (len(built.passages) < gold_number
                               or sentence not in built.passages[gold_number - 1].text):
            report.skipped[q.id] = "the gold passage's fact did not fit the prompt's token budget"
            _tick(progress, i, len(ordered))
            continue
        renumbered = tuple(PromptPassage(n, p.doc_id, p.chunk_id, p.title, bp.text)
                           for n, (p, bp) in enumerate(zip(passages, built.passages), 1))
        examples.append(RaftExample(q.id, kind, renumbered, gold_number, target,
                                    tuple(built.token_ids)))
        setattr(report, kind, getattr(report, kind) + 1)
        _tick(progress, i, len(ordered))
    report.examples = len(examples)
    return examples, report


def _tick(progress, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def check_same_prompt(q: Question, asked: AskPrompt, builder: PromptBuilderLike,
                      system_prompt: str, max_tokens: int) -> None:
    """Raises FailedPrecondition unless `builder` builds, for the passages `asked` holds
    in its order, Ask's very token ids with the same passage budget (a larger local
    context window would rebuild the same ids from passages Ask had cut, but would not
    cut a reordered prompt the way Ask does). An Ask without passages (NO_CONTEXT) has
    no prompt to compare."""
    if not asked.passages:
        return
    rebuilt = builder.build(question=q.question,
                            passages=[(p.title, p.text) for p in asked.passages],
                            max_tokens=max_tokens, system_prompt=system_prompt)
    if asked.passage_budget >= 0 and rebuilt.passage_budget != asked.passage_budget:
        raise FailedPrecondition(
            f"question {q.id!r}: the passages may use {rebuilt.passage_budget} tokens here but "
            f"{asked.passage_budget} on the platform: the local model.max_model_len, model or "
            "rag.instructions differ from the served ones; run finetune with the served config "
            "(--config) and the same --answer-tokens as the Asks it trains for")
    if tuple(rebuilt.token_ids) != tuple(asked.token_ids):
        raise FailedPrecondition(
            f"question {q.id!r}: the prompt built here ({len(rebuilt.token_ids)} tokens) differs "
            f"from the one the platform's Ask built ({len(asked.token_ids)} tokens) for the same "
            "passages; run finetune with the served config (--config: the same model, "
            "model.max_model_len and rag.instructions) so that it trains on the prompts Ask sends")


def tokenize(example: RaftExample, tokenizer) -> TokenizedExample:
    """The example as training takes it: the prompt, then the target and the end-of-turn
    token, with the loss on the target and end-of-turn tokens only (as chats are trained)."""
    answer = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    answer.append(tokenizer.eos_token_id)
    prompt = list(example.prompt_ids)
    return TokenizedExample(
        line=0,
        input_ids=prompt + answer,
        labels=[IGNORE] * len(prompt) + answer,
        prompt_ids=prompt,
        reference=example.target,
    )

