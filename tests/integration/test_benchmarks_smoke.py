"""Every benchmark's --smoke mode runs in the test suite, so none can rot unnoticed.
A smoke run asserts only that the benchmark completes and writes its result file,
never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _smoke(script: str, *args: str, timeout: float = 900) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    name = script.removesuffix(".py") + "-smoke.json"
    return json.loads((BENCH / "results" / name).read_text())


def test_tenancy_benchmark_smoke():
    result = _smoke("tenancy.py")
    assert {r["store"] for r in result["overhead"]} == {"sqlite", "postgresql"}
    assert result["rate"]["admitted"] > 0


def test_rag_benchmark_smoke(platform):
    result = _smoke("rag.py", "--address", platform.address,
                    "--api-key-file", str(platform.main.admin_key_path),
                    "--model-dir", str(platform.main.model.path),
                    "--max-model-len", str(platform.main.model.max_model_len))
    assert result["overhead"]["asks"] > 0 and result["throughput"]["mixed_tok_s"] > 0


def test_k8s_benchmark_smoke(platform):
    result = _smoke("k8s.py", "--address", platform.address,
                    "--api-key-file", str(platform.main.admin_key_path),
                    "--store-dir", str(platform.assets.store),
                    "--base-dir", str(platform.assets.base_dir), "--base-name", "tiny-llama")
    assert set(result["render"]) >= {"minimal-cpu", "tenants"}
    assert result["controller"]["adapters"] == 1
    assert result["controller"]["create_to_ready_ms"]["p50"] > 0


def test_finetune_benchmark_smoke():
    result = _smoke("finetune.py")
    assert result["results"][0]["model"] == "tiny" and result["results"][0]["steps"] == 3


def _platform_args(platform) -> list[str]:
    return ["--address", platform.address, "--api-key-file", str(platform.main.admin_key_path),
            "--store-dir", str(platform.assets.store), "--base-dir", str(platform.assets.base_dir),
            "--base-name", "tiny-llama"]


def test_generation_benchmark_smoke(platform):
    result = _smoke("generation.py", *_platform_args(platform))
    assert result["platform_base"]["tokens_per_round"][0] > 0
    assert result["direct_base"]["tokens_per_round"][0] > 0 and result["cold_load_all_ms"]


def test_observability_benchmark_smoke(platform):
    result = _smoke("observability.py", *_platform_args(platform))
    assert result["metrics-on"]["tokens_per_round"][0] > 0
    assert result["recording_cost_us"]["ray_counter_inc"] > 0


def test_retrieval_benchmark_smoke(platform, tmp_path):
    config = tmp_path / "platform.json"
    config.write_text(platform.main.model_dump_json())
    result = _smoke("retrieval.py", "--address", platform.address,
                    "--api-key-file", str(platform.main.admin_key_path), "--config", str(config),
                    "--metrics-url",
                    f"http://127.0.0.1:{platform.main.observability.metrics_export_port}/metrics")
    assert result["ingest"]["rounds"][0]["chunks"] > 0
    assert result["search"]["hybrid"]["queries"] == 8
    assert result["rerank"]["rounds"][0]["batched"] > 0


def test_routing_benchmark_smoke(platform):
    from .conftest import AFFINITY_APP, MAIN_APP

    result = _smoke("routing.py", *_platform_args(platform), "--app", MAIN_APP,
                    "--two-replica-app", AFFINITY_APP)
    assert result["base"]["ratio_median"] > 0 and result["slots"]["ratio_median"] > 0
    assert result["mixed"]["ratio_median"] > 0 and result["fit"]["ratio_median"] > 0
    assert sum(result["overload"]["high"]["status_counts"].values()) == 4
    assert sum(result["overload"]["storm"]["status_counts"].values()) == 8
    assert set(result["slots"]["vs"]) == {"serve", "p2c"}
    assert result["many"]["adapters"] == 3 and result["many"]["errors"] == 0


def test_isolation_benchmark_smoke(platform):
    result = _smoke("isolation.py", "--address", platform.address,
                    "--api-key-file", str(platform.main.admin_key_path))
    assert result["cache"]["cached_prompt_tokens"]["other_tenant"] == [0]
    assert result["keyless"]["generate_p50_ms"]["attacked"] > 0
    assert result["checks"]["proxy_guard_us"] > 0


def test_eval_benchmark_smoke(platform):
    # The SmolLM2 apps: retrieval-aware training needs the default model and its LoRA.
    result = _smoke("eval.py", "--address", platform.address,
                    "--api-key-file", str(platform.main.admin_key_path),
                    "--data-dir", str(platform.smol.data_dir),
                    "--max-model-len", str(platform.smol.model.max_model_len),
                    "--rag-app", "rag-smol", "--generation-app", "smol")
    assert result["finetune"]["steps"] == 1 and result["finetune"]["adapter"]
    assert set(result["northwind"]["summaries"]) == {"base", "adapter", "rag", "rag+adapter"}
    assert set(result["transfer"]["summaries"]) == {"rag", "rag+adapter"}


def test_openai_api_benchmark_smoke(platform):
    result = _smoke("openai_api.py", "--address", platform.address,
                    "--api-key-file", str(platform.main.admin_key_path),
                    "--openai-url", platform.openai_url(), "--adapter", platform.ids["alpha"])
    assert result["adapter"] == platform.ids["alpha"]
    assert result["stream"]["http"]["tokens_per_round"][0] > 0
    assert result["stream"]["grpc"]["tokens_per_round"][0] > 0
    assert result["ttft"]["requests_per_arm"] == 2 and result["rag"]["questions_per_arm"] == 2
