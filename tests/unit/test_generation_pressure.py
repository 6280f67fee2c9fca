"""The generation replica under pressure, with a fake engine (no vLLM, no Serve):
eviction never blocks, blocking work stays off the event loop, health Watch
streams end, adapter slots are what routing sees."""

from __future__ import annotations

import asyncio
import threading

import pytest
from grpc_health.v1 import health_pb2
from hybridserve.config import HybridServeConfig
from hybridserve.generation.servicer import GenerationServicer
from testkit.tiny import build_lora_adapter, build_tiny_llama
from hybridserve.v1 import generation_pb2

from .fakes import FakeContext, FakeEngine, tenancy_for


def _not_on_the_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop in this thread: good
    raise AssertionError(f"{what} ran on the event loop thread")


class OffLoopEngine(FakeEngine):
    """Fails a request whose tokenizing or chat templating runs on the event loop."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.threads: set[str] = set()

    def tokenize(self, text, *, add_special_tokens=True):
        _not_on_the_loop("tokenize")
        self.threads.add(threading.current_thread().name)
        return super().tokenize(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages):
        _not_on_the_loop("render_chat")
        return super().render_chat(messages)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pressure")
    base = build_tiny_llama(root / "model")
    return root, base


@pytest.fixture
def config(tmp_path, tiny_assets):
    root, base = tiny_assets
    return HybridServeConfig(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
        model={"path": str(base), "max_model_len": 64},
        serve={"health_watch_s": 0.2},
    )


@pytest.fixture
def adapters(config, tiny_assets):
    """Two registered adapters: name -> id."""
    from hybridserve.adapters import AdapterRegistry

    _, base = tiny_assets
    registry = AdapterRegistry.from_config(config, base)
    ids = {}
    for i, name in enumerate(("alpha", "beta")):
        build_lora_adapter(base, config.adapter_store / name, seed=i, rank=8)
        ids[name] = registry.register(name, name)[0].id
    return ids


@pytest.fixture
def admin(config):
    return tenancy_for(config)


def _request(prompt="hi there", adapter="", max_tokens=3, **kw):
    req = generation_pb2.GenerateRequest(prompt=prompt, adapter=adapter, **kw)
    req.sampling.max_tokens = max_tokens
    return req


async def test_eviction_returns_at_once_and_unloads_after_the_last_request(config, adapters, admin):
    engine = FakeEngine(max_model_len=64, step_s=0.01)
    servicer = GenerationServicer(config, engine=engine, tenancy=admin[0])
    a = adapters["alpha"]
    stream = servicer.Generate(_request(adapter=a, max_tokens=40), FakeContext(admin[1]))
    await stream.__anext__()  # a request is running on `a`
    resident = await servicer.load_adapter(a)

    # Serve awaits `model.__del__` under its model-cache lock. It must complete without
    # ever suspending: one send() runs it to the end.
    evict = resident.__del__()
    with pytest.raises(StopIteration):
        evict.send(None)
    await asyncio.sleep(0)
    assert a in engine.loaded, "unloaded under a live request"

    # The request ends; then the engine unloads it.
    _ = [m async for m in stream]
    await asyncio.wait_for(_until(lambda: a not in engine.loaded), 10)
    assert (await servicer.stats())["evictions"] == 1


async def _serve_evicts(model) -> None:
    """What Serve's multiplex wrapper does to the model object it evicts."""
    await model.__del__()
    model.__del__ = lambda _: None


async def test_an_adapter_loaded_again_while_draining_is_kept(config, adapters, admin):
    engine = FakeEngine(max_model_len=64, step_s=0.01)
    servicer = GenerationServicer(config, engine=engine, tenancy=admin[0])
    a = adapters["alpha"]
    stream = servicer.Generate(_request(adapter=a, max_tokens=20), FakeContext(admin[1]))
    await stream.__anext__()
    first = await servicer.load_adapter(a)
    await _serve_evicts(first)
    # Serve routes `a` here again before the drain ends: no new engine load. Serve gets
    # a fresh object (it disarmed the one it evicted), over the same adapter state.
    loads = engine.loaded[a]
    again = await servicer.load_adapter(a)
    assert again is not first and again.ref == first.ref and not again.evicted
    assert again.users == 1 and engine.loaded[a] is loads
    _ = [m async for m in stream]
    await asyncio.sleep(0.05)
    assert a in engine.loaded
    assert (await servicer.stats())["evictions"] == 0
    # Evicted again, through the new object: now it unloads.
    await _serve_evicts(again)
    await asyncio.wait_for(_until(lambda: a not in engine.loaded), 10)
    assert (await servicer.stats())["evictions"] == 1


