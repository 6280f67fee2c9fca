"""Evaluate an adapter against its base model on held-out examples.

Two numbers per side, on the same examples:

- held-out loss: the training loss (assistant tokens only, same masking),
  averaged over all held-out assistant tokens;
- a task metric from greedy generations of the last assistant turn: with a
  `format_regex`, the share of answers whose stripped text fully matches it
  (`format_match`); otherwise the share equal to the reference answer after
  stripping whitespace (`exact_match`).

The base side is the same loaded model with the adapter disabled, so both sides
share weights, prompts and generation settings.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hybridserve.finetune.config import TrainConfig
from hybridserve.finetune.data import IGNORE, TokenizedExample
from hybridserve.scoring import Outcome, Question, cited_numbers, score


@dataclass(frozen=True)
class Sample:
    """One held-out prompt's answers, for showing what changed."""

    line: int
    reference: str
    base: str
    adapter: str


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss and task metric of the base model and of the adapter."""

    #: "format_match" (with format_regex) or "exact_match".
    metric: str
    format_regex: str | None
    #: Held-out examples evaluated, and the assistant tokens their loss covers.
    examples: int
    label_tokens: int
    base_loss: float
    adapter_loss: float
    base_metric: float
    adapter_metric: float
    samples: tuple[Sample, ...] = field(default=(), repr=False)
    #: Accept on the task metric alone (retrieval-aware adapters: containment), not loss.
    require_metric: bool = False
    #: More metrics per side, shown in the table: name -> (base, adapter).
    extra: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Names in `extra` that must not be lower for the adapter than for the base model.
    guards: tuple[str, ...] = ()

    @property
    def beats_base(self) -> bool:
        """A higher task metric, or (unless require_metric) a lower held-out loss; and
        no guard metric lower than the base model's."""
        if any(self.extra[g][1] < self.extra[g][0] for g in self.guards):
            return False
        if self.require_metric:
            return self.adapter_metric > self.base_metric
        return self.adapter_loss < self.base_loss or self.adapter_metric > self.base_metric

    def to_dict(self) -> dict:
        """JSON-ready summary (without the samples)."""
        data = asdict(self)
        del data["samples"]
        return data

    def table(self) -> str:
        """A small plain-text table: base vs adapter."""
        rows = [
            ("", "base", "adapter"),
            ("held-out loss", f"{self.base_loss:.4f}", f"{self.adapter_loss:.4f}"),
            (
                self.metric.replace("_", " ") + " rate",
                f"{self.base_metric:.3f}",
                f"{self.adapter_metric:.3f}",
            ),
            *((name.replace("_", " "), f"{b:.3f}", f"{a:.3f}") for name, (b, a) in self.extra.items()),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
        lines.append(f"({self.examples} held-out examples, {self.label_tokens} assistant tokens)")
        return "\n".join(lines)


def evaluate(
    base_dir: Path,
    adapter_dir: Path,
    examples: list[TokenizedExample],
    train_cfg: TrainConfig,
    *,
    max_samples: int = 3,
) -> EvalResult:
    """Evaluates the adapter in `adapter_dir` against the model in `base_dir`.

    Uses at most `train_cfg.eval_max_examples` of `examples` (the held-out
    split, in order). Deterministic: no sampling, no dropout.
    """
    import torch
    from peft import PeftModel

    from hybridserve.finetune.trainer import load_base

    if not examples:
        raise ValueError("no held-out examples")
    examples = examples[: train_cfg.eval_max_examples]
    tokenizer, base = load_base(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    prompts = [ex.prompt_ids for ex in examples]
    with torch.inference_mode():
        with model.disable_adapter():
            base_loss, n_tokens = heldout_loss(model, tokenizer, examples, train_cfg.batch_size)
            base_answers = greedy_answers(model, tokenizer, prompts, train_cfg.eval_max_new_tokens)
        adapter_loss, _ = heldout_loss(model, tokenizer, examples, train_cfg.batch_size)
        adapter_answers = greedy_answers(model, tokenizer, prompts, train_cfg.eval_max_new_tokens)

    references = [ex.reference for ex in examples]
    return EvalResult(
        metric="format_match" if train_cfg.format_regex is not None else "exact_match",
        format_regex=train_cfg.format_regex,
        examples=len(examples),
        label_tokens=n_tokens,
        base_loss=base_loss,
        adapter_loss=adapter_loss,
        base_metric=match_rate(base_answers, references, train_cfg.format_regex),
        adapter_metric=match_rate(adapter_answers, references, train_cfg.format_regex),
        samples=tuple(
            Sample(ex.line, ex.reference, b, a)
            for ex, b, a in list(zip(examples, base_answers, adapter_answers))[:max_samples]
        ),
    )


def evaluate_rag(
    base_dir: Path,
    adapter_dir: Path,
    held_out: Sequence[tuple[Question, list[int]]],
    examples: list[TokenizedExample],
    train_cfg: TrainConfig,
    *,
    refusal: str,
    max_new_tokens: int,
    max_samples: int = 3,
) -> EvalResult:
    """Evaluates a retrieval-aware adapter in the arm it serves in: greedy answers to the
    held-out questions from the prompts Ask builds (`held_out`: each question with Ask's
    prompt token ids; an empty prompt means Ask refused it without the model).

    The metric is containment (`hybridserve.scoring.score`, as `hybridserve eval` scores
    it) over the answerable questions. The adapter is accepted when its containment is
    higher than the base model's and its correct refusals of unanswerable questions are
    not lower (an adapter that never refuses cannot pass on containment alone). Also
    reported per side: false refusals, and the share of answerable questions whose answer
    cites a passage. At most `train_cfg.eval_max_examples` questions are evaluated, drawn
    with the seed (not the first ones of the file). The held-out loss is on `examples`
    (the RAFT chats of the held-out questions).
    """
    import torch
    from peft import PeftModel

    from hybridserve.finetune.trainer import load_base

    if not held_out:
        raise ValueError("no held-out questions")
    held_out = list(held_out)
    if len(held_out) > train_cfg.eval_max_examples:
        held_out = random.Random(train_cfg.seed).sample(held_out, train_cfg.eval_max_examples)
    tokenizer, base = load_base(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    asked = [(q, ids) for q, ids in held_out if ids]
    with torch.inference_mode():
        with model.disable_adapter():
            base_loss, n_tokens = heldout_loss(model, tokenizer, examples, train_cfg.batch_size) \
                if examples else (float("nan"), 0)
            base_texts = greedy_answers(model, tokenizer, [ids for _, ids in asked], max_new_tokens)
        adapter_loss, _ = heldout_loss(model, tokenizer, examples, train_cfg.batch_size) \
            if examples else (float("nan"), 0)
        adapter_texts = greedy_answers(model, tokenizer, [ids for _, ids in asked], max_new_tokens)
    by_id = {q.id: (b, a) for (q, _), b, a in zip(asked, base_texts, adapter_texts, strict=True)}
    questions = [q for q, _ in held_out]
    sides = {}
    for side in (0, 1):
        answers = [by_id.get(q.id, (refusal, refusal))[side] for q in questions]
        sides[side] = rag_rates(questions, answers, refusal)
    return EvalResult(
        metric="containment",
        format_regex=None,
        examples=len(questions),
        label_tokens=n_tokens,
        base_loss=base_loss,
        adapter_loss=adapter_loss,
        base_metric=sides[0]["containment"],
        adapter_metric=sides[1]["containment"],
        samples=tuple(
            Sample(0, " | ".join(q.answers) or refusal, *by_id[q.id])
            for q in questions if q.id in by_id
        )[:max_samples],
        require_metric=True,
        extra={name: (sides[0][name], sides[1][name]) for name in sides[0] if name != "containment"},
        guards=("refusal_correct",),
    )


def rag_rates(questions: Sequence[Question], answers: Sequence[str], refusal: str) -> dict[str, float]:
    """containment (answerable), refusal_correct (unanswerable), false_refusals and
    citing (answerable), as `hybridserve eval` scores them: each a share, 0.0 when there
    is nothing to count."""

    def share(hits: int, n: int) -> float:
        return hits / n if n else 0.0

    scores = [score(q, Outcome(q.id, "rag", a, rag=True), refusal_messages=(refusal,))
              for q, a in zip(questions, answers, strict=True)]
    answerable = [(s, a) for s, a in zip(scores, answers, strict=True) if s.answerable]
    unanswerable = [s for s in scores if not s.answerable]
    return {
        "containment": share(sum(s.contained for s, _ in answerable), len(answerable)),
        "refusal_correct": share(sum(s.refused for s in unanswerable), len(unanswerable)),
        "false_refusals": share(sum(s.refused for s, _ in answerable), len(answerable)),
        "citing": share(sum(bool(cited_numbers(a)) for _, a in answerable), len(answerable)),
    }


def match_rate(
    answers: Sequence[str], references: Sequence[str], format_regex: str | None
) -> float:
    """Share of answers that fully match `format_regex`, or equal their reference (stripped)."""
    if not answers:
        return 0.0
    if format_regex is not None:
        pattern = re.compile(format_regex)
        hits = sum(pattern.fullmatch(a.strip()) is not None for a in answers)
    else:
        hits = sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True))
    return hits / len(answers)


def heldout_loss(
    model, tokenizer, examples: list[TokenizedExample], batch_size: int
) -> tuple[float, int]:
    """(mean loss per assistant token, number of assistant tokens), training's masking."""
    from hybridserve.finetune.trainer import answer_loss, collate, pad_token_id

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        input_ids, labels, mask = collate(
            examples[start : start + batch_size], pad_token_id(tokenizer)
        )
        total += float(answer_loss(base, input_ids, labels, mask, reduction="sum"))
        count += int((labels[:, 1:] != IGNORE).sum())
    return (total / count if count else float("nan")), count


def greedy_answers(
    model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy completions of tokenised prompts, one at a time (no padding), as text.

    Stops at the tokenizer's EOS, like the served chat path; special tokens are
    dropped from the text.
    """
    import torch

    from hybridserve.finetune.trainer import pad_token_id

    answers = []
    with torch.inference_mode():
        for ids in prompts:
            input_ids = torch.tensor([list(ids)])
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_token_id(tokenizer),
            )
            answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return answers
