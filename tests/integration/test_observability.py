"""Observability end to end: the session's real platform (Ray Serve, vLLM on a tiny
Llama, a real weaviate-server) exports its metrics through Ray's metrics agent, and a
real Prometheus (Debian's `prometheus`, started from the shipped config with the
shipped alert rules) scrapes them.

A bounded load goes through every service: the base model and three adapters on the
`generation` app, the same adapters on the two single-slot replicas of the `affinity`
app (which forces evictions), a bad request (INVALID_ARGUMENT), an unknown adapter
(NOT_FOUND), tenant creation (with a key and a quota of 2 requests a minute, whose
bucket holds one: the tenant's key generates once and its next search is
RESOURCE_EXHAUSTED), ingestion and search (one of them against a paused, i.e. hung,
Weaviate: DEADLINE_EXCEEDED), a search in an unknown tenant, and reranking.
It runs twice: a first pass creates every series, the second is the one measured.
Then, through Prometheus's HTTP API only:

- the request counters moved by exactly what the client saw, per (service, method,
  code); the token counters by exactly the usage the server reported;
- every declared metric has series carrying its declared labels, with the values the
  load implies (stages, Weaviate operations, tenants, adapters, replicas);
- the adapter residency gauge names, per replica, the adapter that replica served
  last, and agrees with what each replica's engine holds;
- vLLM's engine metrics and Ray Serve's built-ins are there, per replica;
- every PromQL expression of every shipped dashboard and alert rule returns data,
  except the ones listed below with the condition this load does not create.

Nothing here passes or fails on speed: waiting for Ray's metrics agent (it reports
every 10 s) and for scrapes is a bounded poll for a condition.
"""

from __future__ import annotations

import math
import re
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from hybridserve.client import HybridServeClient
from hybridserve.observability import metrics as m
from hybridserve.observability.prometheus import PrometheusServer

from tests.unit import test_prometheus_rules as shipped

from .conftest import AFFINITY_APP, MAIN_APP, _free_port, replica_stats

pytestmark = pytest.mark.integration

#: Grafana variables as a dashboard with "All" selected sends them.
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "service": ".*",
    "tenant": ".*",
    "adapter": ".*",
    "replica": ".*",
}

#: Expressions whose metrics this load cannot produce, and why. Each must return
#: nothing here (so this list cannot go stale silently).
NOT_PRODUCED = {
    "rule HybridServeAdapterLoadFailures": (
        "every adapter loads: no ray_hybridserve_adapter_loads_total{outcome=\"error\"} series"
    ),
    "rule HybridServeAdapterReconcileFailing": (
        "the LoRAAdapter controller runs on Kubernetes only; this Prometheus scrapes Ray. "
        "Its series and rule are tested by promtool (deploy/prometheus/rules/tests) and "
        "its metrics against a real controller in tests/integration/test_k8s.py"
    ),
    "hybridserve-engine.json: Preemptions/s": (
        "the KV cache never fills with this load, so vLLM preempts nothing, and its Ray "
        "counter does not export zero increments"
    ),
}
#: Alert expressions that run on real series but whose condition a healthy platform
#: does not meet. Their comparisons turned into `bool` ones (0 or 1 per series) must
#: return data: that proves every series and label they use is there.
NOT_FIRING = {
    "rule HybridServeHighErrorRatio": (
        "one DEADLINE_EXCEEDED (the search against the paused Weaviate) is the only "
        "server-side error; the alert needs > 5% of at least 10 requests of one service "
        "over 5 min (so it may go pending here, but never fires: for 5 min)"
    ),
    "rule HybridServeHighTTFTP99": "the tiny model's p99 time to first token is far below 5 s",
    "rule HybridServeEngineQueueSaturated": "no engine queue ever holds a full batch (16)",
    "rule HybridServeWeaviateUnavailable": (
        "Weaviate is up (paused for one search only); far fewer than half the calls fail"
    ),
    "rule HybridServeReplicaDown": "every deployment is HEALTHY",
    "rule HybridServeQuotaRejectionsSpiking": (
        "one quota rejection, far below 0.2 a second"
    ),
    "rule HybridServeMetricsTargetDown": "Ray's metrics endpoint is up",
}

