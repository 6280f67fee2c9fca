"""The metrics module: names follow Prometheus conventions, helpers pass exactly the
declared labels, cardinality stays bounded, and nothing needs Ray to be initialised."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hybridserve import observability as obs
from hybridserve.observability import metrics as m

_NAME = re.compile(r"^hybridserve_[a-z][a-z0-9_]*[a-z0-9]$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
#: Labels Ray's exporter adds itself; declaring them would clash.
_RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "le"}


def _calls(made, spec):
    return made[spec.name].calls if spec.name in made else []


# --- declarations


def test_names_follow_prometheus_conventions():
    names = [spec.name for spec in m.METRICS]
    assert len(names) == len(set(names)), "a metric is declared twice"
    for spec in m.METRICS:
        assert _NAME.match(spec.name), spec.name
        assert spec.description.strip(), spec.name
        if spec.kind is m.Kind.COUNTER:
            assert spec.name.endswith("_total"), spec.name
        else:
            assert not spec.name.endswith("_total"), spec.name
        if spec.kind is m.Kind.HISTOGRAM:
            # Base units: every histogram here measures time, in seconds.
            assert spec.name.endswith("_seconds"), spec.name
            assert spec.buckets, spec.name
            assert list(spec.buckets) == sorted(set(spec.buckets)), spec.name
            assert spec.buckets[0] > 0, spec.name
        else:
            assert not spec.buckets, spec.name
        for unit in ("_milliseconds", "_ms", "_minutes", "_bytes_total_bytes"):
            assert unit not in spec.name, spec.name
        assert spec.exported_name == "ray_" + spec.name
        assert not spec.exported_name.endswith("_total_total")


def test_labels_are_fixed_and_low_cardinality():
    forbidden = {"request_id", "prompt", "api_key", "document", "doc_id", "query", "text"}
    for spec in m.METRICS:
        assert len(spec.labels) == len(set(spec.labels)), spec.name
        for label in spec.labels:
            assert _LABEL.match(label), (spec.name, label)
            assert label not in _RAY_LABELS, (spec.name, label)
            assert label not in forbidden, (spec.name, label)
        assert len(spec.labels) <= 3, f"{spec.name}: keep label sets small"
    # Histograms multiply series by their buckets: no tenant/adapter on them.
    for spec in m.METRICS:
        if spec.kind is m.Kind.HISTOGRAM:
            assert not {"tenant", "adapter", "replica"} & set(spec.labels), spec.name


def test_every_declared_metric_is_recorded_by_some_helper(fake):
    obs.record_request("rag", "Ask", "OK")
    obs.observe_stage("auth", 0.001, service="rag")
    obs.record_tokens("acme", "tone@1", 10, 5)
    obs.adapter_loaded("tone@1", 0.3, ok=True)
    obs.adapter_evicted("tone@1")
    obs.set_resident("r1", "tone@1", True)
    obs.set_engine_load("r1", waiting=1, running=2, capacity=32)
    obs.quota_rejected("acme", "tokens")
    obs.ingest_chunks("acme", written=3, failed=1)
    obs.weaviate_call("search", 0.01, ok=True)
    obs.set_weaviate_up("r2", True)
    assert set(fake) == {spec.name for spec in m.METRICS}


# --- helpers


def test_request_and_stage_labels(fake):
    import grpc

    obs.record_request("generation", "Generate", grpc.StatusCode.NOT_FOUND)
    obs.record_request("generation", "Generate", None)
    obs.record_request("nonsense", "Generate", "not-a-code")
    codes = [tags for _, _, tags in _calls(fake, m.REQUESTS)]
    assert codes == [
        {"service": "generation", "method": "Generate", "code": "NOT_FOUND"},
        {"service": "generation", "method": "Generate", "code": "OK"},
        {"service": "other", "method": "Generate", "code": "UNKNOWN"},
    ]

    with obs.stage_timer("retrieve", service="rag") as timing:
        pass
    with pytest.raises(RuntimeError), obs.stage_timer("rerank", service="rag"):
        raise RuntimeError("boom")
    obs.observe_stage("made-up", -1.0, service="rag")
    stages = _calls(fake, m.STAGE_DURATION)
    assert [tags["stage"] for _, _, tags in stages] == ["retrieve", "rerank", "other"]
    assert stages[0][1] == timing.seconds >= 0
    assert stages[2][1] == 0.0  # negative durations are clamped


def test_tokens_use_fixed_fallbacks(fake):
    obs.record_tokens(None, None, 7, 0)
    (gen,) = _calls(fake, m.GENERATIONS)
    assert gen[2] == {"tenant": "unknown", "adapter": "base"}
    assert [c[1] for c in _calls(fake, m.PROMPT_TOKENS)] == [7]
    assert _calls(fake, m.COMPLETION_TOKENS) == []  # Ray rejects zero increments


def test_adapter_and_ingest_outcomes(fake):
    obs.adapter_loaded("tone@1", 0.2, ok=False)
    assert _calls(fake, m.ADAPTER_LOADS)[0][2] == {"adapter": "tone@1", "outcome": "error"}
    assert _calls(fake, m.ADAPTER_LOAD_DURATION)[0][2] == {"outcome": "error"}
    obs.ingest_chunks("acme", written=4, failed=0)
    assert [(c[1], c[2]["outcome"]) for c in _calls(fake, m.INGEST_CHUNKS)] == [(4, "written")]


def test_weaviate_timer_counts_errors(fake):
    with obs.weaviate_timer("write"):
        pass
    with pytest.raises(ConnectionError), obs.weaviate_timer("search"):
        raise ConnectionError("down")
    outcomes = [(c[2]["op"], c[2]["outcome"]) for c in _calls(fake, m.WEAVIATE_REQUESTS)]
    assert outcomes == [("write", "ok"), ("search", "error")]
    assert len(_calls(fake, m.WEAVIATE_DURATION)) == 2


def test_gauges_are_refreshed_until_released(fake):
    obs.set_resident("r1", "tone@1", True)
    obs.set_resident("r1", "json@2", True)
    obs.set_resident("r1", "json@2", False)  # evicted: set to 0 once, then not refreshed
    m._REGISTRY.refresh()
    sets = [(c[1], c[2]["adapter"]) for c in _calls(fake, m.ADAPTER_RESIDENT)]
    assert sets == [(1.0, "tone@1"), (1.0, "json@2"), (0.0, "json@2"), (1.0, "tone@1")]


def test_a_released_replica_drops_its_gauges_to_zero_and_stops_refreshing(fake):
    obs.set_resident("r1", "tone@1", True)
    obs.set_engine_load("r1", waiting=2, running=3, capacity=8)
    obs.set_weaviate_up("r2", True)
    obs.release_replica("r1")
    for metric in fake.values():
        metric.calls.clear()
    m._REGISTRY.refresh()
    # Only the other replica's gauge is still refreshed.
    refreshed = [(spec.name, c[2]) for spec in m.METRICS for c in _calls(fake, spec)]
    assert refreshed == [(m.WEAVIATE_UP.name, {"replica": "r2"})]


def test_releasing_sets_each_series_of_the_replica_to_zero(fake):
    obs.set_resident("r1", "tone@1", True)
    obs.set_engine_load("r1", waiting=2, running=3, capacity=8)
    obs.release_replica("r1")
    last = {}
    for spec in (m.ADAPTER_RESIDENT, m.ENGINE_WAITING, m.ENGINE_RUNNING, m.ENGINE_CAPACITY):
        last[spec.name] = _calls(fake, spec)[-1][1]
    assert set(last.values()) == {0.0}


def test_label_values_are_capped(fake, monkeypatch, caplog):
    monkeypatch.setattr(m, "MAX_LABEL_VALUES", 3)
    for i in range(5):
        obs.record_tokens(f"tenant-{i}", None, 1, 1)
    tenants = [c[2]["tenant"] for c in _calls(fake, m.GENERATIONS)]
    assert tenants == ["tenant-0", "tenant-1", "tenant-2", "other", "other"]
    assert "tenant" in caplog.text and "unbounded" in caplog.text


def test_disabled_records_nothing(fake):
    obs.set_enabled(False)
    try:
        assert not obs.is_enabled()
        obs.record_request("rag", "Ask", "OK")
        with obs.stage_timer("total", service="rag") as timing:
            pass
        obs.set_engine_load("r1", waiting=0, running=0, capacity=1)
        m._REGISTRY.refresh()
    finally:
        obs.set_enabled(True)
    assert not any(metric.calls for metric in fake.values())
    assert timing.seconds >= 0  # the caller still gets its timing


def test_a_failing_backend_never_raises(monkeypatch, caplog):
    def broken(spec):
        raise RuntimeError("backend down")

    monkeypatch.setattr(m, "_REGISTRY", m.Registry(broken, refresh_gauges=False))
    obs.record_request("rag", "Ask", "OK")
    obs.record_request("rag", "Ask", "OK")
    assert caplog.text.count("recording hybridserve_requests_total failed") == 1


# --- without Ray


def test_helpers_work_without_ray_initialised():
    """The real Ray backend, in a fresh interpreter where Ray was never initialised."""
    code = """
import sys
import hybridserve.observability as obs
assert "ray" not in sys.modules, "importing the metrics module must not import Ray"
obs.record_request("rag", "Ask", "OK")
with obs.stage_timer("total", service="rag"):
    pass
obs.record_tokens("acme", "tone@1", 3, 2)
obs.adapter_loaded("tone@1", 0.1, ok=True)
obs.adapter_evicted("tone@1")
obs.set_resident(obs.replica_id(), "tone@1", True)
obs.set_engine_load("r1", waiting=1, running=1, capacity=4)
obs.quota_rejected("acme")
obs.ingest_chunks("acme", 2, 1)
obs.weaviate_call("search", 0.002, ok=False)
obs.set_weaviate_up("r1", False)
import ray
assert not ray.is_initialized()
from hybridserve.observability import metrics as m
assert m._REGISTRY._refresher is None, "no refresh thread without Ray"
assert not m._REGISTRY._warned, m._REGISTRY._warned
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
