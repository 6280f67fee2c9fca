"""Generates the Grafana dashboards in dashboards/ (the JSON files are a build product).

    python deploy/grafana/generate.py           # rewrite dashboards/*.json
    python deploy/grafana/generate.py --check   # exit 1 if a committed file is stale

Plain Python, no grafanalib: a dashboard is a list of panels, each a title, a unit and
PromQL targets. Metric names come from services/hybridserve/observability/metrics.py
(exported form, `ray_` + declared name) and, for Ray Serve's and vLLM's built-in
metrics, from the names as Ray's metrics agent exports them:

- Ray Serve (`ray/serve/_private/*.py`, `ray/serve/{batching,multiplex}.py`): `serve_*`
  becomes `ray_serve_*`; counters get `_total`.
- vLLM, when its engine logs through `vllm.v1.metrics.ray_wrappers.RayPrometheusStatLogger`
  (names from `vllm/v1/metrics/loggers.py`): `vllm:x` becomes `ray_vllm_x` (Ray does
  not allow `:`), counters get `_total`, and every series has a `ReplicaId` label.

The `replica` label of hybridserve's and Serve's metrics and vLLM's `ReplicaId` all hold
Serve's replica unique id, so one `$replica` variable filters all three.

Every panel queries the data source chosen in the `$datasource` variable, so the files
import into any Grafana with a Prometheus data source.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"
# The generator needs only the metric declarations (no Ray): make them importable
# from a plain checkout too.
sys.path.insert(0, str(HERE.parents[1] / "services"))

from hybridserve.observability import metrics as m  # noqa: E402

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
TAG = "hybridserve"
#: gRPC codes that count as server-side failures (the same as the error-ratio alert).
SERVER_ERRORS = 'code=~"UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"'
NOT_OK = 'code!="OK"'
FAILED = 'outcome="error"'

# Exported names of hybridserve's own metrics.
REQUESTS = m.REQUESTS.exported_name
STAGE = m.STAGE_DURATION.exported_name
GENERATIONS = m.GENERATIONS.exported_name
PROMPT_TOKENS = m.PROMPT_TOKENS.exported_name
COMPLETION_TOKENS = m.COMPLETION_TOKENS.exported_name
ADAPTER_LOADS = m.ADAPTER_LOADS.exported_name
ADAPTER_LOAD_DURATION = m.ADAPTER_LOAD_DURATION.exported_name
ADAPTER_EVICTIONS = m.ADAPTER_EVICTIONS.exported_name
ADAPTER_RESIDENT = m.ADAPTER_RESIDENT.exported_name
ENGINE_WAITING = m.ENGINE_WAITING.exported_name
ENGINE_RUNNING = m.ENGINE_RUNNING.exported_name
ENGINE_CAPACITY = m.ENGINE_CAPACITY.exported_name
QUOTA_REJECTIONS = m.QUOTA_REJECTIONS.exported_name
INGEST_CHUNKS = m.INGEST_CHUNKS.exported_name
WEAVIATE_REQUESTS = m.WEAVIATE_REQUESTS.exported_name
WEAVIATE_DURATION = m.WEAVIATE_DURATION.exported_name
WEAVIATE_UP = m.WEAVIATE_UP.exported_name
STAGE_BUCKET = f"{STAGE}_bucket"
ADAPTER_LOAD_BUCKET = f"{ADAPTER_LOAD_DURATION}_bucket"
WEAVIATE_BUCKET = f"{WEAVIATE_DURATION}_bucket"


# --- Building blocks.


def sel(metric: str, *matchers: str) -> str:
    """A series selector: `sel("m", 'a="1"')` is `m{a="1"}`."""
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def rate(selector: str) -> str:
    return f"rate({selector}{RATE})"


def quantile(q: float, bucket_selector: str, by: str = "") -> str:
    """`histogram_quantile` over a `_bucket` selector, keeping the `by` labels."""
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keep}) ({rate(bucket_selector)}))"


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    """One panel; `width` is in Grafana's 24-column grid."""

    title: str
    targets: list[Target]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    width: int = 12
    height: int = 8