GOOD_PROMPT = "hello there"
DOCS = [
    {"id": "lighthouse", "title": "Lighthouses",
     "text": "A lighthouse keeper tends the lamp every night so ships find the harbour. " * 6},
    {"id": "bicycle", "title": "Bicycles",
     "text": "A bicycle stays upright because the rider steers into the fall. " * 6},
    {"id": "coffee", "title": "Coffee",
     "text": "Good coffee needs fresh beans, the right grind and water just off the boil. " * 6},
]


# --- Prometheus


@pytest.fixture(scope="module")
def prom(platform, tmp_path_factory) -> PrometheusServer:
    """A real Prometheus scraping the session platform every 2 s, with the shipped rules,
    started by what `hybridserve up --with-prometheus` calls (`start_prometheus`)."""
    from hybridserve.platform import start_prometheus

    config = platform.main.model_copy(deep=True)
    config.data_dir = tmp_path_factory.mktemp("prometheus")
    # NOTE: 2 s, not 1 s: the scrape timeout equals the interval, and Ray's agent
    # takes a moment to render a few thousand series.
    config.observability.prometheus_scrape_interval_s = 2.0
    server = start_prometheus(config, progress=lambda msg: None, port=_free_port())
    try:
        assert server.targets == [f"127.0.0.1:{platform.main.observability.metrics_export_port}"]
        _poll(server.targets_up, "Prometheus's first successful scrape of Ray's metrics port")
        yield server
    finally:
        server.stop()


