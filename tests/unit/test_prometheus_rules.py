"""deploy/prometheus and deploy/grafana: the config, the alert rules and their promtool
unit tests pass; every PromQL expression (rules, dashboard panels, dashboard variables)
parses; every metric they use is declared in observability/metrics.py or is a known
built-in; and the dashboards are exactly what deploy/grafana/generate.py produces.

promtool comes from Debian's `prometheus` package, which scripts/install.sh installs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybridserve.observability import metrics as m

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
CONFIG = PROM / "prometheus.yml"
RULES = PROM / "rules" / "hybridserve.yml"
RULE_TESTS = PROM / "rules" / "tests" / "hybridserve_test.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's 'prometheus' package (scripts/install.sh "
    "does) to check the Prometheus config, rules and PromQL",
)

#: The alerts the observability issue asks for (more may exist).
REQUIRED_ALERTS = {
    "HybridServeHighErrorRatio",
    "HybridServeHighTTFTP99",
    "HybridServeEngineQueueSaturated",
    "HybridServeAdapterLoadFailures",
    "HybridServeWeaviateUnavailable",
    "HybridServeQuotaRejectionsSpiking",
    "HybridServeReplicaDown",
}


def _serve(path: str, declared_as: str) -> tuple[str, str, str]:
    return ("ray", f"serve/{path}", declared_as)


def _vllm(name: str) -> tuple[str, str, str]:
    return ("vllm", "v1/metrics/loggers.py", f'"{name}"')


_STATE = "_private/deployment_state.py"
_INGRESS = "_private/request_ingress_metrics.py"

#: Metrics that dashboards and rules may use besides hybridserve's own, with where each
#: is declared: (package, file in the package, the name as written there). Ray's agent
#: exports `serve_x` as `ray_serve_x` and vLLM's `vllm:x` (through
#: vllm.v1.metrics.ray_wrappers.RayPrometheusStatLogger) as `ray_vllm_x`; counters gain
#: `_total`, histograms are queried through `_bucket`.
BUILTIN_METRICS: dict[str, tuple[str, str, str] | None] = {
    # Prometheus itself: the scrape health of every target, and alert state.
    "up": None,
    "ALERTS": None,
    # Ray Serve: the controller.
    "ray_serve_deployment_status": _serve(_STATE, '"serve_deployment_status"'),
    "ray_serve_deployment_replica_healthy": _serve(_STATE, '"serve_deployment_replica_healthy"'),
    # Ray Serve: the gRPC proxy (protocol_name is "grpc").
    "ray_serve_num_grpc_requests_total": _serve(_INGRESS, 'f"serve_num_{protocol_name}_requests"'),
    "ray_serve_grpc_request_latency_ms_bucket": _serve(
        _INGRESS, 'f"serve_{protocol_name}_request_latency_ms"'
    ),
    # Ray Serve: replicas, multiplexing (adapters) and @serve.batch (rerank).
    "ray_serve_replica_processing_queries": _serve(
        "_private/replica.py", '"serve_replica_processing_queries"'
    ),
    "ray_serve_deployment_processing_latency_ms_bucket": _serve(
        "_private/replica.py", '"serve_deployment_processing_latency_ms"'
    ),
    "ray_serve_num_multiplexed_models": _serve("multiplex.py", '"serve_num_multiplexed_models"'),
    "ray_serve_actual_batch_size_bucket": _serve("batching.py", '"serve_actual_batch_size"'),
    "ray_serve_batch_queue_length": _serve("batching.py", '"serve_batch_queue_length"'),
    # vLLM's engine metrics.
    "ray_vllm_num_requests_running": _vllm("vllm:num_requests_running"),
    "ray_vllm_num_requests_waiting": _vllm("vllm:num_requests_waiting"),
    "ray_vllm_kv_cache_usage_perc": _vllm("vllm:kv_cache_usage_perc"),
    "ray_vllm_time_to_first_token_seconds_bucket": _vllm("vllm:time_to_first_token_seconds"),
    "ray_vllm_inter_token_latency_seconds_bucket": _vllm("vllm:inter_token_latency_seconds"),
    "ray_vllm_e2e_request_latency_seconds_bucket": _vllm("vllm:e2e_request_latency_seconds"),
    "ray_vllm_request_queue_time_seconds_bucket": _vllm("vllm:request_queue_time_seconds"),
    "ray_vllm_prompt_tokens_total": _vllm("vllm:prompt_tokens"),
    "ray_vllm_generation_tokens_total": _vllm("vllm:generation_tokens"),
    "ray_vllm_request_success_total": _vllm("vllm:request_success"),
    "ray_vllm_num_preemptions_total": _vllm("vllm:num_preemptions"),
}

#: Concrete values for Grafana's variables, so dashboard queries can be parsed.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _load_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in _load_rules() if "alert" in rule}


def _dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


def _substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replaces Grafana variables ($x, ${x}, [[x]]) with concrete values: `variables`
    (default GRAFANA_VARIABLES), and "x" for any other."""
    variables = GRAFANA_VARIABLES if variables is None else variables

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return variables.get(name, "x")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def _label_values_selector(query: str) -> str:
    """The series selector in a Grafana `label_values(selector, label)` query."""
    match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
    assert match, f"not a label_values(selector, label) query: {query}"
    return match.group(1)


