"""Every hybridserve metric, declared once, and the small API services record them with.

Export path
-----------
The services run inside Ray Serve replicas (and the request router inside Serve's
proxy actor), so metrics are `ray.util.metrics` objects: Ray's metrics agent on each
node exports them on the node's metrics export port (`ray start --metrics-export-port`,
`ray.init(_metrics_export_port=...)`), next to Ray's, Ray Serve's and vLLM's own
metrics. Nothing here runs its own HTTP endpoint.

What Ray 2.60 does to a declared metric (read in `ray/_private/telemetry/
open_telemetry_metric_recorder.py`, `ray/dashboard/modules/reporter/reporter_agent.py`
and `opentelemetry/exporter/prometheus/`, and checked by scraping a local Ray):

- The name gets the prefix ``ray_``: ``hybridserve_requests_total`` is scraped as
  ``ray_hybridserve_requests_total``. `MetricSpec.exported_name` gives that name.
- Counters are exported as Prometheus counters whose name ends in ``_total``; a name
  that already ends in ``_total`` is kept as is (prometheus_client strips and re-adds
  the suffix), so there is no ``_total_total``. Every counter here is declared with
  its ``_total`` so the declared and exported names differ only by ``ray_``.
- Ray adds labels to every series: ``Component``, ``NodeAddress``, ``SessionName``,
  ``Version``, ``WorkerId`` and ``otel_scope_name`` / ``otel_scope_schema_url`` /
  ``otel_scope_version``. ``WorkerId`` differs per process, so queries always
  aggregate (``sum by (...)``) over the labels declared here.
- Histograms keep their exact bucket counts, but ``_sum`` is rebuilt from bucket
  midpoints, so it is an approximation: use the buckets (``histogram_quantile``)
  rather than ``_sum / _count`` for anything precise.
- A gauge series disappears 20-30 s after it was last set (the agent keeps a gauge
  for two report intervals; `metrics_report_interval_ms` is 10 s by default). So this module remembers the last value of every gauge series and sets it
  again every `GAUGE_REFRESH_S` seconds from a daemon thread; a series that should
  go away (an evicted adapter) is simply no longer refreshed.

Labels and cardinality
----------------------
Every metric has a fixed label set (`MetricSpec.labels`); helpers always pass exactly
those keys. Values stay bounded because:

- ``service``, ``stage``, ``code``, ``outcome`` and ``quota`` take values from the
  fixed sets below (`SERVICES`, `STAGES`, gRPC status names, ...); anything else
  is recorded as ``"other"`` (``"UNKNOWN"`` for codes).
- ``tenant`` and ``adapter`` are ids that exist only once registered, and callers pass
  them only after the request was authenticated and the adapter resolved. A request
  without a resolved tenant is ``"unknown"``; the base model is adapter ``"base"``.
- ``method`` (gRPC method names) and ``op`` (Weaviate store operations) are bounded
  by the code that calls them; ``replica`` by the live Serve replicas. Its value is
  Serve's replica unique id (`replica_id()`), the same value as the ``replica`` label
  of Serve's own metrics and the ``ReplicaId`` label of vLLM's, so dashboards can
  filter all three with one variable.
- As a safety valve, each label key accepts at most `MAX_LABEL_VALUES` distinct
  values per process; further new values are recorded as ``"other"`` and logged once.
- No request ids, API keys, prompts, document ids or any other free text are labels.

Built-in metrics
----------------
Ray Serve's metrics (``ray_serve_*``) come for free. vLLM's engine metrics reach Ray
only if the engine logs through ``vllm.v1.metrics.ray_wrappers.RayPrometheusStatLogger``
(``AsyncLLM.from_engine_args(..., stat_loggers=[RayPrometheusStatLogger])``, as Ray
Serve LLM does); ``vllm:x`` is then scraped as ``ray_vllm_x`` (``:`` is not allowed).

Switching off
-------------
`set_enabled(False)` (wired from the platform config) makes every helper a no-op.
Metric objects are created lazily on first use, so importing this module never
needs Ray to be initialised, and recording without Ray initialised does nothing
harmful. A metric that fails to record logs one warning and never breaks a request.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: Prefix of every metric declared here.
NAMESPACE = "hybridserve"
#: What Ray's metrics agent puts in front of every custom metric name on export.
RAY_EXPORT_PREFIX = "ray_"
#: Distinct values one label key may take per process before new ones become "other".
MAX_LABEL_VALUES = 1000
#: How often gauge series are set again so Ray keeps exporting them (its TTL is ~20 s).
GAUGE_REFRESH_S = 5.0

OTHER = "other"
UNKNOWN_TENANT = "unknown"
BASE_ADAPTER = "base"

#: Values of the ``service`` label: the gRPC services of the platform.
SERVICES = ("rag", "retrieval", "rerank", "generation", "admin", "openai")
#: Values of the ``stage`` label. ``first_token`` is time to first token (from the
#: start of the request); ``total`` is the whole request.
STAGES = (
    "auth",
    "quota",
    "retrieve",
    "embed",
    "rerank",
    "prompt",
    "generate",
    "first_token",
    "total",
)
#: Values of the ``quota`` label.
QUOTAS = ("requests", "tokens", "concurrency")
#: gRPC status code names, the values of the ``code`` label.
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)

# Buckets, in seconds. Request stages span a sub-millisecond auth check to a
# minute-long generation on CPU.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Loading a LoRA adapter into the engine: tens of ms to tens of seconds.
ADAPTER_LOAD_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: One Weaviate call: a local query is ~ms, a large batch write can take seconds.
WEAVIATE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Kind(str, enum.Enum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its declared name, type, help text, fixed labels and buckets."""

    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        """The name Prometheus scrapes (counters already end in ``_total``)."""
        return RAY_EXPORT_PREFIX + self.name

    def series_names(self) -> tuple[str, ...]:
        """Every sample name this metric produces on the scrape endpoint."""
        base = self.exported_name
        if self.kind is Kind.HISTOGRAM:
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


