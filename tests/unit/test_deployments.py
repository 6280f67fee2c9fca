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
    opts = app.generation_placement(_cfg(generation={"cpus_per_replica": 1.5}))
    assert opts["ray_actor_options"]["num_cpus"] == 1.5
    assert opts["ray_actor_options"]["num_gpus"] == 0
    assert "placement_group_bundles" not in opts and "accelerator_type" not in opts["ray_actor_options"]


def test_one_gpu_per_replica_with_an_accelerator_type():
    cfg = _cfg(generation={"gpus_per_replica": 1, "accelerator_type": "L4"})
    opts = app.generation_placement(cfg)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["ray_actor_options"]["accelerator_type"] == "L4"
    d = app.generation_deployment(cfg)
    assert d.ray_actor_options["num_gpus"] == 1 and d.ray_actor_options["accelerator_type"] == "L4"


def test_tensor_parallel_reserves_a_packed_placement_group():
    cfg = _cfg(engine={"tensor_parallel_size": 4}, generation={"gpus_per_replica": 4,
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
    ({"engine": {"tensor_parallel_size": 2}}, "set generation.gpus_per_replica to 2"),
    ({"generation": {"gpus_per_replica": 2}}, "set engine.tensor_parallel_size to 2"),
    ({"generation": {"accelerator_type": "L4"}}, "an accelerator type only places GPU replicas"),
    ({"rerank": {"accelerator_type": "L4"}}, "an accelerator type only places GPU replicas"),
])
def test_inconsistent_gpu_settings_are_refused(sections, message):
    with pytest.raises(ValidationError, match=message):
        _cfg(**sections)


def test_fractional_gpus_share_one_gpu():
    opts = app.generation_placement(_cfg(generation={"gpus_per_replica": 0.5}))
    assert opts["ray_actor_options"]["num_gpus"] == 0.5


def test_the_router_is_slot_aware_with_its_settings_unless_asked_otherwise():
    cfg = _cfg(generation={"adapter_spread_at": 5, "max_slot_wait_s": 0.5,
                           "routing_stats_period_s": 2})
    rc = app.request_router_config(cfg)
    assert rc.request_router_class == "hybridserve.generation.routing:SlotAwareRouter"
    assert rc.request_router_kwargs == {"spread_at": 5, "max_slot_wait_s": 0.5}
    assert rc.request_routing_stats_period_s == 2
    default = app.request_router_config(_cfg(generation={"request_router": "power_of_two"}))
    assert "SlotAwareRouter" not in str(default.request_router_class)


@pytest.mark.parametrize("generation, message", [
    ({"replicas": 1, "base_pool_replicas": 1}, "keep at least one LoRA replica"),
    ({"replicas": 3, "base_pool_replicas": 1,
      "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
     "keep at least one LoRA replica"),
    ({"replicas": 2, "base_pool_replicas": 1, "request_router": "power_of_two"},
     "needs generation.request_router slot_aware"),
])
def test_a_base_pool_must_leave_lora_replicas_and_use_the_slot_aware_router(generation, message):
    with pytest.raises(ValidationError, match=message):
        _cfg(generation=generation)
    assert _cfg(generation={"replicas": 2, "base_pool_replicas": 1})


def test_every_service_section_is_one_deployment_shape():
    """generation, retrieval, rerank and rag take the same deployment keys, and each
    section's keys set its deployment's replicas and resources."""
    from hybridserve.config import DeploymentConfig

    cfg = HybridServeConfig()
    sections = {"generation": cfg.generation, "retrieval": cfg.retrieval,
                "rerank": cfg.rerank, "rag": cfg.rag}
    for name, section in sections.items():
        assert isinstance(section, DeploymentConfig), name
        assert set(DeploymentConfig.model_fields) <= set(type(section).model_fields), name
    auto = {"min_replicas": 1, "max_replicas": 3}
    cfg = _cfg(**{name: {"replicas": 2, "cpus_per_replica": 0.5} for name in sections})
    deployments = _deployments(cfg)
    for name in sections:
        assert deployments[name].num_replicas == 2, name
        assert deployments[name].ray_actor_options["num_cpus"] == 0.5, name
    scaled = _deployments(_cfg(**{name: {"autoscaling": auto} for name in sections}))
    for name in sections:
        assert scaled[name]._deployment_config.autoscaling_config.max_replicas == 3, name
    gpu = app.rerank_deployment(_cfg(rerank={"gpus_per_replica": 1, "accelerator_type": "L4"}))
    assert gpu.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 1, "accelerator_type": "L4"}
    # Defaults as before the sections shared one shape.
    defaults = _deployments(HybridServeConfig())
    assert {name: defaults[name].ray_actor_options["num_cpus"] for name in sections} == {
        "generation": 1.0, "retrieval": 0, "rerank": 0.25, "rag": 0.25}


