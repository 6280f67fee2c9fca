"""Generation, transport-free: validate a request, resolve its adapter, stream deltas.

The gRPC servicer converts protobuf to these types and back; nothing here knows
about gRPC or Ray Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from hybridserve.adapters import AdapterRecord, AdapterRegistry
from hybridserve.config import HybridServeConfig
from hybridserve.errors import InvalidArgument
from hybridserve.generation.engine import AdapterRef, Delta, Engine, SamplingOptions

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_SCHEMA_CHARS = 64 * 1024
#: A JSON schema's deepest nesting and most values (objects, arrays, scalars): the
#: engine compiles a schema into a grammar, whose cost grows with both.
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 4096
#: The largest count a schema may ask for (minItems, maxLength, ...): a grammar for
#: a huge count is costly to build, and no answer within a context window needs it.
MAX_SCHEMA_COUNT = 65536
_COUNT_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties",
                   "maxProperties", "minContains", "maxContains")
#: The engine's own range of temperatures (vLLM's SamplingParams refuses others).
MAX_TEMPERATURE = 2.0

T = TypeVar("T")


@dataclass(frozen=True)
class GenerateInput:
    """A generation request as the caller sent it (unset numbers are None)."""

    prompt: str | None = None
    messages: Sequence[tuple[str, str]] | None = None
    #: Token ids of the served model's tokenizer, used as they are (the RAG
    #: gateway tokenizes once and sends these).
    prompt_token_ids: Sequence[int] | None = None
    adapter: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    json_schema: str = ""
    #: The caller's own id: echoed and logged, never given to the engine.
    client_request_id: str = ""


@dataclass(frozen=True)
class GenerationDone:
    """The end of a generation, as a replica reports it (after its last delta)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    replica_id: str
    adapter: str
    request_id: str
    client_request_id: str = ""
    #: Seconds from the replica receiving the request to its first token.
    first_token_s: float | None = None
    #: Prompt tokens the engine served from its (per-tenant) prefix cache.
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready for the engine."""

    #: The server's id (a UUID): the engine's request id.
    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    adapter: AdapterRecord | None
    client_request_id: str = ""


class GenerationService:
    """Validates requests and streams coalesced deltas from an engine.

    Args:
        config: platform config.
        engine: a started engine (see `Engine`).
        registry: the adapter registry shared with the control plane.
    """

    def __init__(self, config: HybridServeConfig, engine: Engine, registry: AdapterRegistry):
        self.config = config
        self.engine = engine
        self.registry = registry
        self._int_ids: dict[tuple[str, str], int] = {}
        # NOTE: one thread: a Hugging Face fast tokenizer is not safe to call from
        # several threads at once ("Already borrowed"), and one thread keeps the
        # event loop free, which is what matters.
        self._blocking = ThreadPoolExecutor(1, thread_name_prefix="hybridserve-prepare")

    async def run_blocking(self, fn: Callable[..., T], *args) -> T:
        """Runs `fn(*args)` off the event loop: tokenizing, chat templates, schema
        checks and registry reads, which would otherwise stall every stream this
        replica serves (AsyncLLM's output handler runs on the same loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._blocking, fn, *args)

    def close(self) -> None:
        self._blocking.shutdown(wait=False, cancel_futures=True)

    # -- validation ---------------------------------------------------------

    def prepare(self, inp: GenerateInput,
                on_tokens: Callable[[int], None] | None = None) -> PreparedRequest:
        """Checks every field and tokenizes; raises InvalidArgument / NotFound.

        Sizes are checked before anything is tokenized (`generation.max_prompt_chars`,
        `generation.max_messages`). `on_tokens(n)` is called with the prompt's token
        count as soon as it is tokenized, also when the prompt is then refused (too
        long for the context): the caller charges the tokenizing to the tenant.
        """
        client_id = inp.client_request_id
        if len(client_id) > MAX_REQUEST_ID_CHARS or not client_id.isprintable():
            raise InvalidArgument(
                f"client_request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters",
                field_violations=[("client_request_id", f"at most {MAX_REQUEST_ID_CHARS} printable characters")],
            )
        self.check_sizes(inp)
        # Cheap checks first: a bad sampling value or schema costs no tokenizing.
        validate_sampling(inp.temperature, inp.top_p, tuple(inp.stop), "", inp.seed)
        adapter = self.registry.get(inp.adapter) if inp.adapter else None
        token_ids = self._tokenize_input(inp, on_tokens)
        options = self._sampling(inp, len(token_ids))
        # NOTE: the engine's request id is always the server's own: a client-chosen
        # one could collide with (and abort) another client's request.
        return PreparedRequest(uuid.uuid4().hex, token_ids, options, adapter, client_id)

    def check_sizes(self, inp: GenerateInput) -> None:
        """Bounds checked before any tokenizing: the prompt's characters (a prompt, or
        all messages together), the number of messages and of prompt token ids."""
        cfg = self.config.generation
        max_chars = cfg.max_prompt_chars
        if inp.messages is not None:
            if len(inp.messages) > cfg.max_messages:
                raise InvalidArgument(
                    f"{len(inp.messages)} messages; at most {cfg.max_messages} are accepted "
                    "(generation.max_messages)",
                    field_violations=[("messages", f"at most {cfg.max_messages} messages")])
            chars = sum(len(c) + len(r) for r, c in inp.messages)
            what, field = "the messages hold", "messages"
        else:
            chars = len(inp.prompt or "")
            what, field = "the prompt has", "prompt"
        if chars > max_chars:
            raise InvalidArgument(
                f"{what} {chars} characters; at most {max_chars} are accepted "
                "(generation.max_prompt_chars), and the context window is "
                f"{self.engine.max_model_len} tokens; shorten the prompt",
                field_violations=[(field, f"at most {max_chars} characters")])
        if inp.prompt_token_ids is not None and len(inp.prompt_token_ids) >= self.engine.max_model_len:
            n, limit = len(inp.prompt_token_ids), self.engine.max_model_len
            raise InvalidArgument(
                f"the prompt has {n} tokens but the context window is {limit} tokens "
                "(prompt + output); shorten the prompt",
                field_violations=[("prompt_token_ids", f"fewer than {limit} ids")])

    def _tokenize_input(self, inp: GenerateInput,
                        on_tokens: Callable[[int], None] | None = None) -> list[int]:
        given = [x is not None for x in (inp.prompt, inp.messages, inp.prompt_token_ids)]
        if sum(given) > 1:
            raise InvalidArgument("send one of a prompt, chat messages or prompt token ids")
        limit = self.engine.max_model_len
        if inp.prompt_token_ids is not None:
            ids = list(inp.prompt_token_ids)
            if not ids:
                raise InvalidArgument("prompt_token_ids is empty")
            vocab = self.engine.vocab_size
            bad = [t for t in ids if not 0 <= t < (vocab or 2**31)]
            if bad:
                raise InvalidArgument(
                    f"prompt_token_ids holds {len(bad)} ids outside the vocabulary "
                    f"(0..{(vocab or 2**31) - 1}), e.g. {bad[0]}",
                    field_violations=[("prompt_token_ids", "ids of the served model's tokenizer")],
                )
            if len(ids) >= limit:
                raise InvalidArgument(
                    f"the prompt has {len(ids)} tokens but the context window is {limit} tokens "
                    "(prompt + output); shorten the prompt"
                )
            return ids
        if inp.messages is not None:
            if not inp.messages:
                raise InvalidArgument("messages is empty; send at least one user message")
            for i, (role, content) in enumerate(inp.messages):
                if role not in ROLES:
                    raise InvalidArgument(
                        f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}"
                    )
                if not content.strip():
                    raise InvalidArgument(f"messages[{i}].content is empty; give it some text")
            text = self.engine.render_chat(list(inp.messages))
            # The chat template already holds the special tokens it needs.
            ids = self.engine.tokenize(text, add_special_tokens=False)
        else:
            if not (inp.prompt or "").strip():
                raise InvalidArgument("the prompt is empty; send a prompt or chat messages")
            ids = self.engine.tokenize(inp.prompt)
        if on_tokens is not None:
            on_tokens(len(ids))
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise InvalidArgument(
                f"the prompt has {len(ids)} tokens but the context window is {limit} tokens "
                "(prompt + output); shorten the prompt"
            )
        return ids

    def _sampling(self, inp: GenerateInput, n_prompt: int) -> SamplingOptions:
        defaults = self.config.generation
        room = self.engine.max_model_len - n_prompt
        if inp.max_tokens is None:
            max_tokens = min(defaults.max_tokens, room)
        elif inp.max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be >= 1, got {inp.max_tokens}")
        elif inp.max_tokens > room:
            raise InvalidArgument(
                f"max_tokens is {inp.max_tokens} but the prompt has {n_prompt} tokens and the "
                f"context window is {self.engine.max_model_len}, so at most {room} can be "
                "generated; lower max_tokens or shorten the prompt"
            )
        else:
            max_tokens = inp.max_tokens

        temperature = defaults.temperature if inp.temperature is None else inp.temperature
        top_p = defaults.top_p if inp.top_p is None else inp.top_p
        stop = tuple(inp.stop)
        schema = validate_sampling(temperature, top_p, stop, inp.json_schema, inp.seed)
        if schema is not None:
            self.engine.check_json_schema(schema)
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            # -1 is "no seed" (vLLM's convention), the same as none.
            seed=None if inp.seed == -1 else inp.seed,
            json_schema=schema,
        )

    # -- adapters -----------------------------------------------------------

    def adapter_ref(self, record: AdapterRecord) -> AdapterRef:
        """The engine's view of an adapter. Integer ids are never reused, and are
        keyed by the content too, so a slot can never serve stale weights under a
        recycled number (the registry never reuses an id for other bytes either)."""
        key = (record.id, record.content_sha256)
        int_id = self._int_ids.get(key)
        if int_id is None:
            int_id = self._int_ids[key] = len(self._int_ids) + 1
        return AdapterRef(record.id, int_id, record.snapshot_dir)

    # -- streaming ----------------------------------------------------------

    async def stream(self, request: PreparedRequest,
                     cache_salt: str | None = None) -> AsyncIterator[Delta]:
        """Engine deltas, merged so that at most one goes out per stream interval.

        The first delta goes out at once (time to first token is not delayed);
        the final one always goes out and carries usage and finish reason.
        `cache_salt` keeps the request's prefix-cache blocks apart (see
        `prefix_cache_salt`).
        """
        window = self.config.serve.stream_interval_ms / 1000.0
        adapter = self.adapter_ref(request.adapter) if request.adapter else None
        texts: list[str] = []
        ids: list[int] = []
        last_sent = -math.inf
        cached = 0
        deltas = self.engine.generate(
            request.request_id, request.prompt_token_ids, request.options, adapter,
            cache_salt=cache_salt,
        )
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                texts.append(delta.text)
                ids.extend(delta.token_ids)
                cached = max(cached, delta.cached_tokens)
                now = time.monotonic()
                if delta.finished or now - last_sent >= window:
                    yield Delta(
                        text="".join(texts),
                        token_ids=tuple(ids),
                        finished=delta.finished,
                        finish_reason=delta.finish_reason,
                        prompt_tokens=delta.prompt_tokens,
                        completion_tokens=delta.completion_tokens,
                        cached_tokens=cached,
                    )
                    texts.clear()
                    ids.clear()
                    last_sent = now