# --- Declarations. NOTE: dashboards and alert rules use the exported names of these
# (`ray_` + name); tests/unit/test_prometheus_rules.py checks every name they use.

REQUESTS = MetricSpec(
    name="hybridserve_requests_total",
    kind=Kind.COUNTER,
    description="gRPC requests handled, by service, method and gRPC status code.",
    labels=("service", "method", "code"),
)
STAGE_DURATION = MetricSpec(
    name="hybridserve_stage_duration_seconds",
    kind=Kind.HISTOGRAM,
    description=(
        "Time spent in one stage of a request (stage=first_token: time to first token; "
        "stage=total: the whole request)."
    ),
    labels=("service", "stage"),
    buckets=LATENCY_BUCKETS_S,
)
GENERATIONS = MetricSpec(
    name="hybridserve_generations_total",
    kind=Kind.COUNTER,
    description="Finished generations, by tenant and adapter.",
    labels=("tenant", "adapter"),
)
PROMPT_TOKENS = MetricSpec(
    name="hybridserve_prompt_tokens_total",
    kind=Kind.COUNTER,
    description="Prompt tokens processed, by tenant and adapter.",
    labels=("tenant", "adapter"),
)
COMPLETION_TOKENS = MetricSpec(
    name="hybridserve_completion_tokens_total",
    kind=Kind.COUNTER,
    description="Completion tokens generated, by tenant and adapter.",
    labels=("tenant", "adapter"),
)
ADAPTER_LOADS = MetricSpec(
    name="hybridserve_adapter_loads_total",
    kind=Kind.COUNTER,
    description="LoRA adapter loads into an engine, by adapter and outcome (ok or error).",
    labels=("adapter", "outcome"),
)
ADAPTER_LOAD_DURATION = MetricSpec(
    name="hybridserve_adapter_load_duration_seconds",
    kind=Kind.HISTOGRAM,
    description="Time to load a LoRA adapter into an engine, by outcome (ok or error).",
    labels=("outcome",),
    buckets=ADAPTER_LOAD_BUCKETS_S,
)
ADAPTER_EVICTIONS = MetricSpec(
    name="hybridserve_adapter_evictions_total",
    kind=Kind.COUNTER,
    description="LoRA adapters evicted from an engine to make room (LRU).",
    labels=("adapter",),
)
ADAPTER_RESIDENT = MetricSpec(
    name="hybridserve_adapter_resident",
    kind=Kind.GAUGE,
    description="1 while the adapter is loaded on the replica; the series ends at eviction.",
    labels=("replica", "adapter"),
)
ENGINE_WAITING = MetricSpec(
    name="hybridserve_engine_waiting_requests",
    kind=Kind.GAUGE,
    description="Requests queued in the generation engine, waiting to be scheduled.",
    labels=("replica",),
)
ENGINE_RUNNING = MetricSpec(
    name="hybridserve_engine_running_requests",
    kind=Kind.GAUGE,
    description="Requests in the generation engine's running batch.",
    labels=("replica",),
)
ENGINE_CAPACITY = MetricSpec(
    name="hybridserve_engine_max_running_requests",
    kind=Kind.GAUGE,
    description="Most requests the generation engine batches at once (engine.max_num_seqs).",
    labels=("replica",),
)
QUOTA_REJECTIONS = MetricSpec(
    name="hybridserve_quota_rejections_total",
    kind=Kind.COUNTER,
    description="Requests refused because a tenant quota (requests or tokens/min) ran out.",
    labels=("tenant", "quota"),
)
INGEST_CHUNKS = MetricSpec(
    name="hybridserve_ingest_chunks_total",
    kind=Kind.COUNTER,
    description="Chunks handled by ingestion, by tenant and outcome (written or failed).",
    labels=("tenant", "outcome"),
)
WEAVIATE_REQUESTS = MetricSpec(
    name="hybridserve_weaviate_requests_total",
    kind=Kind.COUNTER,
    description="Calls to Weaviate, by store operation and outcome (ok or error).",
    labels=("op", "outcome"),
)
WEAVIATE_DURATION = MetricSpec(
    name="hybridserve_weaviate_request_duration_seconds",
    kind=Kind.HISTOGRAM,
    description="Latency of calls to Weaviate, by store operation.",
    labels=("op",),
    buckets=WEAVIATE_BUCKETS_S,
)
WEAVIATE_UP = MetricSpec(
    name="hybridserve_weaviate_up",
    kind=Kind.GAUGE,
    description="1 if the replica's last Weaviate health check passed, else 0.",
    labels=("replica",),
)

