"""The Serve deployment options the typed config renders (no Ray cluster needed):
bounded queues, request timeouts, adapter slots, shutdown hooks, GPU placement."""

from __future__ import annotations

import gc
import inspect
import warnings

import pytest
from hybridserve import app
from hybridserve.config import HybridServeConfig
from pydantic import ValidationError


def _cfg(**sections) -> HybridServeConfig:
    return HybridServeConfig.model_validate(sections)


def _deployments(cfg: HybridServeConfig):
    return {
        "generation": app.generation_deployment(cfg),
        "retrieval": app.retrieval_deployment(cfg),
        "embedder": app.embedder_deployment(cfg),
        "rerank": app.rerank_deployment(cfg),
        "admin": app.admin_deployment(cfg),
        "rag": app.rag_deployment(cfg),
    }


def test_every_deployment_has_a_bounded_queue():
    cfg = _cfg(serve={"max_queued_requests": 7, "max_ongoing_requests": 40})
    for name, d in _deployments(cfg).items():
        assert d.max_queued_requests == 7, name
    assert app.generation_deployment(cfg).max_ongoing_requests == 40
    # Serve's own default is unbounded (-1); ours is not.
    assert HybridServeConfig().serve.max_queued_requests > 0


def test_requests_have_an_end_to_end_timeout():
    cfg = _cfg(serve={"request_timeout_s": 42})
    assert app.grpc_options(cfg).request_timeout_s == 42
    from hybridserve.serve_config import serve_config

    printed = serve_config(cfg)
    assert printed["grpc_options"]["request_timeout_s"] == 42
    assert printed["http_options"]["request_timeout_s"] == 42


