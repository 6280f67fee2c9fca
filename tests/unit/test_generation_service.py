"""GenerationService and its servicer, with a fake engine (no vLLM, no Serve)."""

from __future__ import annotations

import grpc
import pytest
from hybridserve.adapters import AdapterRegistry
from hybridserve.config import HybridServeConfig
from hybridserve.errors import InvalidArgument, NotFound, Unauthenticated
from hybridserve.generation.service import GenerateInput, GenerationService
from hybridserve.generation.servicer import GenerationServicer
from hybridserve.v1 import common_pb2, generation_pb2

from .fakes import FakeContext, FakeEngine, tenancy_for


@pytest.fixture
def config(tmp_path):
    return HybridServeConfig(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
        model={"path": str(tmp_path / "model"), "max_model_len": 64},
    )


@pytest.fixture
def engine():
    return FakeEngine(max_model_len=64)


@pytest.fixture
def service(config, engine):
    registry = AdapterRegistry.from_config(config, config.model.path)
    return GenerationService(config, engine, registry)


@pytest.mark.parametrize(
    "inp, message",
    [
        (GenerateInput(prompt=""), "prompt is empty"),
        (GenerateInput(prompt="   "), "prompt is empty"),
        (GenerateInput(messages=[]), "messages is empty"),
        (GenerateInput(messages=[("robot", "hi")]), "use one of system, user, assistant"),
        (GenerateInput(messages=[("user", " ")]), "messages[0].content is empty"),
        (GenerateInput(prompt="hi", max_tokens=0), "max_tokens must be >= 1"),
        (GenerateInput(prompt="hi", max_tokens=-3), "max_tokens must be >= 1"),
        (GenerateInput(prompt="hi", max_tokens=64), "at most 63 can be generated"),
        (GenerateInput(prompt="w " * 64), "the prompt has 64 tokens but the context window is 64"),
        (GenerateInput(prompt="hi", temperature=-0.1), "temperature must be in [0, 2]"),
        (GenerateInput(prompt="hi", temperature=float("nan")), "temperature must be in [0, 2]"),
        # Values vLLM's own SamplingParams refuses are refused here first.
        (GenerateInput(prompt="hi", temperature=1e30), "temperature must be in [0, 2]"),
        (GenerateInput(prompt="hi", temperature=2.5), "temperature must be in [0, 2]"),
        (GenerateInput(prompt="hi", top_p=float("inf")), "top_p must be in (0, 1]"),
        # Sizes are bounded before anything is tokenized.
        (GenerateInput(prompt="x" * 70_000), "at most 65536 are accepted"),
        (GenerateInput(messages=[("user", "hi")] * 257), "at most 256 are accepted"),
        (GenerateInput(messages=[("user", "x" * 40_000)] * 2), "at most 65536 are accepted"),
        (GenerateInput(prompt_token_ids=[1] * 64), "the prompt has 64 tokens"),
        (GenerateInput(prompt="hi", json_schema="[" * 5000 + "]" * 5000), "nests"),
        (GenerateInput(prompt="hi", json_schema='{"a":' * 40 + "1" + "}" * 40), "too complex"),
        (GenerateInput(prompt="hi", json_schema=
                       '{"enum": [' + ",".join(["1"] * 5000) + "]}"), "too complex"),
        (GenerateInput(prompt="hi", top_p=0.0), "top_p must be in (0, 1]"),
        (GenerateInput(prompt="hi", stop=[""]), "each stop string"),
        (GenerateInput(prompt="hi", json_schema="{bad"), "json_schema is not valid JSON"),
        (GenerateInput(prompt="hi", json_schema="[1]"), "must be a JSON object"),
        (GenerateInput(prompt="hi", json_schema='{"type": 5}'), "not a valid JSON Schema"),
        (GenerateInput(prompt="hi", adapter="../etc"), "adapter id"),
    ],
)
def test_bad_input_is_invalid_argument_with_a_useful_message(service, inp, message):
    with pytest.raises(InvalidArgument) as e:
        service.prepare(inp)
    assert message in e.value.message


def test_size_checks_run_before_the_tokenizer(service, engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "tokenize", lambda text, **kw: calls.append(text) or [1])
    with pytest.raises(InvalidArgument):
        service.prepare(GenerateInput(prompt="x" * 70_000))
    with pytest.raises(InvalidArgument):
        service.prepare(GenerateInput(prompt="x", temperature=9.0))
    assert calls == []


def test_a_prompt_refused_after_tokenizing_reports_its_tokens(service):
    charged = []
    with pytest.raises(InvalidArgument, match="context window"):
        service.prepare(GenerateInput(prompt="w " * 64), charged.append)
    assert charged == [64]


def test_seed_minus_one_is_no_seed(service):
    assert service.prepare(GenerateInput(prompt="hi", seed=-1)).options.seed is None
    assert service.prepare(GenerateInput(prompt="hi", seed=-7)).options.seed == -7


def test_the_cache_salt_is_the_tenant_or_its_group(config):
    from hybridserve.generation.service import prefix_cache_salt

    assert prefix_cache_salt("acme", config) == "tenant:acme"
    assert prefix_cache_salt("globex", config) != prefix_cache_salt("acme", config)
    assert prefix_cache_salt(None, config) == "admin"
    config.tenancy.prefix_cache_groups = {"west": ["acme", "initech"]}
    assert prefix_cache_salt("acme", config) == prefix_cache_salt("initech", config) == "group:west"
    assert prefix_cache_salt("globex", config) == "tenant:globex"
    config.engine.prefix_cache_isolation = "shared"
    assert prefix_cache_salt("acme", config) is None