def _poll(check, what: str, timeout_s: float = 180, every_s: float = 1.0):
    """Calls `check` until it returns something truthy; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f}s")
        time.sleep(every_s)


def _vector(prom: PrometheusServer, expr: str, *labels: str) -> dict[tuple, float]:
    """An instant query as {label values: value}."""
    return {
        tuple(s["metric"].get(k, "") for k in labels): float(s["value"][1])
        for s in prom.query(expr)
    }


#: Counters whose movement the tests compare with what the client saw.
SNAPSHOTS = {
    "requests": ("sum by (service, method, code) (ray_hybridserve_requests_total)",
                 ("service", "method", "code")),
    "prompt_tokens": ("sum by (tenant, adapter) (ray_hybridserve_prompt_tokens_total)",
                      ("tenant", "adapter")),
    "completion_tokens": ("sum by (tenant, adapter) (ray_hybridserve_completion_tokens_total)",
                          ("tenant", "adapter")),
    "generations": ("sum by (tenant, adapter) (ray_hybridserve_generations_total)",
                    ("tenant", "adapter")),
    "ingested": ("sum by (tenant, outcome) (ray_hybridserve_ingest_chunks_total)",
                 ("tenant", "outcome")),
}


def _snapshot(prom) -> dict[str, dict[tuple, float]]:
    return {name: _vector(prom, expr, *labels) for name, (expr, labels) in SNAPSHOTS.items()}


def _delta(after: dict[tuple, float], before: dict[tuple, float]) -> dict[tuple, float]:
    keys = set(after) | set(before)
    out = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in out.items() if v}


# --- the load


@dataclass
class Load:
    """What the client did and saw."""

    start: float = 0.0
    end: float = 0.0
    tenant: str = ""
    #: (service, method, code) -> calls, as the client saw them.
    calls: Counter = field(default_factory=Counter)
    #: (tenant label, adapter label) -> [prompt, completion, generations]
    usage: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    #: app -> [(adapter id, replica id)] in order
    served: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    chunks_written: int = 0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    def ok(self, service: str, method: str, fn, *args, **kwargs):
        """`call`, which must succeed."""
        result = self.call(service, method, fn, *args, **kwargs)
        assert not isinstance(result, grpc.RpcError), f"{method}: {result}"
        return result

    def call(self, service: str, method: str, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except grpc.RpcError as e:
            self.calls[(service, method, e.code().name)] += 1
            return e
        self.calls[(service, method, "OK")] += 1
        return result

    def generate(self, client: HybridServeClient, app: str, adapter: str = "",
                 tenant: str = m.UNKNOWN_TENANT, **kwargs):
        reply = self.call("generation", "Generate", client.generate, GOOD_PROMPT,
                          adapter=adapter, temperature=0, timeout=120, **kwargs)
        if isinstance(reply, grpc.RpcError):
            return reply
        _, _, final = reply
        label = (tenant, adapter or m.BASE_ADAPTER)
        usage = self.usage.setdefault(label, [0, 0, 0])
        usage[0] += final.usage.prompt_tokens
        usage[1] += final.usage.completion_tokens
        usage[2] += 1
        self.served.setdefault(app, []).append((adapter, final.replica_id))
        return final

    def replicas(self, app: str) -> set[str]:
        return {replica for _, replica in self.served.get(app, [])}

    def last_served(self, app: str) -> dict[str, str]:
        """replica -> the adapter it served last."""
        return {replica: adapter for adapter, replica in self.served.get(app, []) if adapter}


def _settle(prom) -> dict:
    """The counters once they stop moving: Ray's agent exports what earlier tests
    recorded up to one report interval (10 s) late."""
    state = {"prev": _snapshot(prom)}

    def stable():
        time.sleep(11)
        current = _snapshot(prom)
        if current == state["prev"]:
            return current
        state["prev"] = current
        return None

    return _poll(stable, "the counters to settle after the earlier tests", timeout_s=120)


def _drive(platform, run: Load) -> None:
    """One pass of the load through every service; `run` records what the client saw."""
    ids = platform.ids
    with HybridServeClient(platform.address, application=MAIN_APP) as client:
        for adapter in ("", ids["alpha"], ids["beta"], ids["gamma"], "", ids["alpha"]):
            final = run.generate(client, MAIN_APP, adapter, max_tokens=8)
            assert not isinstance(final, grpc.RpcError), final
        bad = run.generate(client, MAIN_APP, max_tokens=0)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        unknown = run.generate(client, MAIN_APP, "nobody@v0", max_tokens=4)
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        run.ok("generation", "ListAdapters", client.list_adapters)

        # One slot per replica, two replicas, three adapters: loads and evictions.
        with HybridServeClient(platform.address, application=AFFINITY_APP) as affinity:
            for name in ("alpha", "beta", "gamma", "alpha", "beta", "gamma"):
                final = run.generate(affinity, AFFINITY_APP, ids[name], max_tokens=6)
                assert not isinstance(final, grpc.RpcError), final

        created = run.ok("admin", "CreateTenant", client.create_tenant, run.tenant, allow_base=True)
        assert created.created
        key = run.ok("admin", "CreateKey", client.create_key, run.tenant, name="obs").secret
        run.ok("admin", "SetQuotas", client.set_quotas, run.tenant, requests_per_minute=2)
        # The tenant's own key: its tokens carry its id; its bucket holds one request.
        with HybridServeClient(platform.address, application=MAIN_APP, api_key=key) as tenant:
            final = run.generate(tenant, MAIN_APP, tenant=run.tenant, max_tokens=4)
            assert not isinstance(final, grpc.RpcError), final
            limited = run.call("retrieval", "Search", tenant.search, "", "lighthouse")
            assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, limited
        reply = run.ok("retrieval", "Upsert", client.upsert, run.tenant, DOCS)
        assert not reply.failures
        run.chunks_written = reply.chunks_written
        for query in ("lighthouse keeper", "why does a bicycle stay upright", "coffee beans"):
            assert run.ok("retrieval", "Search", client.search, run.tenant, query, top_k=3)
        missing = run.call("retrieval", "Search", client.search, "obs-nobody", "x")
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        # A hung Weaviate: the search fails server-side, and Weaviate counts an error.
        # NOTE: up to 3 tries, every call counted: once in ~7 full runs a search
        # against the SIGSTOPped server came back OK (not understood; see the note
        # of issue 5). The accounting below stays exact either way.
        for attempt in range(3):
            platform.weaviate.pause()
            try:
                hung = run.call("retrieval", "Search", client.search, run.tenant, "lighthouse")
            finally:
                platform.weaviate.resume()
            if isinstance(hung, grpc.RpcError):
                break
            warnings.warn(f"a search against the paused Weaviate succeeded (try {attempt + 1})",
                          stacklevel=1)
        assert isinstance(hung, grpc.RpcError), "3 searches against a paused Weaviate succeeded"
        assert hung.code() == grpc.StatusCode.DEADLINE_EXCEEDED, hung
        # Leave retrieval working for the tests that follow (the store reconnects).
        _poll(lambda: not isinstance(
            run.call("retrieval", "Search", client.search, run.tenant, "lighthouse"),
            grpc.RpcError), "search to work again after Weaviate resumed", timeout_s=60)

        passages = [d["text"] for d in DOCS]
        for query in ("lighthouse", "coffee"):
            assert run.ok("rerank", "Rerank", client.rerank, query, passages).results
        empty = run.call("rerank", "Rerank", client.rerank, "query", [])
        assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def load(platform, prom) -> Load:
    # NOTE: a first pass makes every series exist in Prometheus before the measured
    # one: a counter series that first appears already holding its increments shows
    # no increase, so rate() and the quotients and quantiles built on it would be
    # empty even though the metrics work.
    warm = Load(tenant=f"obs-warm-{uuid.uuid4().hex[:8]}")
    run = Load(tenant=f"obs-{uuid.uuid4().hex[:8]}")
    try:
        _drive(platform, warm)
        run.before = _settle(prom)
        run.start = time.time()
        _drive(platform, run)
        run.end = time.time()
        _await_counts(prom, run)
        yield run
    finally:
        with HybridServeClient(platform.address) as client:
            for tenant in (warm.tenant, run.tenant):
                try:
                    client.delete_tenant(tenant)
                except grpc.RpcError:
                    pass  # never created: the pass failed before


def _await_counts(prom, run: Load) -> None:
    """Waits until Prometheus shows the pass's calls, tokens and chunks (bounded)."""
    expected = {
        "requests": {k: float(v) for k, v in run.calls.items()},
        "completion_tokens": {k: float(u[1]) for k, u in run.usage.items() if u[1]},
        "ingested": {(run.tenant, "written"): float(run.chunks_written)},
    }
    seen = {}

    def all_counted():
        after = _snapshot(prom)
        seen.update({k: _delta(after[k], run.before[k]) for k in expected})
        return after if seen == expected else None

    # Bounded: Ray's agent reports every 10 s, Prometheus scrapes every 2 s. The
    # tests below compare exactly; this only waits until the counts arrived.
    try:
        run.after = _poll(all_counted, "Prometheus to show every call of the load",
                          timeout_s=120)
    except AssertionError as e:
        raise AssertionError(f"{e}\nexpected deltas: {expected}\nlast seen: {seen}") from None