def prefix_cache_salt(tenant: str | None, config: HybridServeConfig) -> str | None:
    """The engine's prefix-cache salt for a request of `tenant` (None: an admin key).

    Tenants share cached prompt blocks only with themselves, or with the tenants of
    their `tenancy.prefix_cache_groups` group: another tenant's identical prompt is
    computed afresh, so its time to first token tells nothing about what others
    asked. `engine.prefix_cache_isolation: shared` turns the salt off (one cache
    for all, for a single-tenant deployment).
    """
    if config.engine.prefix_cache_isolation == "shared":
        return None
    if not tenant:
        return "admin"
    for group, members in config.tenancy.prefix_cache_groups.items():
        if tenant in members:
            return f"group:{group}"
    return f"tenant:{tenant}"


def estimated_prompt_tokens(inp: GenerateInput) -> int:
    """A token per 4 characters of the prompt (or its ids), before it is tokenized:
    what a request is charged until its prompt's real size is known."""
    if inp.prompt_token_ids is not None:
        return len(inp.prompt_token_ids)
    if inp.messages is not None:
        return sum(-(-len(c) // 4) for _, c in inp.messages)
    return -(-len(inp.prompt or "") // 4)


def validate_sampling(temperature: float | None, top_p: float | None, stop: Sequence[str],
                      json_schema: str, seed: int | None = None) -> dict | None:
    """Checks sampling values (None: the server's default) as strictly as the engine
    does (vLLM's SamplingParams), so a bad value is INVALID_ARGUMENT here and never
    an engine error; returns the parsed schema."""
    if temperature is not None and (not math.isfinite(temperature)
                                    or not 0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidArgument(
            f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy), got {temperature}",
            field_violations=[("sampling.temperature", f"in [0, {MAX_TEMPERATURE:g}]")])
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise InvalidArgument(f"seed must be a 64-bit integer, got {seed}",
                              field_violations=[("sampling.seed", "a 64-bit integer")])
    if top_p is not None and (not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}",
                              field_violations=[("sampling.top_p", "in (0, 1]")])
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}",
                              field_violations=[("sampling.stop", f"at most {MAX_STOP_STRINGS}")])
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"each stop string must have 1 to {MAX_STOP_CHARS} characters",
                                  field_violations=[("sampling.stop", f"1-{MAX_STOP_CHARS} characters")])
    return parse_json_schema(json_schema) if json_schema else None


