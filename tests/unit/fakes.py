"""Fakes that implement the real protocols (see STYLE.md habit 8)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from hybridserve.generation.engine import AdapterRef, Delta, Engine, EngineStats, SamplingOptions


class FakeEngine(Engine):
    """Whitespace tokenizer; emits `tok<i>` tokens, one per step, `step_s` apart."""

    def __init__(self, max_model_len: int = 64, step_s: float = 0.0):
        self._max_len = max_model_len
        self.step_s = step_s
        self.started = False
        self.loaded: dict[str, AdapterRef] = {}
        self.aborted: list[str] = []
        self.calls: list[tuple[str, list[int], SamplingOptions, AdapterRef | None]] = []

    async def start(self) -> None:
        self.started = True

    async def check_health(self) -> None:
        if not self.started:
            raise RuntimeError("not started")

    async def shutdown(self) -> None:
        self.started = False

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        return " ".join(f"<{r}> {c}" for r, c in messages) + " <assistant>"

    async def load_adapter(self, adapter: AdapterRef) -> None:
        self.loaded[adapter.adapter_id] = adapter

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        self.loaded.pop(adapter.adapter_id, None)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[Delta]:
        self.calls.append((request_id, prompt_token_ids, options, adapter))
        try:
            for i in range(options.max_tokens):
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                last = i == options.max_tokens - 1
                yield Delta(
                    text=f"tok{i} ", token_ids=(i,), finished=last,
                    finish_reason="length" if last else None,
                    prompt_tokens=len(prompt_token_ids), completion_tokens=i + 1,
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise

    def stats(self) -> EngineStats:
        return EngineStats(aborted_request_ids=list(self.aborted), resident_adapters=sorted(self.loaded))
