"""What metrics cost: generation throughput with observability on vs off.

Two generation apps run side by side behind one Serve gRPC proxy, identical except
for `observability.metrics_enabled`:

  metrics-on  : hybridserve's metrics (requests, stages, tokens, adapter loads and
                residency, the engine-load sampler) and vLLM's engine metrics
                exported through Ray (RayPrometheusStatLogger)
  metrics-off : none of that (vLLM keeps its default in-process stat loggers, as
                before the observability issue)

Rounds drive the two apps alternately (ABBA order, so neither always goes first),
with the same concurrent streams, prompts and adapters; the ratio on/off is taken
per round pair and the median is reported (this machine's speed drifts by up to 2x
over minutes). Ray's metrics agent runs throughout, as it always does.

Usage:
  python benchmarks/observability.py [--rounds 8] [--streams 16] [--max-tokens 64]

Writes benchmarks/results/observability-tiny.json and prints a summary.
Every load is bounded: rounds x 2 x streams x max_tokens.
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

import grpc

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from generation import PROMPTS, _free_port, _pct, build_assets  # noqa: E402

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
        serve={**ports, "cpus_per_replica": 0.5, "apps": ["generation"]},
        observability={"metrics_enabled": metrics, "metrics_export_port": metrics_port},
    )


class App:
    """The GenerationService of one Serve app (aio client)."""

    def __init__(self, channel: grpc.aio.Channel, app: str):
        from hybridserve.v1 import generation_pb2_grpc

        self.app = app
        self.stub = generation_pb2_grpc.GenerationServiceStub(channel)

    async def one(self, prompt: str, max_tokens: int, adapter: str = ""):
        from hybridserve.v1 import common_pb2, generation_pb2

        req = generation_pb2.GenerateRequest(adapter=adapter)
        req.messages.messages.append(common_pb2.ChatMessage(role="user", content=prompt))
        req.sampling.max_tokens = max_tokens
        req.sampling.temperature = 0
        md = [("application", self.app)] + ([("multiplexed_model_id", adapter)] if adapter else [])
        t0 = time.perf_counter()
        ttft, n = None, 0
        async for msg in self.stub.Generate(req, metadata=md, timeout=600):
            if msg.HasField("delta"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += len(msg.delta.token_ids)
        return ttft, n

    async def register(self, name: str, path: str) -> str:
        from hybridserve.v1 import generation_pb2

        reply = await self.stub.RegisterAdapter(
            generation_pb2.RegisterAdapterRequest(name=name, path=path, version="v1"),
            metadata=[("application", self.app)], timeout=120,
        )
        return reply.adapter.id


async def run_load(app: App, streams: int, max_tokens: int, adapters: list[str]) -> dict:
    """`streams` concurrent requests; stream i uses adapters[i % len] ("" = base)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*[
        app.one(PROMPTS[i % len(PROMPTS)], max_tokens, adapters[i % len(adapters)])
        for i in range(streams)
    ])
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft": [t for t, _ in results if t is not None]}


async def main_async(args) -> dict:
    from hybridserve import platform as local

    work = Path(args.work).resolve()
    base, name, adapter_dirs = build_assets("tiny", work, args.adapters)
    ports = {"grpc_port": _free_port(), "http_port": _free_port()}
    metrics_port = _free_port()
    configs = {app: make_config(base, name, work, args, on, ports, metrics_port)
               for app, on in APPS.items()}
    running = local.start(configs["metrics-on"], generation_apps=configs,
                          progress=lambda msg: print("[bench]", msg, flush=True))
    channel = grpc.aio.insecure_channel(running.grpc_address)
    apps = {name: App(channel, name) for name in APPS}
    try:
        ids = [await apps["metrics-on"].register(f"obs{i}", d.name)
               for i, d in enumerate(adapter_dirs)]
        mix = [""] + ids  # the base model and every adapter, round robin
        for app in apps.values():  # warm up: first requests pay one-time costs
            await run_load(app, args.streams, 8, mix)
        rounds = {name: [] for name in APPS}
        ratios = []
        for r in range(args.rounds):
            order = list(APPS) if r % 2 == 0 else list(reversed(APPS))
            result = {}
            for name in order:
                result[name] = await run_load(apps[name], args.streams, args.max_tokens, mix)
                rounds[name].append(result[name])
            ratios.append(result["metrics-on"]["tok_s"] / result["metrics-off"]["tok_s"])
            print(f"[bench] round {r} ({' then '.join(order)}): on/off {ratios[-1]:.3f} "
                  f"(on {result['metrics-on']['tok_s']:.0f} vs off "
                  f"{result['metrics-off']['tok_s']:.0f} tok/s)", flush=True)

        def summary(rs):
            ttft = [t for x in rs for t in x["ttft"]]
            return {
                "tok_s_median": statistics.median(x["tok_s"] for x in rs),
                "tok_s_rounds": [round(x["tok_s"], 1) for x in rs],
                "ttft_p50_ms": 1000 * _pct(ttft, 50),
                "ttft_p99_ms": 1000 * _pct(ttft, 99),
            }

        return {
            "model": "tiny",
            "rounds": args.rounds,
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "adapters": args.adapters,
            "cpu_count": os.cpu_count(),
            "on_vs_off_ratio_median": statistics.median(ratios),
            "on_vs_off_ratios": [round(x, 3) for x in ratios],
            **{name: summary(rs) for name, rs in rounds.items()},
        }
    finally:
        await channel.close()
        running.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "hybridserve" / "bench-obs"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = asyncio.run(main_async(args))
    (ROOT / "results").mkdir(exist_ok=True)
    path = ROOT / "results" / "observability-tiny.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