def _expressions(variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) for every rule, dashboard target and dashboard variable query.

    `where` is "rule NAME", "FILE: PANEL TITLE" or "FILE: variable NAME"; a panel
    with several targets appears once per target. Grafana variables are replaced
    as `_substitute` does with `variables`.
    """
    out = [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in _load_rules()]
    for name, dash in _dashboards().items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{name}: {panel['title']}", _substitute(target["expr"], variables)))
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                selector = _label_values_selector(var["query"]["query"])
                out.append((f"{name}: variable {var['name']}", _substitute(selector, variables)))
    return out


#: Words in PromQL that look like metric names but are not.
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_NOT_METRICS |= {"and", "or", "unless", "offset", "bool", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a small tokenizer, enough for ours)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:ms|[smhdwy])?\b", " ", s)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", s):
        if s[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match.group(0).lower() not in _NOT_METRICS:
            names.add(match.group(0))
    return names


# --- promtool


@needs_promtool
def test_prometheus_config_is_valid():
    out = _promtool("check", "config", str(CONFIG.relative_to(ROOT)))
    assert out.returncode == 0, out.stdout + out.stderr
    # The config loads the rules, so this also proves the rule_files glob finds them.
    assert "1 rule files found" in out.stdout + out.stderr


@needs_promtool
def test_rules_are_valid():
    out = _promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_rule_unit_tests_pass():
    out = _promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_every_promql_expression_parses(tmp_path):
    """Every expression becomes a recording rule; `promtool check rules` parses them all."""
    expressions = _expressions()
    rules = [
        {"record": f"hybridserve_check:expr_{i}", "expr": expr}
        for i, (_, expr) in enumerate(expressions)
    ]
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse-check", "rules": rules}]}))
    out = _promtool("check", "rules", str(path))
    index = "\n".join(f"expr_{i}: {where}: {e}" for i, (where, e) in enumerate(expressions))
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{index}"


# --- the rules


def test_required_alerts_exist_and_are_documented():
    alerts = _alerts()
    assert REQUIRED_ALERTS <= set(alerts), REQUIRED_ALERTS - set(alerts)
    for name, rule in alerts.items():
        assert name.startswith("HybridServe"), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert rule.get("for"), f"{name}: give it a `for:` so one bad scrape does not fire it"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == ["../hybridserve.yml"]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts <= fires, f"no test where these fire: {alerts - fires}"
    assert alerts <= quiet, f"no test where these stay quiet: {alerts - quiet}"
    assert fires | quiet <= alerts, f"tests for unknown alerts: {(fires | quiet) - alerts}"


# --- metric names


def _controller_metrics() -> set[str]:
    """The LoRAAdapter controller's own metrics (prometheus-client, no `ray_` prefix),
    as its registry exposes them."""
    from hybridserve.controller.main import Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {f.name + sfx for f in Metrics().registry.collect() for sfx in suffixes[f.type]}


def test_every_metric_used_is_declared_or_a_known_builtin():
    declared = {name for spec in m.METRICS for name in spec.series_names()}
    declared |= _controller_metrics()
    assert not declared & set(BUILTIN_METRICS)
    unknown = {}
    for where, expr in _expressions():
        for name in _metric_names(expr):
            if name not in declared and name not in BUILTIN_METRICS:
                unknown.setdefault(name, where)
    assert not unknown, f"metrics neither declared in metrics.py nor allow-listed: {unknown}"


def test_label_matchers_on_hybridserve_metrics_use_declared_labels():
    labels = {}
    for spec in m.METRICS:
        extra = {"le"} if spec.kind is m.Kind.HISTOGRAM else set()
        for name in spec.series_names():
            labels[name] = set(spec.labels) | extra
    for where, expr in _expressions():
        for metric, matchers in re.findall(r"(ray_hybridserve_\w+)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert used <= labels[metric], f"{where}: {metric} has no label {used - labels[metric]}"


def test_the_metric_name_extractor():
    expr = (
        'histogram_quantile(0.99, sum by (service, le) (rate(ray_hybridserve_stage_duration_'
        'seconds_bucket{stage="first_token"}[5m]))) > 5 and on (service) '
        'max(up{job="x"}) or vector(0) > 3 * rate(ALERTS[1h] offset 5m)'
    )
    assert _metric_names(expr) == {"ray_hybridserve_stage_duration_seconds_bucket", "up", "ALERTS"}


@pytest.mark.parametrize("name", sorted(n for n, src in BUILTIN_METRICS.items() if src))
def test_builtin_metrics_exist_in_the_installed_packages(name):
    """Each allow-listed Ray Serve / vLLM metric is still declared where we say."""
    package, rel_path, declared_as = BUILTIN_METRICS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None:
        pytest.skip(f"{package} is not installed")
    source = Path(next(iter(spec.submodule_search_locations))) / rel_path
    assert declared_as in source.read_text(), f"{declared_as} not found in {source}"


def test_vllm_metrics_reach_ray_under_sanitized_names():
    """vLLM's Ray stat logger replaces ':' (so vllm:x is exported as ray_vllm_x)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vllm is not installed")
    wrappers = Path(next(iter(spec.submodule_search_locations))) / "v1/metrics/ray_wrappers.py"
    text = wrappers.read_text()
    assert "class RayPrometheusStatLogger" in text
    assert "_get_sanitized_opentelemetry_name" in text