@dataclass
class Row:
    title: str


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[dict] = field(default_factory=list)
    panels: list[Panel | Row] = field(default_factory=list)


def ts(
    title: str,
    *targets: tuple[str, str],
    unit: str = "short",
    description: str = "",
    width: int = 12,
) -> Panel:
    """A time series panel; each target is (PromQL, legend)."""
    return Panel(title, [Target(e, leg) for e, leg in targets], unit, description, width=width)


def stat(title: str, expr: str, *, unit: str = "short", description: str = "") -> Panel:
    return Panel(title, [Target(expr)], unit, description, kind="stat", width=6, height=4)


def datasource_variable() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
    }


def label_variable(name: str, label: str, query: str) -> dict:
    """A multi-value variable from `label_values(...)`, "All" matching everything."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "refresh": 2,
        "sort": 1,
    }


# --- Rendering.


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    out = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {"datasource": DS, "expr": t.expr, "legendFormat": t.legend, "refId": chr(65 + i)}
            for i, t in enumerate(panel.targets)
        ],
    }
    if panel.kind == "stat":
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    else:
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return out


def render(dash: Dashboard) -> dict:
    """The dashboard as Grafana JSON, panels laid out left to right, top to bottom."""
    panels: list[dict] = []
    x = y = 0
    row_height = 0
    for panel_id, panel in enumerate(dash.panels, start=1):
        if isinstance(panel, Row):
            y += row_height
            x, row_height = 0, 0
            panels.append(
                {
                    "id": panel_id,
                    "type": "row",
                    "title": panel.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
            continue
        if x + panel.width > 24:
            y += row_height
            x, row_height = 0, 0
        panels.append(_panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": [TAG],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "browser",
        "links": [
            {
                "type": "dashboards",
                "title": "hybridserve",
                "tags": [TAG],
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": [datasource_variable(), *dash.variables]},
        "panels": panels,
    }


# --- The four dashboards.


def overview() -> Dashboard:
    svc = 'service=~"$service"'
    return Dashboard(
        uid="hybridserve-overview",
        title="hybridserve / Platform overview",
        description="Traffic, errors and latency of every service, and Ray Serve's health.",
        variables=[
            label_variable("service", "Service", f"label_values({REQUESTS}, service)"),
        ],
        panels=[
            Row("Traffic"),
            stat(
                "Firing alerts",
                'count(ALERTS{alertname=~"HybridServe.*", alertstate="firing"}) or vector(0)',
                description="hybridserve alerts firing now (deploy/prometheus/rules).",
            ),
            stat("Requests/s", f"sum({rate(sel(REQUESTS, svc))})", unit="reqps"),
            stat(
                "Server error ratio",
                f"sum({rate(sel(REQUESTS, svc, SERVER_ERRORS))}) "
                f"/ sum({rate(sel(REQUESTS, svc))})",
                unit="percentunit",
            ),
            stat(
                "Healthy replicas",
                "sum(ray_serve_deployment_replica_healthy)",
                description="Replicas that passed their last Serve health check.",
            ),
            ts(
                "Requests/s by service",
                (f"sum by (service) ({rate(sel(REQUESTS, svc))})", "{{service}}"),
                unit="reqps",
            ),
            ts(
                "Non-OK responses/s by code",
                (
                    f"sum by (service, code) ({rate(sel(REQUESTS, svc, NOT_OK))})",
                    "{{service}} {{code}}",
                ),
                unit="reqps",
                description="Client errors (INVALID_ARGUMENT, NOT_FOUND, ...) included.",
            ),
            ts(
                "Server error ratio by service",
                (
                    f"sum by (service) ({rate(sel(REQUESTS, svc, SERVER_ERRORS))}) "
                    f"/ sum by (service) ({rate(sel(REQUESTS, svc))})",
                    "{{service}}",
                ),
                unit="percentunit",
                description="The ratio the HybridServeHighErrorRatio alert watches.",
            ),
            ts(
                "Request latency (stage=total)",
                (quantile(0.5, sel(STAGE_BUCKET, svc, 'stage="total"'), "service"),
                 "p50 {{service}}"),
                (quantile(0.99, sel(STAGE_BUCKET, svc, 'stage="total"'), "service"),
                 "p99 {{service}}"),
                unit="s",
            ),
            ts(
                "Time to first token",
                (quantile(0.5, sel(STAGE_BUCKET, svc, 'stage="first_token"'), "service"),
                 "p50 {{service}}"),
                (quantile(0.99, sel(STAGE_BUCKET, svc, 'stage="first_token"'), "service"),
                 "p99 {{service}}"),
                unit="s",
                description="p99 is what the HybridServeHighTTFTP99 alert watches.",
            ),
            ts(
                "p99 latency by stage",
                (quantile(0.99, sel(STAGE_BUCKET, svc), "service, stage"),
                 "{{service}} {{stage}}"),
                unit="s",
            ),
            Row("Ray Serve"),
            ts(
                "Deployment status",
                ("max by (application, deployment) (ray_serve_deployment_status)",
                 "{{application}}/{{deployment}}"),
                description="0=UNKNOWN 1=DEPLOY_FAILED 2=UNHEALTHY 3=UPDATING 4=UPSCALING "
                "5=DOWNSCALING 6=HEALTHY. At 2 or below the HybridServeReplicaDown alert fires.",
            ),
            ts(
                "Healthy replicas by deployment",
                ("sum by (application, deployment) (ray_serve_deployment_replica_healthy)",
                 "{{application}}/{{deployment}}"),
            ),
            ts(
                "gRPC proxy requests/s",
                ("sum by (application, status_code) "
                 f"({rate('ray_serve_num_grpc_requests_total')})",
                 "{{application}} {{status_code}}"),
                unit="reqps",
            ),
            ts(
                "gRPC proxy p99 latency",
                (quantile(0.99, "ray_serve_grpc_request_latency_ms_bucket", "application"),
                 "{{application}}"),
                unit="ms",
            ),
            ts(
                "Requests in flight per replica",
                ("sum by (application, replica) (ray_serve_replica_processing_queries)",
                 "{{application}} {{replica}}"),
            ),
            ts(
                "Quota rejections/s",
                (f"sum by (quota) ({rate(QUOTA_REJECTIONS)})", "{{quota}}"),
                unit="reqps",
            ),
        ],
    )


def tenants() -> Dashboard:
    ta = 'tenant=~"$tenant", adapter=~"$adapter"'
    t = 'tenant=~"$tenant"'
    a = 'adapter=~"$adapter"'
    return Dashboard(
        uid="hybridserve-tenants",
        title="hybridserve / Tenants and adapters",
        description="Per-tenant and per-adapter generations, tokens, quotas, ingestion and "
        "adapter residency.",
        variables=[
            # Tenants that generated, ingested or were refused: every panel below
            # filters by this one variable.
            label_variable(
                "tenant", "Tenant",
                f'label_values({{__name__=~"{GENERATIONS}|{INGEST_CHUNKS}|{QUOTA_REJECTIONS}"}}, tenant)',
            ),
            label_variable(
                "adapter", "Adapter", f"label_values({sel(GENERATIONS, t)}, adapter)"
            ),
        ],
        panels=[
            Row("Generations and tokens"),
            ts(
                "Generations/s by tenant",
                (f"sum by (tenant) ({rate(sel(GENERATIONS, ta))})", "{{tenant}}"),
                unit="reqps",
            ),
            ts(
                "Generations/s by adapter",
                (f"sum by (adapter) ({rate(sel(GENERATIONS, ta))})", "{{adapter}}"),
                unit="reqps",
                description='"base" is the base model without an adapter.',
            ),
            ts(
                "Tokens/s by tenant",
                (f"sum by (tenant) ({rate(sel(PROMPT_TOKENS, ta))})", "prompt {{tenant}}"),
                (f"sum by (tenant) ({rate(sel(COMPLETION_TOKENS, ta))})",
                 "completion {{tenant}}"),
            ),
            ts(
                "Completion tokens/s by adapter",
                (f"sum by (adapter) ({rate(sel(COMPLETION_TOKENS, ta))})", "{{adapter}}"),
            ),
            ts(
                "Completion tokens per generation",
                (f"sum by (tenant, adapter) ({rate(sel(COMPLETION_TOKENS, ta))}) "
                 f"/ sum by (tenant, adapter) ({rate(sel(GENERATIONS, ta))})",
                 "{{tenant}} {{adapter}}"),
            ),
            ts(
                "Prompt tokens per generation",
                (f"sum by (tenant, adapter) ({rate(sel(PROMPT_TOKENS, ta))}) "
                 f"/ sum by (tenant, adapter) ({rate(sel(GENERATIONS, ta))})",
                 "{{tenant}} {{adapter}}"),
            ),
            Row("Quotas and ingestion"),
            ts(
                "Quota rejections/s",
                (f"sum by (tenant, quota) ({rate(sel(QUOTA_REJECTIONS, t))})",
                 "{{tenant}} {{quota}}"),
                unit="reqps",
                description="Watched by the HybridServeQuotaRejectionsSpiking alert.",
            ),
            ts(
                "Ingested chunks/s",
                (f"sum by (tenant, outcome) ({rate(sel(INGEST_CHUNKS, t))})",
                 "{{tenant}} {{outcome}}"),
            ),
            Row("Adapters"),
            ts(
                "Adapter loads/s",
                (f"sum by (adapter, outcome) ({rate(sel(ADAPTER_LOADS, a))})",
                 "{{adapter}} {{outcome}}"),
            ),
            ts(
                "Adapter evictions/s",
                (f"sum by (adapter) ({rate(sel(ADAPTER_EVICTIONS, a))})", "{{adapter}}"),
            ),
            ts(
                "Replicas holding each adapter",
                (f"count by (adapter) ({ADAPTER_RESIDENT}{{{a}}} == 1)", "{{adapter}}"),
                width=24,
            ),
        ],
    )


def engine() -> Dashboard:
    r = 'replica=~"$replica"'
    rid = 'ReplicaId=~"$replica"'
    # NOTE: by deployment, not application: every generation pool (`generation`,
    # and any other app built by build_generation_app) runs a GenerationService.
    gen = 'deployment="GenerationService"'
    return Dashboard(
        uid="hybridserve-engine",
        title="hybridserve / Generation engine",
        description="The vLLM engines of the generation replicas: queue, latency, tokens, "
        "KV cache and LoRA adapters. vLLM's own metrics (vllm:*) are exported by Ray as "
        "ray_vllm_*.",
        variables=[
            label_variable("replica", "Replica", f"label_values({ENGINE_RUNNING}, replica)"),
        ],
        panels=[
            Row("Engine load"),
            ts(
                "Requests running, waiting and batch size",
                (f"max by (replica) ({ENGINE_RUNNING}{{{r}}})", "running {{replica}}"),
                (f"max by (replica) ({ENGINE_WAITING}{{{r}}})", "waiting {{replica}}"),
                (f"max by (replica) ({ENGINE_CAPACITY}{{{r}}})", "max batch {{replica}}"),
            ),
            ts(
                "Queue fill (waiting / max batch)",
                (f"max by (replica) ({ENGINE_WAITING}{{{r}}}) "
                 f"/ max by (replica) ({ENGINE_CAPACITY}{{{r}}})", "{{replica}}"),
                unit="percentunit",
                description="At 100% for 5 minutes the HybridServeEngineQueueSaturated alert "
                "fires.",
            ),
            ts(
                "Time to first token (generation service)",
                (quantile(0.5, sel(STAGE_BUCKET, 'service="generation"', 'stage="first_token"')),
                 "p50"),
                (quantile(0.99, sel(STAGE_BUCKET, 'service="generation"', 'stage="first_token"')),
                 "p99"),
                unit="s",
            ),
            ts(
                "Tokens/s (all tenants)",
                (f"sum({rate(PROMPT_TOKENS)})", "prompt"),
                (f"sum({rate(COMPLETION_TOKENS)})", "completion"),
            ),
            Row("vLLM"),
            ts(
                "vLLM requests running and waiting",
                (f"sum by (ReplicaId) (ray_vllm_num_requests_running{{{rid}}})",
                 "running {{ReplicaId}}"),
                (f"sum by (ReplicaId) (ray_vllm_num_requests_waiting{{{rid}}})",
                 "waiting {{ReplicaId}}"),
            ),
            ts(
                "KV cache usage",
                (f"max by (ReplicaId) (ray_vllm_kv_cache_usage_perc{{{rid}}})",
                 "{{ReplicaId}}"),
                unit="percentunit",
            ),
            ts(
                "vLLM time to first token",
                (quantile(0.5, f"ray_vllm_time_to_first_token_seconds_bucket{{{rid}}}"), "p50"),
                (quantile(0.99, f"ray_vllm_time_to_first_token_seconds_bucket{{{rid}}}"),
                 "p99"),
                unit="s",
            ),
            ts(
                "Inter-token latency",
                (quantile(0.5, f"ray_vllm_inter_token_latency_seconds_bucket{{{rid}}}"), "p50"),
                (quantile(0.99, f"ray_vllm_inter_token_latency_seconds_bucket{{{rid}}}"),
                 "p99"),
                unit="s",
            ),
            ts(
                "Request latency and queue time (p99)",
                (quantile(0.99, f"ray_vllm_e2e_request_latency_seconds_bucket{{{rid}}}"),
                 "end to end"),
                (quantile(0.99, f"ray_vllm_request_queue_time_seconds_bucket{{{rid}}}"),
                 "queued"),
                unit="s",
            ),
            ts(
                "vLLM tokens/s",
                (f"sum by (ReplicaId) ({rate(sel('ray_vllm_prompt_tokens_total', rid))})",
                 "prompt {{ReplicaId}}"),
                (f"sum by (ReplicaId) ({rate(sel('ray_vllm_generation_tokens_total', rid))})",
                 "generation {{ReplicaId}}"),
            ),
            ts(
                "Finished requests/s by reason",
                (f"sum by (finished_reason) "
                 f"({rate(sel('ray_vllm_request_success_total', rid))})",
                 "{{finished_reason}}"),
                unit="reqps",
            ),
            ts(
                "Preemptions/s",
                (f"sum by (ReplicaId) ({rate(sel('ray_vllm_num_preemptions_total', rid))})",
                 "{{ReplicaId}}"),
            ),
            Row("LoRA adapters"),
            ts(
                "Resident adapters per replica",
                (f"count by (replica) ({ADAPTER_RESIDENT}{{{r}}} == 1)", "{{replica}}"),
                description="Bounded by engine.max_cpu_loras.",
            ),
            ts(
                "Adapter loads and evictions/s",
                (f"sum by (outcome) ({rate(ADAPTER_LOADS)})", "loads {{outcome}}"),
                (f"sum({rate(ADAPTER_EVICTIONS)})", "evictions"),
                description="Many evictions mean more adapters are in use than replicas keep "
                "resident: raise engine.max_cpu_loras or add replicas.",
            ),
            ts(
                "Adapter load time",
                (quantile(0.5, sel(ADAPTER_LOAD_BUCKET, 'outcome="ok"')), "p50"),
                (quantile(0.99, sel(ADAPTER_LOAD_BUCKET, 'outcome="ok"')), "p99"),
                unit="s",
            ),
            ts(
                "Serve multiplexed models per replica",
                (f"max by (replica) (ray_serve_num_multiplexed_models{{{gen}, {r}}})",
                 "{{replica}}"),
                description="Serve's own count of the adapters (multiplexed model ids) a "
                "replica holds.",
            ),
            ts(
                "Serve requests in flight per replica",
                (f"max by (replica) (ray_serve_replica_processing_queries{{{gen}, {r}}})",
                 "{{replica}}"),
            ),
            ts(
                "Serve processing latency (p99)",
                (quantile(0.99,
                          f"ray_serve_deployment_processing_latency_ms_bucket{{{gen}}}",
                          "application"),
                 "{{application}}"),
                unit="ms",
            ),
        ],
    )


def retrieval() -> Dashboard:
    svc = 'service=~"retrieval|rerank"'
    t = 'tenant=~"$tenant"'
    return Dashboard(
        uid="hybridserve-retrieval",
        title="hybridserve / Retrieval",
        description="Retrieval and rerank services, Weaviate calls and ingestion.",
        variables=[
            label_variable("tenant", "Tenant", f"label_values({INGEST_CHUNKS}, tenant)"),
        ],
        panels=[
            Row("Requests"),
            ts(
                "Requests/s by method",
                (f"sum by (service, method) ({rate(sel(REQUESTS, svc))})",
                 "{{service}} {{method}}"),
                unit="reqps",
            ),
            ts(
                "Non-OK responses/s by code",
                (f"sum by (service, code) ({rate(sel(REQUESTS, svc, NOT_OK))})",
                 "{{service}} {{code}}"),
                unit="reqps",
            ),
            ts(
                "Stage latency",
                (quantile(0.5, sel(STAGE_BUCKET, 'stage=~"retrieve|embed|rerank"'),
                          "service, stage"), "p50 {{service}} {{stage}}"),
                (quantile(0.99, sel(STAGE_BUCKET, 'stage=~"retrieve|embed|rerank"'),
                          "service, stage"), "p99 {{service}} {{stage}}"),
                unit="s",
            ),
            ts(
                "Serve processing latency (p99)",
                (quantile(0.99,
                          'ray_serve_deployment_processing_latency_ms_bucket'
                          '{application=~"retrieval|rerank"}',
                          "application"),
                 "{{application}}"),
                unit="ms",
            ),
            Row("Weaviate"),
            ts(
                "Weaviate health check",
                (f"max by (replica) ({WEAVIATE_UP})", "{{replica}}"),
                description="1 when the replica's last health check reached Weaviate. "
                "All 0 fires HybridServeWeaviateUnavailable.",
            ),
            ts(
                "Weaviate calls/s",
                (f"sum by (op, outcome) ({rate(WEAVIATE_REQUESTS)})", "{{op}} {{outcome}}"),
                unit="reqps",
            ),
            ts(
                "Weaviate error ratio by operation",
                (f"sum by (op) ({rate(sel(WEAVIATE_REQUESTS, FAILED))}) "
                 f"/ sum by (op) ({rate(WEAVIATE_REQUESTS)})", "{{op}}"),
                unit="percentunit",
            ),
            ts(
                "Weaviate latency (p99)",
                (quantile(0.99, WEAVIATE_BUCKET, "op"), "{{op}}"),
                unit="s",
            ),
            Row("Ingestion and rerank batching"),
            ts(
                "Ingested chunks/s",
                (f"sum by (tenant, outcome) ({rate(sel(INGEST_CHUNKS, t))})",
                 "{{tenant}} {{outcome}}"),
            ),
            ts(
                "Rerank batches",
                (quantile(0.5, 'ray_serve_actual_batch_size_bucket{application="rerank"}'),
                 "batch size p50"),
                ('max(ray_serve_batch_queue_length{application="rerank"})', "queued"),
                description="From Serve's @serve.batch metrics on the rerank deployment.",
            ),
        ],
    )


DASHBOARDS = {
    "hybridserve-overview.json": overview,
    "hybridserve-tenants.json": tenants,
    "hybridserve-engine.json": engine,
    "hybridserve-retrieval.json": retrieval,
}


def build() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(render(make()), indent=2) + "\n" for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build().items():
        path = OUT_DIR / name
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(name)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/grafana/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
