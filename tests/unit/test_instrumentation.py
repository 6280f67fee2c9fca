"""The services record the declared metrics where the issue says they should: every
RPC by status code, stage latencies, tokens, adapter loads and evictions, engine load,
ingestion, Weaviate calls; and nothing at all when the config switch is off.

Real servicers and services with fakes of their backends (the real protocols); the
metric objects are `FakeMetric`s that also check every label set against the
declaration. The integration test tests/integration/test_observability.py checks the
same metrics end to end through Ray and a real Prometheus.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from hybridserve import observability as obs
from hybridserve.config import HybridServeConfig
from hybridserve.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from hybridserve.generation.residency import ResidentAdapter
from hybridserve.generation.servicer import GenerationServicer
from hybridserve.grpc_errors import grpc_stream, grpc_unary
from hybridserve.observability import metrics as m
from hybridserve.observability.prometheus import PrometheusServer
from hybridserve.v1 import generation_pb2, rerank_pb2, retrieval_pb2

from tests.unit.fakes import FakeChunkStore, FakeContext, FakeEngine, tenancy_for


def calls(made, spec, **tags) -> list[tuple[str, float, dict]]:
    found = made[spec.name].calls if spec.name in made else []
    return [c for c in found if all(c[2].get(k) == v for k, v in tags.items())]


def requests(made) -> list[tuple[str, str, str]]:
    return [(t["service"], t["method"], t["code"]) for _, _, t in calls(made, m.REQUESTS)]


# --- the decorators


class Demo:
    """Stands in for a servicer: RPC names of real services, so the empty response
    that carries an error has a real type."""

    metrics_service = "rerank"
    grpc_service = "hybridserve.v1.AdminService"

    @grpc_unary
    async def WhoAmI(self, request, grpc_context=None):
        if request == "missing":
            raise NotFound("no such thing", reason="THING_NOT_FOUND")
        if request == "bug":
            raise KeyError("internal detail")
        return "ok"

    @grpc_unary(timed=True)
    async def GetTenant(self, request, grpc_context=None):
        return "ok"


class DemoStream:
    metrics_service = "rerank"
    grpc_service = "hybridserve.v1.GenerationService"

    @grpc_stream(timed=True)
    async def Generate(self, request, grpc_context=None):
        for i in range(3):
            if request == "bad" and i == 1:
                raise InvalidArgument("bad at 1", field_violations=[("prompt", "bad")])
            yield i


async def test_unary_calls_are_counted_by_status_code(fake):
    from google.rpc import error_details_pb2

    from hybridserve.v1 import admin_pb2

    demo = Demo()
    assert await demo.WhoAmI("x") == "ok"
    ctx = FakeContext()
    # With a context the error is recorded on it, and an empty reply carries it.
    assert await demo.WhoAmI("missing", ctx) == admin_pb2.WhoAmIResponse()
    assert ctx.code() == grpc.StatusCode.NOT_FOUND
    (detail,) = ctx.rich_status().details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.reason == "THING_NOT_FOUND" and info.domain == "hybridserve.dev"
    with pytest.raises(NotFound):  # without one it propagates
        await demo.WhoAmI("missing")
    ctx = FakeContext()
    await demo.WhoAmI("bug", ctx)
    assert ctx.code() == grpc.StatusCode.INTERNAL and "internal detail" not in ctx.details()
    assert requests(fake) == [
        ("rerank", "WhoAmI", "OK"), ("rerank", "WhoAmI", "NOT_FOUND"), ("rerank", "WhoAmI", "NOT_FOUND"),
        ("rerank", "WhoAmI", "INTERNAL"),
    ]
    # Only timed methods record the "total" stage.
    assert not calls(fake, m.STAGE_DURATION)
    await demo.GetTenant("x")
    assert [t["stage"] for _, _, t in calls(fake, m.STAGE_DURATION)] == ["total"]


async def test_streams_are_counted_once_each_with_their_outcome(fake):
    from hybridserve.v1 import generation_pb2

    demo = DemoStream()
    assert [i async for i in demo.Generate("x")] == [0, 1, 2]
    ctx = FakeContext()
    out = [i async for i in demo.Generate("bad", ctx)]
    # What was sent stays sent; then one message without payload carries the status.
    assert out == [0, generation_pb2.GenerateResponse()]
    assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.rich_status().details[0].type_url.endswith("google.rpc.BadRequest")
    stream = demo.Generate("x")
    await stream.__anext__()
    await stream.aclose()  # the client went away
    assert requests(fake) == [
        ("rerank", "Generate", "OK"), ("rerank", "Generate", "INVALID_ARGUMENT"),
        ("rerank", "Generate", "CANCELLED"),
    ]
    assert len(calls(fake, m.STAGE_DURATION, stage="total")) == 3


# --- generation


@pytest.fixture
def config(tmp_path):
    return HybridServeConfig(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
        model={"path": str(tmp_path / "model"), "max_model_len": 64},
        engine={"max_num_seqs": 7},
    )


@pytest.fixture
def admin(config):
    return tenancy_for(config)


async def _generate(servicer, key, adapter="", max_tokens=3, code="OK"):
    req = generation_pb2.GenerateRequest(prompt="hi there", adapter=adapter)
    req.sampling.max_tokens = max_tokens
    ctx = FakeContext(key)
    out = [msg async for msg in servicer.Generate(req, ctx)]
    assert ctx.code_name == code, ctx.details()
    return out


async def test_generate_records_status_stages_and_tokens(fake, config, admin):
    servicer = GenerationServicer(config, engine=FakeEngine(max_model_len=64), tenancy=admin[0])
    await servicer.start()
    try:
        out = await _generate(servicer, admin[1])
        await _generate(servicer, admin[1], adapter="nope@v1", code="NOT_FOUND")
        await _generate(servicer, admin[1], max_tokens=0, code="INVALID_ARGUMENT")
    finally:
        await servicer.shutdown()
    assert requests(fake) == [
        ("generation", "Generate", "OK"), ("generation", "Generate", "NOT_FOUND"),
        ("generation", "Generate", "INVALID_ARGUMENT"),
    ]
    stages = [t["stage"] for _, _, t in calls(fake, m.STAGE_DURATION, service="generation")]
    # One first token (the failed calls never produced one), a total for every call.
    assert sorted(stages) == ["first_token", "total", "total", "total"]
    usage = out[-1].final.usage
    tags = {"tenant": "unknown", "adapter": "base"}
    assert [v for _, v, _ in calls(fake, m.PROMPT_TOKENS, **tags)] == [usage.prompt_tokens]
    assert [v for _, v, _ in calls(fake, m.COMPLETION_TOKENS, **tags)] == [3]
    assert [v for _, v, _ in calls(fake, m.GENERATIONS, **tags)] == [1]


async def test_adapter_loads_residency_and_eviction(fake, config, monkeypatch, admin):
    engine = FakeEngine(max_model_len=64)
    servicer = GenerationServicer(config, engine=engine, tenancy=admin[0])
    ref_id = "tone@v1"

    class Record:
        id = ref_id
        content_sha256 = "0" * 64
        snapshot_dir = "/nowhere"

    monkeypatch.setattr(servicer.service.registry, "get", lambda adapter_id: Record)
    first = await servicer.load_adapter(ref_id)
    again = await servicer.load_adapter(ref_id)  # already resident: not a load
    assert isinstance(first, ResidentAdapter) and isinstance(again, ResidentAdapter)
    loads = calls(fake, m.ADAPTER_LOADS)
    assert [t for _, _, t in loads] == [{"adapter": ref_id, "outcome": "ok"}]
    assert len(calls(fake, m.ADAPTER_LOAD_DURATION, outcome="ok")) == 1
    resident = calls(fake, m.ADAPTER_RESIDENT, adapter=ref_id)
    assert [v for _, v, _ in resident] == [1.0]
    replica_id = resident[0][2]["replica"]
    assert replica_id == (await servicer.stats())["replica_id"]

    assert again.ref == first.ref
    await first.__del__()  # what Serve does on LRU eviction
    await servicer.residency._unloads[ref_id]  # idle: it unloads at once, in the background
    assert [t for _, _, t in calls(fake, m.ADAPTER_EVICTIONS)] == [{"adapter": ref_id}]
    assert [v for _, v, _ in calls(fake, m.ADAPTER_RESIDENT, adapter=ref_id)] == [1.0, 0.0]
    # The evicted series is no longer refreshed, so Ray lets it age out.
    assert not [k for k in m._REGISTRY._gauges if ("adapter", ref_id) in k[1]]

    async def broken(ref):
        raise RuntimeError("bad weights")

    monkeypatch.setattr(engine, "load_adapter", broken)
    with pytest.raises(RuntimeError):
        await servicer.load_adapter(ref_id)
    assert calls(fake, m.ADAPTER_LOADS, outcome="error")
    assert calls(fake, m.ADAPTER_LOAD_DURATION, outcome="error")


async def test_engine_load_is_sampled_into_the_gauges(fake, config, monkeypatch, admin):
    from hybridserve.generation.engine import EngineStats

    engine = FakeEngine(max_model_len=64)
    monkeypatch.setattr(
        engine, "stats", lambda: EngineStats(unfinished_requests=5, waiting_requests=2,
                                             running_requests=3)
    )
    servicer = GenerationServicer(config, engine=engine, tenancy=admin[0])
    servicer.load_sampler.sample()
    assert [v for _, v, _ in calls(fake, m.ENGINE_WAITING)] == [2.0]
    assert [v for _, v, _ in calls(fake, m.ENGINE_RUNNING)] == [3.0]
    assert [v for _, v, _ in calls(fake, m.ENGINE_CAPACITY)] == [7.0]


async def test_the_sampler_runs_while_the_replica_runs(fake, config, admin):
    config.observability.engine_stats_interval_s = 0.01
    servicer = GenerationServicer(config, engine=FakeEngine(max_model_len=64), tenancy=admin[0])
    await servicer.start()
    for _ in range(500):  # bounded: the loop samples every 10 ms
        if len(calls(fake, m.ENGINE_RUNNING)) >= 2:
            break
        await asyncio.sleep(0.01)
    await servicer.shutdown()
    assert len(calls(fake, m.ENGINE_RUNNING)) >= 2
    assert servicer.load_sampler.task is None


async def test_the_config_switch_turns_every_metric_off(fake, config, admin):
    config.observability.metrics_enabled = False
    try:
        servicer = GenerationServicer(config, engine=FakeEngine(max_model_len=64),
                                      tenancy=admin[0])
        assert not obs.is_enabled()
        await servicer.start()
        assert servicer.load_sampler.task is None
        await _generate(servicer, admin[1])
        await _generate(servicer, admin[1], adapter="nope@v1", code="NOT_FOUND")
        await servicer.shutdown()
        assert fake == {}
    finally:
        obs.set_enabled(True)


# --- retrieval and rerank


@pytest.fixture(scope="module")
def tokenizer():
    from hybridserve.embedding import load_tokenizer

    return load_tokenizer(None)


async def _embed(texts):
    return np.ones((len(texts), 4), dtype=np.float32)


def _knowledge_config(tmp_path, **retrieval) -> HybridServeConfig:
    return HybridServeConfig(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                             retrieval={"chunk_tokens": 16, "chunk_overlap": 4, **retrieval})


async def _with_tenant(tenancy, tenant: str) -> None:
    from hybridserve.tenancy.domain import Tenant

    await asyncio.to_thread(tenancy.store.create_tenant, Tenant(tenant), actor="test")


async def test_retrieval_records_requests_stages_and_ingestion(fake, tokenizer, tmp_path):
    from hybridserve.retrieval.servicer import RetrievalServicer

    store = FakeChunkStore()
    cfg = _knowledge_config(tmp_path)
    tenancy, key = tenancy_for(cfg, service="retrieval")
    servicer = RetrievalServicer(cfg, _embed, store=store, tokenizer=tokenizer, model_name="m",
                                 tenancy=tenancy)
    await _with_tenant(tenancy, "acme")
    await servicer.create_knowledge("acme")
    store.fail_chunks = {("d1", 1)}
    words = " ".join(f"word{i}" for i in range(40))
    reply = await servicer.Upsert(retrieval_pb2.UpsertRequest(
        tenant="acme", documents=[retrieval_pb2.Document(id="d1", text=words),
                                  retrieval_pb2.Document(id="d2", text=words)],
    ), FakeContext(key))
    await servicer.Search(retrieval_pb2.SearchRequest(tenant="acme", query="word3"), FakeContext(key))
    ctx = FakeContext(key)
    await servicer.Search(retrieval_pb2.SearchRequest(tenant="nobody", query="x"), ctx)
    assert ctx.code_name == "NOT_FOUND"
    assert requests(fake) == [
        ("retrieval", "Upsert", "OK"), ("retrieval", "Search", "OK"),
        ("retrieval", "Search", "NOT_FOUND"),
    ]
    written = calls(fake, m.INGEST_CHUNKS, tenant="acme", outcome="written")
    failed = calls(fake, m.INGEST_CHUNKS, tenant="acme", outcome="failed")
    assert [v for _, v, _ in written] == [reply.chunks_written]
    assert reply.failures and [v for _, v, _ in failed] == [len(reply.failures)]
    stages = sorted(t["stage"] for _, _, t in calls(fake, m.STAGE_DURATION, service="retrieval"))
    # Every call authenticates; the search in a tenant that does not exist stops
    # there; the other embeds and retrieves. Both searches are timed.
    assert stages == ["auth", "auth", "auth", "embed", "retrieve", "total", "total"]

    assert await servicer.probe_weaviate() is True
    assert [t for _, v, t in calls(fake, m.WEAVIATE_UP) if v == 1.0]


async def test_an_ingest_cut_off_by_the_store_counts_every_chunk(fake, tokenizer, tmp_path):
    """A write step that raises (Weaviate gone midway): the chunks written before it
    count as written, every other chunk as failed; none is left uncounted."""
    from hybridserve.retrieval.servicer import RetrievalServicer

    class DiesAfterFirstWrite(FakeChunkStore):
        async def write(self, tenant, chunks, vectors):
            if self.writes:
                raise Unavailable("weaviate went away")
            return await super().write(tenant, chunks, vectors)

    store = DiesAfterFirstWrite()
    cfg = _knowledge_config(tmp_path, write_batch_chunks=2)
    tenancy, key = tenancy_for(cfg)
    servicer = RetrievalServicer(cfg, _embed, store=store, tokenizer=tokenizer, model_name="m",
                                 tenancy=tenancy)
    await _with_tenant(tenancy, "acme")
    words = " ".join(f"word{i}" for i in range(60))
    ctx = FakeContext(key)
    await servicer.Upsert(retrieval_pb2.UpsertRequest(
        tenant="acme", documents=[retrieval_pb2.Document(id="d1", text=words)]), ctx)
    assert ctx.code_name == "UNAVAILABLE"
    (written,) = [v for _, v, _ in calls(fake, m.INGEST_CHUNKS, tenant="acme", outcome="written")]
    (failed,) = [v for _, v, _ in calls(fake, m.INGEST_CHUNKS, tenant="acme", outcome="failed")]
    in_store = len(store.tenants["acme"])
    assert written == in_store == 2
    chunks = len(servicer.service._chunk_all([_plan(words)])[0][0].texts)
    assert chunks > 4 and failed == chunks - in_store


def _plan(text: str):
    from hybridserve.retrieval.documents import Document
    from hybridserve.retrieval.service import _Plan

    return _Plan(Document("d1", text), "sha", 0, [])


async def test_a_down_store_sets_weaviate_up_to_zero_and_the_probe_never_raises(fake, tokenizer,
                                                                                tmp_path):
    from hybridserve.retrieval.servicer import RetrievalServicer

    class DownStore(FakeChunkStore):
        async def check_health(self):
            raise Unavailable("down")

    servicer = RetrievalServicer(_knowledge_config(tmp_path), _embed, store=DownStore(),
                                 tokenizer=tokenizer, model_name="m")
    assert await servicer.probe_weaviate() is False
    assert [v for _, v, _ in calls(fake, m.WEAVIATE_UP)] == [0.0]


async def test_a_hung_store_is_down_within_the_probe_bound(fake, tokenizer, monkeypatch, tmp_path):
    """A Weaviate that never answers must not hold Serve's health check past its own
    timeout (Serve would restart the replica): the probe gives up and reports down."""
    import asyncio

    from hybridserve.retrieval import servicer as module

    class HungStore(FakeChunkStore):
        async def check_health(self):
            await asyncio.sleep(3600)

    assert module.PROBE_TIMEOUT_S <= module.HEALTH_CHECK_TIMEOUT_S / 2
    monkeypatch.setattr(module, "PROBE_TIMEOUT_S", 0.2)
    servicer = module.RetrievalServicer(_knowledge_config(tmp_path), _embed, store=HungStore(),
                                        tokenizer=tokenizer, model_name="m")
    assert await asyncio.wait_for(servicer.probe_weaviate(), 5) is False
    assert [v for _, v, _ in calls(fake, m.WEAVIATE_UP)] == [0.0]


async def test_rerank_records_the_request_and_the_rerank_stage(fake, tmp_path):
    from hybridserve.rerank.backends import RerankBackend
    from hybridserve.rerank.servicer import RerankServicer

    class Length(RerankBackend):
        name = "length"

        def score(self, pairs):
            return np.array([len(p) for _, p in pairs], dtype=np.float32)

    cfg = _knowledge_config(tmp_path)
    tenancy, key = tenancy_for(cfg, service="rerank")
    servicer = RerankServicer(cfg, backend=Length(), tenancy=tenancy)
    await servicer.Rerank(rerank_pb2.RerankRequest(query="q", passages=["a", "bbb"]), FakeContext(key))
    ctx = FakeContext(key)
    await servicer.Rerank(rerank_pb2.RerankRequest(query="q"), ctx)
    assert ctx.code_name == "INVALID_ARGUMENT"
    assert requests(fake) == [("rerank", "Rerank", "OK"), ("rerank", "Rerank", "INVALID_ARGUMENT")]
    stages = sorted(t["stage"] for _, _, t in calls(fake, m.STAGE_DURATION, service="rerank"))
    assert stages == ["auth", "auth", "rerank", "total", "total"]


# --- the Weaviate choke point


class _Collection:
    pass


@pytest.mark.parametrize(
    "raised, outcome",
    [(None, "ok"), (NotFound("unknown tenant"), "ok"), (Unavailable("down"), "error"),
     (DeadlineExceeded("slow"), "error")],
)
async def test_every_weaviate_call_is_timed_and_counted(fake, raised, outcome, monkeypatch):
    from hybridserve.retrieval.store import WeaviateStore

    store = WeaviateStore(HybridServeConfig())

    async def connected():
        return _Collection()

    monkeypatch.setattr(store, "_connected", connected)

    async def make(collection):
        if raised is not None:
            raise raised
        return 42

    if raised is None:
        assert await store._run("search", "a search", make, 5) == 42
    else:
        with pytest.raises(type(raised)):
            await store._run("search", "a search", make, 5)
    assert [t for _, _, t in calls(fake, m.WEAVIATE_REQUESTS)] == [
        {"op": "search", "outcome": outcome}
    ]
    assert [t for _, _, t in calls(fake, m.WEAVIATE_DURATION)] == [{"op": "search"}]


# --- the local Prometheus


def test_prometheus_config_is_the_shipped_one_pointed_at_the_platform(tmp_path):
    server = PrometheusServer(["127.0.0.1:18080"], tmp_path / "tsdb", port=19090,
                              scrape_interval_s=1.5)
    cfg = server.render_config()
    shipped = yaml.safe_load(Path(server.template).read_text())
    assert cfg["global"]["scrape_interval"] == "1500ms"
    assert cfg["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:18080"]}]
    assert [j["job_name"] for j in cfg["scrape_configs"]] == [
        j["job_name"] for j in shipped["scrape_configs"]
    ]
    (rules,) = cfg["rule_files"]
    assert Path(rules).is_absolute() and list(Path(rules).parent.glob(Path(rules).name))
    path = server.write_config()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package)")
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr


def test_prometheus_from_config_uses_the_metrics_port(tmp_path):
    cfg = HybridServeConfig(data_dir=tmp_path, observability={"metrics_export_port": 18123,
                                                              "prometheus_port": 19123})
    server = PrometheusServer.from_config(cfg)
    assert server.targets == ["127.0.0.1:18123"] and server.port == 19123
    assert server.data_dir == tmp_path.resolve() / "prometheus"
    assert PrometheusServer.from_config(cfg, port=19999).port == 19999


def test_a_missing_prometheus_binary_is_a_clear_error(tmp_path):
    from hybridserve.errors import FailedPrecondition

    server = PrometheusServer(["127.0.0.1:1"], tmp_path / "tsdb", binary="no-such-prometheus")
    with pytest.raises(FailedPrecondition) as e:
        server.start()
    assert "prometheus" in e.value.message and "install" in e.value.message


def test_with_prometheus_on_a_taken_port_fails_before_the_platform_starts(tmp_path, monkeypatch):
    """`hybridserve up --with-prometheus` checks its Prometheus first: a taken port is
    a clear error before Ray, Weaviate or any engine starts."""
    import socket

    import ray

    from hybridserve import platform
    from hybridserve.errors import FailedPrecondition

    def too_late(*args, **kwargs):
        raise AssertionError("the platform started before Prometheus was checked")

    for step in ("ensure_model", "start_weaviate"):
        monkeypatch.setattr(platform, step, too_late)
    monkeypatch.setattr(ray, "init", too_late)
    free = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free.append(s.getsockname()[1])
    cfg = HybridServeConfig(data_dir=tmp_path, serve={"grpc_port": free[0], "http_port": free[1]},
                            observability={"metrics_export_port": free[2]})
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(FailedPrecondition) as e:
            platform.start(cfg, progress=lambda m: None, with_prometheus=True,
                           prometheus_port=held.getsockname()[1])
    assert "Prometheus port" in e.value.message and "--prometheus-port" in e.value.message


def test_an_interrupted_prometheus_start_leaves_nothing_running(tmp_path, monkeypatch):
    """Ctrl-C while waiting for readiness stops the child (it runs in its own session)."""
    import shutil

    from hybridserve import localproc

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (scripts/install.sh installs it)")

    started = []

    def interrupted(url, timeout_s=2):
        started.append(server._proc)
        raise KeyboardInterrupt

    monkeypatch.setattr(localproc, "http_ok", interrupted)
    server = PrometheusServer(["127.0.0.1:1"], tmp_path / "tsdb", port=_free_port_here())
    with pytest.raises(KeyboardInterrupt):
        server.start(timeout_s=30)
    (proc,) = started
    assert proc.poll() is not None, "prometheus still running after the interrupted start"
    assert not server.running()


def _free_port_here() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