def parse_json_schema(text: str) -> dict:
    """Parses and checks a JSON schema; InvalidArgument says what is wrong."""
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidArgument(f"json_schema is longer than {MAX_SCHEMA_CHARS} characters")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(
            f"json_schema is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise InvalidArgument(f"json_schema nests more than {MAX_SCHEMA_DEPTH} levels") from None
    if not isinstance(schema, dict):
        raise InvalidArgument('json_schema must be a JSON object, e.g. {"type": "object"}')
    import jsonschema

    _check_schema_size(schema)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidArgument(f"json_schema is not a valid JSON Schema: {e.message}") from None
    except RecursionError:
        raise InvalidArgument("json_schema nests too deeply") from None
    return schema


def _check_schema_size(schema: dict) -> None:
    """Bounds a parsed schema's nesting and size (iteratively: no recursion to exhaust)."""
    todo: list[tuple[object, int]] = [(schema, 1)]
    nodes = 0
    while todo:
        value, depth = todo.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH or nodes > MAX_SCHEMA_NODES:
            raise InvalidArgument(
                f"json_schema is too complex: at most {MAX_SCHEMA_DEPTH} levels of nesting and "
                f"{MAX_SCHEMA_NODES} values are accepted",
                field_violations=[("json_schema", f"depth <= {MAX_SCHEMA_DEPTH}, "
                                   f"values <= {MAX_SCHEMA_NODES}")])
        if isinstance(value, dict):
            for word in _COUNT_KEYWORDS:
                n = value.get(word)
                if isinstance(n, (int, float)) and not isinstance(n, bool) and n > MAX_SCHEMA_COUNT:
                    raise InvalidArgument(
                        f"json_schema sets {word} to {n}; at most {MAX_SCHEMA_COUNT} is accepted "
                        "(an answer cannot be that long anyway)",
                        field_violations=[(f"json_schema.{word}", f"at most {MAX_SCHEMA_COUNT}")])
            todo.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            todo.extend((v, depth + 1) for v in value)