def _range_has_data(prom, expr: str, load: Load) -> bool:
    """True if the expression has at least one finite value from the load's start to now."""
    result = prom.query_range(expr, load.start, time.time(), 2)
    return any(math.isfinite(float(v)) for s in result for _, v in s["values"])


def _eventually(check, timeout_s: float = 45) -> bool:
    """`check` is true now or within timeout_s. Gauges set only while work runs (vLLM's
    running/waiting/KV cache, Serve's batch queue length) reach Prometheus with Ray's
    next metrics report (every 10 s), which may come after the load's last call."""
    try:
        return bool(_poll(check, "data", timeout_s=timeout_s, every_s=2))
    except AssertionError:
        return False


def _series(prom, name: str, load: Load) -> list[dict[str, str]]:
    return prom.series(name, load.start - 60, time.time())


# --- the tests


def test_requests_are_counted_by_service_method_and_code(load):
    counted = _delta(load.after["requests"], load.before["requests"])
    assert counted == {k: float(v) for k, v in load.calls.items()}
    # The load covers every service and the codes the issue names.
    codes = {(s, c) for s, _, c in counted}
    assert {("generation", "OK"), ("generation", "INVALID_ARGUMENT"),
            ("generation", "NOT_FOUND"), ("retrieval", "OK"), ("retrieval", "NOT_FOUND"),
            ("retrieval", "DEADLINE_EXCEEDED"), ("retrieval", "RESOURCE_EXHAUSTED"),
            ("rerank", "OK"), ("rerank", "INVALID_ARGUMENT"), ("admin", "OK")} <= codes


