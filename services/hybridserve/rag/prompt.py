"""Builds the answer prompt within the model's context, with the model's own chat
template and tokenizer, and tokenizes it once (the ids go to generation as they are).

    system:    <tenant system prompt>\\n\\n<rag instructions>
    ...history turns...
    user:      Passages:\\n[1] <title>\\n<text>\\n\\n[2] ...\\n\\nQuestion: <question>

Budget: prompt tokens <= max_model_len - max_tokens. The template, system prompt,
history and question are counted first (the overhead); passages are then added best
first while they fit. The first passage that does not fit is cut at a sentence
boundary (if even one sentence fits), and the ones ranked below it are dropped. The
final prompt is tokenized once more as a whole and trimmed again if the pieces'
counts were off at their joins, so it never exceeds the budget.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from hybridserve.errors import InvalidArgument

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
NO_PASSAGES = "Passages: none. Nothing in the documents matched this question."


class ChatTokenizer(Protocol):
    """The served model's tokenizer and chat template."""

    def render(self, messages: Sequence[tuple[str, str]]) -> str: ...

    def encode(self, text: str) -> list[int]: ...


class HFChatTokenizer:
    """A Hugging Face tokenizer folder (the same files the engine loads)."""

    def __init__(self, model_dir):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))

    def render(self, messages):
        try:
            return self._tok.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError and its kin
            # Some templates demand alternating user/assistant turns, or no system turn.
            raise InvalidArgument(
                f"the model's chat template does not accept this history ({e}); "
                "alternate user and assistant turns",
                field_violations=[("messages", str(e)[:200])],
            ) from None

    def encode(self, text):
        # The chat template already holds its special tokens.
        return list(self._tok.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class PromptPassage:
    number: int
    title: str
    text: str


@dataclass(frozen=True)
class BuiltPrompt:
    token_ids: list[int]
    #: The passages the prompt holds, numbered 1.., each as it appears (maybe cut).
    passages: list[PromptPassage]
    #: Tokens the passages could use, and used.
    passage_budget: int
    passage_tokens: int


def _block(p: PromptPassage) -> str:
    head = f"[{p.number}] {p.title}".rstrip()
    return f"{head}\n{p.text.strip()}"


class PromptBuilder:
    def __init__(self, tokenizer: ChatTokenizer, max_model_len: int, instructions: str):
        self.tok = tokenizer
        self.max_model_len = max_model_len
        self.instructions = instructions

    @classmethod
    def for_model(cls, model_dir, config) -> PromptBuilder:
        """The builder Ask uses: the model folder's tokenizer and chat template, the
        config's context window and RAG instructions (the gateway and `finetune --rag`
        both build theirs here, so their prompts are the same)."""
        return cls(HFChatTokenizer(model_dir), config.model.max_model_len, config.rag.instructions)

    def _messages(self, system_prompt: str, history: Sequence[tuple[str, str]], question: str,
                  passages: Sequence[PromptPassage], no_context: bool) -> list[tuple[str, str]]:
        system = "\n\n".join(p for p in (system_prompt.strip(), self.instructions.strip()) if p)
        if passages:
            context = "Passages:\n\n" + "\n\n".join(_block(p) for p in passages)
        else:
            context = NO_PASSAGES if no_context else "Passages: none."
        return [("system", system), *history, ("user", f"{context}\n\nQuestion: {question}")]

    def _count(self, messages) -> int:
        return len(self.tok.encode(self.tok.render(messages)))

    def build(self, *, question: str, passages: Sequence[tuple[str, str]], max_tokens: int,
              system_prompt: str = "", history: Sequence[tuple[str, str]] = (),
              no_context: bool = False) -> BuiltPrompt:
        """`passages`: (title, text), best first. Raises InvalidArgument (with the
        numbers) when max_tokens or the question leave no room."""
        limit = self.max_model_len - max_tokens
        if max_tokens >= self.max_model_len:
            raise InvalidArgument(
                f"max_tokens is {max_tokens} but the context window is {self.max_model_len} "
                "tokens (prompt + answer); lower max_tokens",
                field_violations=[("sampling.max_tokens", f"below {self.max_model_len}")],
            )
        overhead = self._count(self._messages(system_prompt, history, question, [], no_context))
        budget = limit - overhead
        if budget < 0:
            raise InvalidArgument(
                f"the question, history and instructions take {overhead} tokens, and with "
                f"max_tokens {max_tokens} they exceed the context window of "
                f"{self.max_model_len}; shorten them or lower max_tokens",
                field_violations=[("sampling.max_tokens", f"at most {self.max_model_len - overhead}")],
            )
        # A passage costs its block plus the join (the final check below corrects
        # what counting the pieces apart gets wrong).
        kept: list[PromptPassage] = []
        used = 0
        for number, (title, text) in enumerate(passages, 1):
            p = PromptPassage(number, title, text)
            cost = len(self.tok.encode(_block(p))) + 2
            if used + cost <= budget:
                kept.append(p)
                used += cost
                continue
            cut = self._cut(p, budget - used - 2)
            if cut is not None:
                kept.append(cut)
            break
        # The pieces were counted apart; the whole may differ at the joins.
        while True:
            messages = self._messages(system_prompt, history, question, kept, no_context)
            ids = self.tok.encode(self.tok.render(messages))
            if len(ids) <= limit or not kept:
                break
            last = kept[-1]
            shorter = self._cut(last, len(self.tok.encode(_block(last))) - (len(ids) - limit) - 1)
            kept = kept[:-1] + ([shorter] if shorter is not None and shorter != last else [])
        if len(ids) > limit:
            raise InvalidArgument(
                f"the prompt needs {len(ids)} tokens but only {limit} fit with max_tokens "
                f"{max_tokens}; shorten the question or lower max_tokens",
            )
        return BuiltPrompt(ids, kept, max(0, budget), max(0, len(ids) - overhead))

    def _cut(self, p: PromptPassage, room: int) -> PromptPassage | None:
        """The passage cut to its longest sentence prefix whose block fits `room` tokens;
        if not even its first sentence fits (a table, code, one long sentence), to its
        longest word prefix, marked with an ellipsis."""
        if room <= 0:
            return None
        best = self._longest(p, _SENTENCE_END.split(p.text.strip()), room, "")
        if best is None:
            best = self._longest(p, p.text.split(), room, " …")
        return best

    def _longest(self, p: PromptPassage, pieces: list[str], room: int, tail: str):
        lo, hi, best = 1, len(pieces), None
        while lo <= hi:  # the longest prefix that fits: token counts grow with it
            mid = (lo + hi) // 2
            cand = replace(p, text=" ".join(pieces[:mid]) + (tail if mid < len(pieces) else ""))
            if len(self.tok.encode(_block(cand))) <= room:
                best, lo = cand, mid + 1
            else:
                hi = mid - 1
        return best
