"""Observability: every platform metric declared once, plus the helpers that record them.

Services import the helpers from here::

    from hybridserve import observability as obs

    with obs.stage_timer("retrieve", service="rag") as timing:
        hits = await retrieval.search(...)
    obs.record_request("rag", "Ask", "OK")

See `metrics` for the exported names, the label sets and how cardinality stays bounded.
Alert rules and dashboards that use these metrics live in `deploy/`.
"""

from hybridserve.observability.metrics import (
    METRICS,
    MetricSpec,
    StageTiming,
    adapter_evicted,
    adapter_loaded,
    ingest_chunks,
    is_enabled,
    observe_stage,
    quota_rejected,
    record_request,
    record_tokens,
    release_replica,
    replica_id,
    set_enabled,
    set_engine_load,
    set_resident,
    set_weaviate_up,
    stage_timer,
    weaviate_call,
    weaviate_timer,
)

__all__ = [
    "METRICS",
    "MetricSpec",
    "StageTiming",
    "adapter_evicted",
    "adapter_loaded",
    "ingest_chunks",
    "is_enabled",
    "observe_stage",
    "quota_rejected",
    "record_request",
    "record_tokens",
    "release_replica",
    "replica_id",
    "set_enabled",
    "set_engine_load",
    "set_resident",
    "set_weaviate_up",
    "stage_timer",
    "weaviate_call",
    "weaviate_timer",
]