def test_tokens_and_generations_by_tenant_and_adapter(load, platform):
    for name, index in (("prompt_tokens", 0), ("completion_tokens", 1), ("generations", 2)):
        counted = _delta(load.after[name], load.before[name])
        expected = {k: float(u[index]) for k, u in load.usage.items() if u[index]}
        assert counted == expected, name
    # The base model and every adapter, under the ids they were registered as; the
    # admin key's generations have no tenant, the tenant key's carry its id.
    assert {a for _, a in load.usage} == {"base", *platform.ids.values()}
    assert {t for t, _ in load.usage} == {"unknown", load.tenant}


def test_ingested_chunks_by_tenant(load):
    written = _delta(load.after["ingested"], load.before["ingested"])
    assert written == {(load.tenant, "written"): float(load.chunks_written)}
    assert load.chunks_written > 0


def test_every_declared_metric_has_series_with_its_labels(prom, load, platform):
    generation_replicas = load.replicas(MAIN_APP) | load.replicas(AFFINITY_APP)
    seen: dict[str, list[dict]] = {}
    for spec in m.METRICS:
        name = spec.series_names()[0]
        series = _series(prom, name, load)
        assert series, f"no series for {name}"
        for s in series:
            missing = [k for k in spec.labels if not s.get(k)]
            assert not missing, f"{name} lacks labels {missing}: {s}"
        seen[spec.name] = series

    def values(spec, *labels):
        return {tuple(s[k] for k in labels) for s in seen[spec.name]}

    assert {("generation", "first_token"), ("generation", "total"), ("retrieval", "embed"),
            ("retrieval", "retrieve"), ("retrieval", "total"), ("rerank", "rerank"),
            ("rerank", "total")} <= values(m.STAGE_DURATION, "service", "stage")
    ids = set(platform.ids.values())
    loaded = {a for a, o in values(m.ADAPTER_LOADS, "adapter", "outcome") if o == "ok"}
    assert ids <= loaded
    assert values(m.ADAPTER_LOAD_DURATION, "outcome") >= {("ok",)}
    assert {a for (a,) in values(m.ADAPTER_EVICTIONS, "adapter")} & ids
    for spec in (m.ENGINE_WAITING, m.ENGINE_RUNNING, m.ENGINE_CAPACITY):
        assert generation_replicas <= {r for (r,) in values(spec, "replica")}, spec.name
    assert {("create_tenant", "ok"), ("document_versions", "ok"), ("write", "ok"),
            ("search", "ok"), ("search", "error"), ("health", "ok")} <= values(
        m.WEAVIATE_REQUESTS, "op", "outcome")
    assert {"search", "write"} <= {op for (op,) in values(m.WEAVIATE_DURATION, "op")}
    assert (load.tenant, "written") in values(m.INGEST_CHUNKS, "tenant", "outcome")
    assert {"unknown", load.tenant} <= {t for t, _ in values(m.GENERATIONS, "tenant", "adapter")}
    assert (load.tenant, "requests") in values(m.QUOTA_REJECTIONS, "tenant", "quota")
    assert ("retrieval", "auth") in values(m.STAGE_DURATION, "service", "stage")
    assert ("retrieval", "quota") in values(m.STAGE_DURATION, "service", "stage")


def test_engine_gauges_report_each_replicas_queue(prom, load, platform):
    for app, cfg in ((MAIN_APP, platform.main), (AFFINITY_APP, platform.affinity)):
        for replica in load.replicas(app):
            sel = f'{{replica="{replica}"}}'
            capacity = _poll(lambda sel=sel: prom.query(
                f"max(ray_hybridserve_engine_max_running_requests{sel})"), "engine capacity")
            assert float(capacity[0]["value"][1]) == cfg.engine.max_num_seqs
            # The load is over: the sampler reports an idle engine (bounded wait
            # for the next sample to be exported).
            _poll(lambda sel=sel: _vector(
                prom, f"max(ray_hybridserve_engine_running_requests{sel}) + "
                      f"max(ray_hybridserve_engine_waiting_requests{sel})") == {(): 0.0},
                  f"replica {replica} to report an idle engine")