async def test_blocking_work_runs_off_the_event_loop(config, adapters, admin, monkeypatch):
    engine = OffLoopEngine(max_model_len=64)
    servicer = GenerationServicer(config, engine=engine, tenancy=admin[0])
    registry = servicer.service.registry
    real_get = registry.get

    def get(adapter_id):
        _not_on_the_loop("the registry stat")
        return real_get(adapter_id)

    monkeypatch.setattr(registry, "get", get)
    import jsonschema

    real_check = jsonschema.validators.validator_for

    def validator_for(schema, *a, **kw):
        _not_on_the_loop("JSON schema validation")
        return real_check(schema, *a, **kw)

    monkeypatch.setattr(jsonschema.validators, "validator_for", validator_for)
    ctx = FakeContext(admin[1])
    prompt = [m async for m in servicer.Generate(
        _request(adapter=adapters["alpha"], json_schema='{"type": "object"}'), ctx)]
    assert prompt[-1].WhichOneof("payload") == "final", ctx.details()
    chat = generation_pb2.GenerateRequest(adapter=adapters["beta"])
    chat.messages.messages.add(role="user", content="hello")
    chat.sampling.max_tokens = 2
    out = [m async for m in servicer.Generate(chat, FakeContext(admin[1]))]
    assert out[-1].WhichOneof("payload") == "final"
    assert engine.threads and all(t.startswith("hybridserve-prepare") for t in engine.threads)


async def test_health_watch_ends_and_streams_changes(config, admin):
    engine = FakeEngine(max_model_len=64)
    servicer = GenerationServicer(config, engine=engine, tenancy=admin[0])
    req = health_pb2.HealthCheckRequest(service="")
    out = await asyncio.wait_for(_collect(servicer.Watch(req)), 30)
    assert [m.status for m in out] == [health_pb2.HealthCheckResponse.NOT_SERVING]


async def test_watch_health_yields_each_change_then_returns():
    from hybridserve.health import watch_health

    states = iter([1, 1, 2, 2, 1])
    seen = []

    async def check(_service):
        seen.append(next(states, 1))
        return seen[-1]

    got = [s async for s in watch_health(check, "", duration_s=0.05, poll_s=0.001)]
    # However many checks fit in the window: the first status, then each change.
    assert seen and got == [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]


async def _collect(agen):
    return [m async for m in agen]


async def _until(predicate, every=0.01):
    while not predicate():
        await asyncio.sleep(every)


class _DeadLLM:
    """AsyncLLM after its engine core died: every call raises vLLM's EngineDeadError."""

    def __init__(self):
        from vllm.v1.engine.exceptions import EngineDeadError

        self.error = EngineDeadError

    def generate(self, *a, **kw):
        raise self.error()

    async def add_lora(self, *a):
        raise self.error()

    async def check_health(self):
        raise self.error()


async def test_a_dead_vllm_engine_is_unavailable_not_internal(config):
    from hybridserve.errors import Unavailable
    from hybridserve.generation.engine import AdapterRef, SamplingOptions
    from hybridserve.generation.vllm_engine import VLLMEngine
    from hybridserve.grpc_errors import status_of

    engine = VLLMEngine(config, config.model.path)
    engine._llm = _DeadLLM()
    with pytest.raises(Unavailable) as err:
        _ = [d async for d in engine.generate("r1", [1, 2], SamplingOptions(max_tokens=2))]
    assert err.value.reason == "ENGINE_DEAD" and err.value.retry_after > 0
    assert status_of(err.value)[0].name == "UNAVAILABLE"
    with pytest.raises(Unavailable):
        await engine.load_adapter(AdapterRef("a@v1", 1, "/nowhere"))
    with pytest.raises(Unavailable):
        await engine.check_health()