OLD_GENERATION_KEYS = {  # serve.<old> -> generation.<new>: still accepted, with a warning
    "generation_replicas": ("replicas", 3),
    "generation_autoscaling": ("autoscaling", {"min_replicas": 2, "max_replicas": 4}),
    "cpus_per_replica": ("cpus_per_replica", 0.5),
    "gpus_per_replica": ("gpus_per_replica", 1.0),
    "accelerator_type": ("accelerator_type", "L4"),
    "base_pool_replicas": ("base_pool_replicas", 1),
    "request_router": ("request_router", "slot_aware"),
    "adapter_spread_at": ("adapter_spread_at", 5),
    "max_slot_wait_s": ("max_slot_wait_s", 0.5),
    "routing_stats_period_s": ("routing_stats_period_s", 2.0),
}


def test_old_generation_keys_in_serve_still_work_with_a_warning_naming_the_new_key():
    from hybridserve.config import MOVED_KEYS, DeprecatedConfigKey
    from hybridserve.serve_config import serve_config

    assert {f"serve.{old}": f"generation.{new}" for old, (new, _) in OLD_GENERATION_KEYS.items()} \
        == MOVED_KEYS
    old = {"grpc_port": 9100, **{k: v for k, (_, v) in OLD_GENERATION_KEYS.items()}}
    new = {n: v for n, v in OLD_GENERATION_KEYS.values()}
    with pytest.warns(DeprecatedConfigKey) as caught:
        moved = _cfg(serve=old)
    said = {str(w.message) for w in caught}
    for key, (to, _) in OLD_GENERATION_KEYS.items():
        assert f"config key serve.{key} is deprecated: use generation.{to} " \
               "(docs/config.md, Migration)" in said
    assert moved == _cfg(serve={"grpc_port": 9100}, generation=new)
    # The Serve config carries the new keys only, so replicas never see the old ones.
    assert serve_config(moved) == serve_config(_cfg(serve={"grpc_port": 9100}, generation=new))
    assert app.generation_placement(moved) == app.generation_placement(
        _cfg(generation=new))
    # Both the old and the new name of one key: refused, naming both.
    with pytest.raises(ValidationError, match="serve.generation_replicas and generation.replicas"):
        _cfg(serve={"generation_replicas": 2}, generation={"replicas": 3})
    # Old keys beside other generation keys merge into one section.
    with pytest.warns(DeprecatedConfigKey):
        merged = _cfg(serve={"generation_replicas": 2}, generation={"max_tokens": 9})
    assert (merged.generation.replicas, merged.generation.max_tokens) == (2, 9)


def test_a_config_file_with_old_keys_warns_once_per_key_on_stderr(tmp_path):
    import subprocess
    import sys

    (tmp_path / "old.yaml").write_text("serve: {generation_replicas: 2, cpus_per_replica: 0.5}\n")
    (tmp_path / "new.yaml").write_text("generation: {replicas: 2, cpus_per_replica: 0.5}\n")

    def serve_config(name):
        return subprocess.run([sys.executable, "-m", "hybridserve.cli", "--config",
                               str(tmp_path / name), "serve-config"],
                              capture_output=True, text=True, check=True)

    old, new = serve_config("old.yaml"), serve_config("new.yaml")
    assert old.stdout == new.stdout
    assert old.stderr.count("DeprecatedConfigKey") == 2, old.stderr
    assert "config key serve.generation_replicas is deprecated: use generation.replicas" \
        in old.stderr
    assert "DeprecatedConfigKey" not in new.stderr