def _resident(prom) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in prom.query("max by (replica, adapter) (ray_hybridserve_adapter_resident) == 1"):
        out.setdefault(s["metric"]["replica"], set()).add(s["metric"]["adapter"])
    return out


def test_adapter_residency_follows_the_replicas_that_served_them(prom, load, platform):
    (main_replica,) = load.replicas(MAIN_APP)
    expected_affinity = {r: {a} for r, a in load.last_served(AFFINITY_APP).items()}

    # The main replica keeps max_loras of the 3 adapters (what one batch can hold).
    expected_main = set(replica_stats(MAIN_APP)["resident_adapters"])
    assert expected_main <= set(platform.ids.values())
    assert len(expected_main) == platform.main.engine.max_loras

    def matches():
        resident = _resident(prom)
        ok = resident.get(main_replica) == expected_main and all(
            resident.get(r) == adapters for r, adapters in expected_affinity.items()
        )
        return resident if ok else None

    resident = _poll(matches, "the residency gauge to show where the adapters were served")
    # And it agrees with what each replica's engine holds, for every replica of the two
    # apps it names (other apps' engines, such as SmolLM2's, serve their own adapters).
    for replica, adapters in resident.items():
        if replica != main_replica and replica not in expected_affinity:
            continue
        app = MAIN_APP if replica == main_replica else AFFINITY_APP
        stats = replica_stats(app, next(iter(adapters)), replica)
        assert set(stats["resident_adapters"]) == adapters, replica


def test_weaviate_up_is_reported_by_the_retrieval_replica(prom, load):
    # Serve runs the probe every 10 s as the replica's health check; Weaviate is back.
    _poll(lambda: _vector(prom, "min(ray_hybridserve_weaviate_up)") == {(): 1.0},
          "weaviate_up to be 1 again after the pause")


def test_vllm_and_serve_builtin_metrics_are_exported(prom, load):
    replicas = load.replicas(MAIN_APP) | load.replicas(AFFINITY_APP)
    for name in ("ray_vllm_generation_tokens_total", "ray_vllm_prompt_tokens_total",
                 "ray_vllm_request_success_total", "ray_vllm_e2e_request_latency_seconds_bucket"):
        by_replica = {s.get("ReplicaId") for s in _series(prom, name, load)}
        assert replicas <= by_replica, name
    apps = {s.get("application") for s in _series(prom, "ray_serve_num_grpc_requests_total", load)}
    assert {MAIN_APP, AFFINITY_APP, "retrieval", "rerank"} <= apps


def test_dashboard_variables_offer_what_the_load_produced(prom, load, platform):
    """Each dashboard's template variables, resolved as Grafana does (label_values of
    the variable's selector), offer the tenants, adapters, replicas and services the
    load used: a panel filtered by any of them can be selected."""
    replicas = load.replicas(MAIN_APP) | load.replicas(AFFINITY_APP)
    wanted = {
        ("hybridserve-overview.json", "service"): {"generation", "retrieval", "rerank", "admin"},
        ("hybridserve-tenants.json", "tenant"): {"unknown", load.tenant},
        ("hybridserve-tenants.json", "adapter"): {"base", *platform.ids.values()},
        ("hybridserve-engine.json", "replica"): replicas,
        ("hybridserve-retrieval.json", "tenant"): {load.tenant},
    }
    offered = {}
    for name, dash in shipped._dashboards().items():
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"]
            label = re.fullmatch(r"label_values\(.+,\s*(\w+)\)", query.strip()).group(1)
            selector = shipped._substitute(shipped._label_values_selector(query), VARIABLES)
            offered[(name, var["name"])] = {
                s[label] for s in _series(prom, selector, load) if label in s
            }
    assert set(offered) == set(wanted), "a dashboard variable without an expectation here"
    missing = {k: sorted(v - offered[k]) for k, v in wanted.items() if v - offered[k]}
    assert not missing, missing


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