#: Every metric of the platform.
METRICS: tuple[MetricSpec, ...] = (
    REQUESTS, STAGE_DURATION, GENERATIONS, PROMPT_TOKENS, COMPLETION_TOKENS,
    ADAPTER_LOADS, ADAPTER_LOAD_DURATION, ADAPTER_EVICTIONS, ADAPTER_RESIDENT,
    ENGINE_WAITING, ENGINE_RUNNING, ENGINE_CAPACITY, QUOTA_REJECTIONS, INGEST_CHUNKS,
    WEAVIATE_REQUESTS, WEAVIATE_DURATION, WEAVIATE_UP,
)


# --- The registry: lazy metric objects, label guards, gauge refresh.

#: Makes the backend object of one metric (a `ray.util.metrics` object by default).
MetricFactory = Callable[[MetricSpec], Any]


def ray_metric(spec: MetricSpec) -> Any:
    """Creates the `ray.util.metrics` object for `spec` (imports Ray on first use)."""
    from ray.util import metrics as ray_metrics

    if spec.kind is Kind.COUNTER:
        return ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.labels)
    if spec.kind is Kind.HISTOGRAM:
        return ray_metrics.Histogram(
            spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels
        )
    return ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.labels)


def _ray_initialized() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:  # noqa: BLE001 - no Ray, no refresher
        return False