def test_a_tenant_cannot_be_in_two_cache_groups():
    with pytest.raises(ValueError, match="two prefix cache groups"):
        HybridServeConfig(tenancy={"prefix_cache_groups": {"a": ["acme"], "b": ["acme"]}})


def test_unknown_adapter_is_not_found(service):
    with pytest.raises(NotFound, match="hybridserve adapters register"):
        service.prepare(GenerateInput(prompt="hi", adapter="ghost@v1"))


def test_defaults_fill_unset_fields_and_clip_to_the_context(service, config):
    prepared = service.prepare(GenerateInput(prompt="a b c"))
    assert prepared.prompt_token_ids == [1, 1, 1]
    assert prepared.options.max_tokens == 61  # default 256 clipped to 64 - 3
    assert prepared.options.temperature == config.generation.temperature
    assert len(prepared.request_id) == 32  # the server's own UUID
    schema = service.prepare(GenerateInput(prompt="x", json_schema='{"type": "object"}')).options.json_schema
    assert schema == {"type": "object"}


def test_chat_messages_go_through_the_chat_template(service, engine):
    prepared = service.prepare(GenerateInput(messages=[("system", "be brief"), ("user", "hello there")]))
    assert prepared.prompt_token_ids == engine.tokenize(engine.render_chat([("system", "be brief"), ("user", "hello there")]))


async def test_stream_coalesces_within_the_interval_and_keeps_every_token(config, engine, service):
    config.serve.stream_interval_ms = 10_000  # everything after the first delta merges
    prepared = service.prepare(GenerateInput(prompt="hi", max_tokens=20))
    deltas = [d async for d in service.stream(prepared)]
    assert len(deltas) == 2  # first token at once, the rest with the final
    assert [t for d in deltas for t in d.token_ids] == list(range(20))
    assert deltas[-1].finished and deltas[-1].completion_tokens == 20

    config.serve.stream_interval_ms = 0  # one message per engine step
    deltas = [d async for d in service.stream(service.prepare(GenerateInput(prompt="hi", max_tokens=5)))]
    assert len(deltas) == 5


@pytest.fixture
def admin(config):
    return tenancy_for(config)


@pytest.fixture
def servicer(config, engine, admin):
    return GenerationServicer(config, engine=engine, tenancy=admin[0])


def _ctx(admin) -> FakeContext:
    return FakeContext(admin[1])


async def test_servicer_streams_deltas_then_one_final(servicer, engine, admin):
    await servicer.start()
    req = generation_pb2.GenerateRequest(prompt="hi there", client_request_id="r1")
    req.sampling.max_tokens = 3
    out = [m async for m in servicer.Generate(req, _ctx(admin))]
    assert [m.WhichOneof("payload") for m in out][-1] == "final"
    final = out[-1].final
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (2, 3)
    assert final.client_request_id == "r1" and final.replica_id
    # The engine never sees the client's id: the server's own is a UUID.
    assert final.request_id != "r1" and len(final.request_id) == 32
    assert engine.calls[-1][0] == final.request_id
    assert "".join(m.delta.text for m in out[:-1]) == "tok0 tok1 tok2 "


async def test_servicer_maps_domain_errors_to_grpc_status(servicer, admin):
    ctx = _ctx(admin)
    out = [m async for m in servicer.Generate(
        generation_pb2.GenerateRequest(prompt="x", adapter="no@v1"), ctx)]
    # One message without payload carries the status through Serve's proxy.
    assert [m.WhichOneof("payload") for m in out] == [None]
    assert ctx.code() == grpc.StatusCode.NOT_FOUND and "unknown adapter" in ctx.details()
    ctx = _ctx(admin)
    _ = [m async for m in servicer.Generate(generation_pb2.GenerateRequest(), ctx)]
    assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in ctx.details()
    ctx = FakeContext()  # no key
    _ = [m async for m in servicer.Generate(generation_pb2.GenerateRequest(prompt="x"), ctx)]
    assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED
    # Without a context (a direct call) the domain error propagates.
    with pytest.raises(Unauthenticated):
        _ = [m async for m in servicer.Generate(generation_pb2.GenerateRequest(prompt="x"))]


async def test_closing_the_stream_aborts_the_engine_request(servicer, engine, admin):
    engine.step_s = 0.01
    req = generation_pb2.GenerateRequest(prompt="x", client_request_id="gone")
    req.sampling.max_tokens = 50
    stream = servicer.Generate(req, _ctx(admin))
    await stream.__anext__()
    await stream.aclose()
    assert engine.aborted == [engine.calls[-1][0]]


async def test_health_reflects_the_engine(servicer):
    from grpc_health.v1 import health_pb2

    req = health_pb2.HealthCheckRequest(service="hybridserve.v1.GenerationService")
    assert (await servicer.Check(req)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.start()
    assert (await servicer.Check(req)).status == health_pb2.HealthCheckResponse.SERVING
    other = health_pb2.HealthCheckRequest(service="nope")
    assert (await servicer.Check(other)).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