def test_serve_transport_settings_become_serves_environment():
    env = HybridServeConfig().serve.ray_env()
    assert env == {"RAY_SERVE_PROXY_USE_GRPC": "1",
                   "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                   "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                   "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(4 * 1024 * 1024),
                   "HYBRIDSERVE_PROXY_MAX_KEYLESS": "32",
                   "HYBRIDSERVE_PROXY_MAX_PER_CONNECTION": "256",
                   "HYBRIDSERVE_HEALTH_WATCH_S": "30",
                   "HYBRIDSERVE_HEALTH_POLL_S": "2"}
    off = _cfg(serve={"proxy_grpc_transport": False, "user_code_on_replica_loop": False,
                      "router_on_caller_loop": False, "max_message_bytes": 1 << 20,
                      "health_poll_s": 0.5}).serve.ray_env()
    assert off["RAY_SERVE_PROXY_USE_GRPC"] == "0"
    assert off["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert off["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"
    assert off["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(1 << 20)
    assert off["HYBRIDSERVE_HEALTH_POLL_S"] == "0.5"
    from hybridserve.proxy_guard import GuardLimits

    # What the proxy reads back is what the config set.
    limits = GuardLimits.from_env(off)
    assert (limits.max_keyless, limits.max_per_connection, limits.poll_s) == (32, 256, 0.5)


def test_routing_sees_the_adapters_a_batch_can_hold_not_the_engine_cache(monkeypatch):
    seen = {}

    def multiplexed(func=None, *, max_num_models_per_replica=3):
        seen["cap"] = max_num_models_per_replica
        return (lambda f: f) if func is None else func

    monkeypatch.setattr(app.serve, "multiplexed", multiplexed)
    app.generation_deployment(_cfg(engine={"max_loras": 2, "max_cpu_loras": 6}))
    assert seen["cap"] == 2
    # the routing benchmark's plain side: Serve's cap as Serve would set it
    app.generation_deployment(_cfg(engine={"max_loras": 2, "max_cpu_loras": 6}), max_adapters=6)
    assert seen["cap"] == 6


def test_no_deployment_class_has_a_coroutine_destructor():
    """Serve awaits `__del__` on shutdown; the garbage collector would call a class's
    async `__del__` again, as a coroutine that is never awaited."""
    for name, d in _deployments(HybridServeConfig()).items():
        cls = d.func_or_class
        assert not inspect.iscoroutinefunction(getattr(cls, "__del__", None)), name
        # Collecting an instance warns about nothing.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            instance = object.__new__(cls)
            del instance
            gc.collect()
        assert not [w for w in caught if "never awaited" in str(w.message)], name


async def test_the_shutdown_hook_is_what_serve_awaits():
    calls = []

    class Servicer:
        async def shutdown(self):
            calls.append("shutdown")

    s = Servicer()
    app.on_replica_shutdown(s, s.shutdown)
    # Serve's graceful shutdown: `if hasattr(callable, "__del__"): await callable.__del__()`.
    assert inspect.iscoroutinefunction(s.__del__)
    await s.__del__()
    assert calls == ["shutdown"]


def test_cpu_replicas_ask_for_no_gpu():
    opts = app.generation_placement(_cfg(serve={"cpus_per_replica": 1.5}))
    assert opts["ray_actor_options"]["num_cpus"] == 1.5
    assert opts["ray_actor_options"]["num_gpus"] == 0
    assert "placement_group_bundles" not in opts and "accelerator_type" not in opts["ray_actor_options"]


def test_one_gpu_per_replica_with_an_accelerator_type():
    cfg = _cfg(serve={"gpus_per_replica": 1, "accelerator_type": "L4"})
    opts = app.generation_placement(cfg)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["ray_actor_options"]["accelerator_type"] == "L4"
    d = app.generation_deployment(cfg)
    assert d.ray_actor_options["num_gpus"] == 1 and d.ray_actor_options["accelerator_type"] == "L4"


def test_tensor_parallel_reserves_a_packed_placement_group():
    cfg = _cfg(engine={"tensor_parallel_size": 4}, serve={"gpus_per_replica": 4,
                                                          "cpus_per_replica": 2,
                                                          "accelerator_type": "H100"})
    opts = app.generation_placement(cfg)
    # The replica itself takes no GPU; vLLM's 4 workers take one each.
    assert opts["ray_actor_options"]["num_gpus"] == 0
    assert opts["placement_group_bundles"] == [{"CPU": 2}] + [
        {"GPU": 1, "accelerator_type:H100": 0.001}] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    d = app.generation_deployment(cfg)
    assert d._replica_config.placement_group_bundles == opts["placement_group_bundles"]
    assert d._replica_config.placement_group_strategy == "STRICT_PACK"

    from hybridserve.generation.vllm_engine import VLLMEngine

    args = VLLMEngine(cfg, cfg.cache_dir).engine_args()
    assert args.tensor_parallel_size == 4 and args.distributed_executor_backend == "ray"
    single = VLLMEngine(HybridServeConfig(), HybridServeConfig().cache_dir).engine_args()
    assert single.tensor_parallel_size == 1 and single.distributed_executor_backend is None


@pytest.mark.parametrize("sections, message", [
    ({"engine": {"tensor_parallel_size": 2}}, "set serve.gpus_per_replica to 2"),
    ({"serve": {"gpus_per_replica": 2}}, "set engine.tensor_parallel_size to 2"),
    ({"serve": {"accelerator_type": "L4"}}, "an accelerator type only places GPU replicas"),
])
def test_inconsistent_gpu_settings_are_refused(sections, message):
    with pytest.raises(ValidationError, match=message):
        _cfg(**sections)


def test_fractional_gpus_share_one_gpu():
    opts = app.generation_placement(_cfg(serve={"gpus_per_replica": 0.5}))
    assert opts["ray_actor_options"]["num_gpus"] == 0.5


def test_the_router_is_slot_aware_with_its_settings_unless_asked_otherwise():
    cfg = _cfg(serve={"adapter_spread_at": 5, "max_slot_wait_s": 0.5,
                      "routing_stats_period_s": 2})
    rc = app.request_router_config(cfg)
    assert rc.request_router_class == "hybridserve.generation.routing:SlotAwareRouter"
    assert rc.request_router_kwargs == {"spread_at": 5, "max_slot_wait_s": 0.5}
    assert rc.request_routing_stats_period_s == 2
    default = app.request_router_config(_cfg(serve={"request_router": "power_of_two"}))
    assert "SlotAwareRouter" not in str(default.request_router_class)


@pytest.mark.parametrize("serve, message", [
    ({"generation_replicas": 1, "base_pool_replicas": 1}, "keep at least one LoRA replica"),
    ({"generation_replicas": 3, "base_pool_replicas": 1,
      "generation_autoscaling": {"min_replicas": 1, "max_replicas": 3}},
     "keep at least one LoRA replica"),
    ({"generation_replicas": 2, "base_pool_replicas": 1, "request_router": "power_of_two"},
     "needs serve.request_router slot_aware"),
])
def test_a_base_pool_must_leave_lora_replicas_and_use_the_slot_aware_router(serve, message):
    with pytest.raises(ValidationError, match=message):
        _cfg(serve=serve)
    assert _cfg(serve={"generation_replicas": 2, "base_pool_replicas": 1})