def _with_bool(expr: str) -> str:
    """The expression with every comparison made a `bool` one (0 or 1 per series)."""
    masked = re.sub(r'\{[^}]*\}|"(?:[^"\\]|\\.)*"', lambda mm: "#" * len(mm.group()), expr)
    out, last = [], 0
    for match in _COMPARISON.finditer(masked):
        if re.match(r"\s*bool\b", masked[match.end():]):
            continue
        out.append(expr[last:match.end()] + " bool")
        last = match.end()
    return "".join(out) + expr[last:]


def test_with_bool():
    assert _with_bool('a{x="1", y!="2"} > 0.5 and on (s) b >= 10') == (
        'a{x="1", y!="2"} > bool 0.5 and on (s) b >= bool 10'
    )
    assert _with_bool("up == bool 0") == "up == bool 0"


def test_every_dashboard_and_alert_expression_returns_data(prom, load):
    expressions = shipped._expressions(VARIABLES)
    wheres = {where for where, _ in expressions}
    assert set(NOT_PRODUCED) <= wheres and set(NOT_FIRING) <= wheres, "stale exceptions"
    problems = []
    for where, expr in expressions:
        has_data = _range_has_data(prom, expr, load)
        if where in NOT_PRODUCED:
            if has_data:
                problems.append(f"{where}: listed as not produced, but returns data: {expr}")
        elif where in NOT_FIRING:
            if not _eventually(lambda expr=expr: _range_has_data(prom, _with_bool(expr), load)):
                problems.append(f"{where}: no data even as a bool comparison: {_with_bool(expr)}")
        elif not has_data and not _eventually(lambda expr=expr: _range_has_data(prom, expr, load)):
            problems.append(f"{where}: no data: {expr}")
    assert not problems, "\n".join(problems)


def test_prometheus_evaluates_every_shipped_rule(prom, load):
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {
        r.get("alert") or r.get("record") for r in shipped._load_rules()
    }
    _poll(lambda: all(r.get("lastEvaluation", "").startswith("20") for r in
                      (rr for g in prom.api("rules")["groups"] for rr in g["rules"])),
          "every rule to be evaluated")
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken
    # A healthy platform under this load fires nothing.
    assert not [r["name"] for r in rules if r.get("state") == "firing"]


def test_a_request_id_is_echoed_and_logged_by_every_stage_of_a_search(platform):
    """The request id a client sends (`request_id` metadata) comes back in the trailing
    metadata, and Serve's access log of every stage the search crosses (the gRPC
    proxy, the RetrievalService replica, the Embedder replica it calls through a
    handle) carries it: one id follows the request through the logs."""
    from pathlib import Path

    import ray
    from hybridserve.v1 import retrieval_pb2, retrieval_pb2_grpc

    request_id = f"trace-{uuid.uuid4().hex}"
    tenant = f"trace-{uuid.uuid4().hex[:8]}"
    with HybridServeClient(platform.address) as client:
        client.create_tenant(tenant)
        try:
            client.upsert(tenant, DOCS[:1])
            with grpc.insecure_channel(platform.address) as channel:
                stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
                # alpha 1: the query is embedded, so the Embedder is a stage.
                reply, call = stub.Search.with_call(
                    retrieval_pb2.SearchRequest(tenant=tenant, query="lighthouse", alpha=1.0),
                    metadata=[("application", "retrieval"), ("request_id", request_id),
                              ("authorization", f"Bearer {platform.admin_key}")],
                    timeout=60,
                )
        finally:
            client.delete_tenant(tenant)
    assert reply.hits
    assert ("request_id", request_id) in tuple(call.trailing_metadata())

    serve_logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def stages_that_logged_it():
        found = set()
        for path in serve_logs.glob("*.log"):
            if request_id in path.read_text(errors="replace"):
                name = path.name
                found.add("proxy" if name.startswith("proxy_") else name.split("_")[2])
        return found if {"proxy", "RetrievalService", "Embedder"} <= found else None

    # Serve writes its logs through a buffer: a bounded wait, not a timing assertion.
    _poll(stages_that_logged_it, "every stage's log to show the request id", timeout_s=60)