# --- dashboards


def _generator():
    """deploy/grafana/generate.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_dashboards_are_the_generators_output():
    built = _generator().build()
    assert {p.name for p in DASHBOARDS} == set(built), "dashboards/ and generate.py disagree"
    for name, text in built.items():
        assert (GRAFANA / "dashboards" / name).read_text() == text, (
            f"{name} is stale: run python deploy/grafana/generate.py"
        )


def test_four_dashboards_with_the_expected_variables():
    dashboards = _dashboards()
    assert len(dashboards) == 4
    variables = {
        d["uid"]: {v["name"]: v for v in d["templating"]["list"]} for d in dashboards.values()
    }
    assert set(variables) == {
        "hybridserve-overview",
        "hybridserve-tenants",
        "hybridserve-engine",
        "hybridserve-retrieval",
    }
    for uid, found in variables.items():
        ds = found["datasource"]
        assert (ds["type"], ds["query"]) == ("datasource", "prometheus"), uid
    tenants = variables["hybridserve-tenants"]
    for name in ("tenant", "adapter"):
        assert tenants[name]["query"]["query"].startswith("label_values("), name
        assert tenants[name]["multi"] and tenants[name]["includeAll"], name
    assert '$tenant' in tenants["adapter"]["query"]["query"], "adapters follow the tenant"


def test_every_panel_queries_the_datasource_variable():
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for name, dash in _dashboards().items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in dash["panels"]:
            if panel["type"] == "row":  # rows only group panels; they query nothing
                assert "targets" not in panel, (name, panel["title"])
                continue
            assert panel["datasource"] == ds, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == ds, (name, panel["title"])
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"] == ds, (name, var["name"])
