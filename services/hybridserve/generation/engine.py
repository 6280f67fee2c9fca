"""The engine protocol: what the generation service needs from a backend.

Backends (vLLM today) implement `Engine`. The convention for every async
generator method: it yields deltas (new tokens only), the last item has
`finished=True`, and closing the generator early (the client went away)
aborts the request inside the engine.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling parameters, in engine-neutral form."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Parsed JSON schema; output is constrained to it when set.
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as the engine sees it: a stable id, a slot number and a folder."""

    adapter_id: str
    #: Positive and unique per adapter for the lifetime of one engine.
    int_id: int
    path: str


@dataclass(frozen=True)
class Delta:
    """New output since the previous delta of the same request."""

    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    #: "stop", "length" or "abort" once finished.
    finish_reason: str | None = None
    prompt_tokens: int = 0
    #: Completion tokens so far (cumulative).
    completion_tokens: int = 0
    #: Prompt tokens the engine took from its prefix cache (0 until it reports them).
    cached_tokens: int = 0


@dataclass
class EngineStats:
    """Counters a test or an operator can read to see what the engine did."""

    unfinished_requests: int = 0
    #: Requests queued in the engine, not yet scheduled (0 when the backend cannot tell).
    waiting_requests: int = 0
    #: Requests in the engine's running batch.
    running_requests: int = 0
    aborted_request_ids: list[str] = field(default_factory=list)
    #: [request id, finish reason, generated tokens] of the latest requests the engine
    #: itself reported finished (an aborted request never appears here).
    engine_finished: list[list] = field(default_factory=list)
    #: The largest running batch the engine's scheduler reported (mixed batches).
    engine_running_max: int = 0
    resident_adapters: list[str] = field(default_factory=list)
    adapter_loads: int = 0
    adapter_unloads: int = 0


class Engine(abc.ABC):
    """A text generation backend that serves a base model plus LoRA adapters."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Loads the model. Called once before anything else."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raises if the engine cannot serve."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stops the engine and frees its resources."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Context window: prompt plus output tokens."""

    @property
    def vocab_size(self) -> int | None:
        """Token ids are below this (None: the backend cannot tell)."""
        return None

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids the engine would see for `text`."""

    @abc.abstractmethod
    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        """Applies the model's chat template (with the generation prompt)."""

    def check_json_schema(self, schema: dict[str, Any]) -> None:
        """Raises InvalidArgument if the engine cannot constrain its output to
        `schema` (a schema valid as JSON Schema can still be one the engine's grammar
        compiler refuses). Called before the request is queued. Default: accepts."""

    @abc.abstractmethod
    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Makes the adapter resident. Idempotent."""

    @abc.abstractmethod
    async def unload_adapter(self, adapter: AdapterRef) -> None:
        """Frees the adapter's slot. Idempotent."""

    @abc.abstractmethod
    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterRef | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Streams deltas; see the module docstring for the convention.

        `cache_salt`: requests share prefix-cache blocks only with requests of the
        same salt (None: the unsalted pool). The platform salts per tenant, so one
        tenant cannot time another's prompts through the cache."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current counters."""