class Registry:
    """The metric objects of one process, created on first use.

    Args:
        factory: makes a metric object from its spec (tests pass a recording fake).
        refresh_gauges: start the gauge refresh thread once Ray is initialised.
    """

    def __init__(self, factory: MetricFactory = ray_metric, *, refresh_gauges: bool = True):
        self.factory = factory
        self.refresh_gauges = refresh_gauges
        self.enabled = True
        self._metrics: dict[str, Any] = {}
        self._label_values: dict[str, set[str]] = {}
        # (metric name, sorted tag items) -> last value, for every live gauge series.
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def _metric(self, spec: MetricSpec) -> Any:
        metric = self._metrics.get(spec.name)
        if metric is None:
            with self._lock:
                metric = self._metrics.get(spec.name)
                if metric is None:
                    metric = self._metrics[spec.name] = self.factory(spec)
        return metric

    def bounded(self, key: str, value: str) -> str:
        """`value`, or "other" once label `key` already has MAX_LABEL_VALUES values."""
        with self._lock:
            seen = self._label_values.setdefault(key, set())
            if value in seen:
                return value
            if len(seen) < MAX_LABEL_VALUES:
                seen.add(value)
                return value
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "metrics: label %r has more than %d values in this process; new values are "
                "recorded as %r. A caller is passing an unbounded value.",
                key,
                MAX_LABEL_VALUES,
                OTHER,
            )
        return OTHER

    def record(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        """Adds to a counter, observes a histogram or sets a gauge. Never raises."""
        if not self.enabled:
            return
        try:
            metric = self._metric(spec)
            if spec.kind is Kind.COUNTER:
                if value > 0:  # Ray rejects non-positive increments
                    metric.inc(value, tags=tags)
            elif spec.kind is Kind.HISTOGRAM:
                metric.observe(value, tags=tags)
            else:
                metric.set(value, tags=tags)
        except Exception:  # noqa: BLE001 - metrics must never break a request
            if spec.name not in self._warned:
                self._warned.add(spec.name)
                logger.warning("metrics: recording %s failed", spec.name, exc_info=True)

    def set_gauge(
        self, spec: MetricSpec, value: float, tags: dict[str, str], *, keep: bool = True
    ) -> None:
        """Sets a gauge series and keeps refreshing it (or stops, with keep=False)."""
        key = (spec.name, tuple(sorted(tags.items())))
        with self._lock:
            if keep:
                self._gauges[key] = value
            else:
                self._gauges.pop(key, None)
        self.record(spec, value, tags)
        if keep and self.refresh_gauges and self._refresher is None and _ray_initialized():
            self._start_refresher()

    def _start_refresher(self) -> None:
        with self._lock:
            if self._refresher is not None:
                return
            self._refresher = threading.Thread(
                target=self._refresh_forever, name="hybridserve-metrics-gauges", daemon=True
            )
        self._refresher.start()

    def _refresh_forever(self) -> None:
        while True:  # a daemon thread: it ends with the process
            time.sleep(GAUGE_REFRESH_S)
            self.refresh()

    def release(self, label: str, value: str) -> None:
        """Sets every live gauge series whose `label` is `value` to 0 and stops
        refreshing it, so it ages out (a replica shutting down)."""
        with self._lock:
            gone = [key for key in self._gauges if (label, value) in key[1]]
            for key in gone:
                del self._gauges[key]
        for name, tags in gone:
            self.record(_BY_NAME[name], 0.0, dict(tags))

    def refresh(self) -> None:
        """Sets every live gauge series again, so Ray keeps exporting it."""
        with self._lock:
            live = list(self._gauges.items())
        for (name, tags), value in live:
            self.record(_BY_NAME[name], value, dict(tags))


_BY_NAME = {spec.name: spec for spec in METRICS}
_REGISTRY = Registry()


def set_enabled(enabled: bool) -> None:
    """Turns all metric recording on or off for this process (the platform config sets it)."""
    _REGISTRY.enabled = bool(enabled)


def is_enabled() -> bool:
    return _REGISTRY.enabled


# --- Label values.


def _one_of(value: str, allowed: tuple[str, ...], fallback: str = OTHER) -> str:
    return value if value in allowed else fallback


def _code(code: Any) -> str:
    """A gRPC status name from a `grpc.StatusCode`, an error code name or None (OK)."""
    if code is None:
        return "OK"
    name = getattr(code, "name", code)  # grpc.StatusCode has .name
    return _one_of(str(name).upper(), GRPC_CODES, "UNKNOWN")


def _tenant(tenant: str | None) -> str:
    return _REGISTRY.bounded("tenant", tenant) if tenant else UNKNOWN_TENANT


def _adapter(adapter: str | None) -> str:
    return _REGISTRY.bounded("adapter", adapter) if adapter else BASE_ADAPTER


def _free(key: str, value: str | None) -> str:
    return _REGISTRY.bounded(key, value) if value else "unknown"


def _outcome(ok: bool) -> str:
    return "ok" if ok else "error"


def replica_id() -> str:
    """The Serve replica this code runs in: its unique id, the `replica` label of the
    metrics ("local" outside a replica: one bounded label for tests and tools)."""
    try:
        # Lazy: ray is heavy, and importing the metrics must not import it.
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (or no Ray)
        return "local"


# --- The helpers services call.


def record_request(service: str, method: str, code: Any = None) -> None:
    """Counts one finished gRPC call.

    Args:
        service: one of `SERVICES`.
        method: the gRPC method name (``"Generate"``), not the full path.
        code: a `grpc.StatusCode`, a status name such as ``"NOT_FOUND"``
            (`HybridServeError.code`), or None for OK.
    """
    tags = {
        "service": _one_of(service, SERVICES),
        "method": _free("method", method),
        "code": _code(code),
    }
    _REGISTRY.record(REQUESTS, 1, tags)


def observe_stage(stage: str, seconds: float, *, service: str) -> None:
    """Records the duration of one request stage (one of `STAGES`) in `service`."""
    _REGISTRY.record(
        STAGE_DURATION,
        max(0.0, float(seconds)),
        {"service": _one_of(service, SERVICES), "stage": _one_of(stage, STAGES)},
    )


@dataclass
class StageTiming:
    """What `stage_timer` measured; `seconds` is set when the block exits."""

    stage: str
    seconds: float = 0.0


@contextmanager
def stage_timer(stage: str, *, service: str) -> Iterator[StageTiming]:
    """Times the block as one stage; the timing is recorded even if the block raises.

    The yielded `StageTiming` lets the caller report the same number to the
    client (per-stage timings in the response), whether or not metrics are on.
    """
    timing = StageTiming(stage)
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing.seconds = time.perf_counter() - start
        observe_stage(stage, timing.seconds, service=service)


def record_tokens(tenant: str | None, adapter: str | None, prompt: int, completion: int) -> None:
    """Counts one finished generation and its tokens.

    Args:
        tenant: the authenticated tenant id (None: "unknown").
        adapter: the resolved adapter id ``name@version`` (None: the base model).
    """
    tags = {"tenant": _tenant(tenant), "adapter": _adapter(adapter)}
    _REGISTRY.record(GENERATIONS, 1, tags)
    _REGISTRY.record(PROMPT_TOKENS, int(prompt), tags)
    _REGISTRY.record(COMPLETION_TOKENS, int(completion), tags)


def adapter_loaded(adapter: str, seconds: float, ok: bool) -> None:
    """Records one attempt to load `adapter` into an engine and how long it took."""
    outcome = _outcome(ok)
    _REGISTRY.record(ADAPTER_LOADS, 1, {"adapter": _adapter(adapter), "outcome": outcome})
    _REGISTRY.record(ADAPTER_LOAD_DURATION, max(0.0, float(seconds)), {"outcome": outcome})


def adapter_evicted(adapter: str) -> None:
    """Counts one eviction of `adapter` from an engine."""
    _REGISTRY.record(ADAPTER_EVICTIONS, 1, {"adapter": _adapter(adapter)})


def set_resident(replica: str, adapter: str, resident: bool) -> None:
    """Marks `adapter` as loaded on `replica` (or no longer: its series then ages out)."""
    _REGISTRY.set_gauge(
        ADAPTER_RESIDENT,
        1.0 if resident else 0.0,
        {"replica": _free("replica", replica), "adapter": _adapter(adapter)},
        keep=resident,
    )


def set_engine_load(replica: str, *, waiting: int, running: int, capacity: int) -> None:
    """Reports the engine's queue: requests waiting, running, and the most it batches.

    Call it whenever the numbers change or at least every few seconds.
    """
    tags = {"replica": _free("replica", replica)}
    _REGISTRY.set_gauge(ENGINE_WAITING, float(waiting), tags)
    _REGISTRY.set_gauge(ENGINE_RUNNING, float(running), tags)
    _REGISTRY.set_gauge(ENGINE_CAPACITY, float(capacity), tags)


def quota_rejected(tenant: str | None, quota: str = "requests") -> None:
    """Counts one request refused by the tenant's `quota` ("requests", "tokens" or
    "concurrency")."""
    tags = {"tenant": _tenant(tenant), "quota": _one_of(quota, QUOTAS)}
    _REGISTRY.record(QUOTA_REJECTIONS, 1, tags)


def ingest_chunks(tenant: str, written: int, failed: int) -> None:
    """Counts chunks one ingestion batch wrote and failed to write."""
    tenant_value = _tenant(tenant)
    _REGISTRY.record(INGEST_CHUNKS, int(written), {"tenant": tenant_value, "outcome": "written"})
    _REGISTRY.record(INGEST_CHUNKS, int(failed), {"tenant": tenant_value, "outcome": "failed"})


def weaviate_call(op: str, seconds: float, ok: bool) -> None:
    """Records one Weaviate call: `op` is the store operation (``"search"``, ``"write"``)."""
    op_value = _free("op", op)
    _REGISTRY.record(WEAVIATE_REQUESTS, 1, {"op": op_value, "outcome": _outcome(ok)})
    _REGISTRY.record(WEAVIATE_DURATION, max(0.0, float(seconds)), {"op": op_value})


@contextmanager
def weaviate_timer(op: str) -> Iterator[None]:
    """Times a Weaviate call; an exception leaving the block counts as an error."""
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        weaviate_call(op, time.perf_counter() - start, ok)


def release_replica(replica: str) -> None:
    """A replica is shutting down: its gauges (residency, engine load, weaviate_up)
    drop to 0 and are no longer refreshed, so they age out instead of outliving it."""
    _REGISTRY.release("replica", _free("replica", replica))


def set_weaviate_up(replica: str, up: bool) -> None:
    """Reports the result of the replica's latest Weaviate health check."""
    _REGISTRY.set_gauge(WEAVIATE_UP, 1.0 if up else 0.0, {"replica": _free("replica", replica)})
