"""Generation benchmarks: the platform vs direct AsyncLLM, adapters vs base, cold loads.

Both sides of each comparison run in the same process lifetime, interleaved
round by round (this machine's speed drifts by up to 2x over minutes), and the
ratio is taken per round pair; the median ratio is reported.

  platform  : gRPC client -> Serve gRPC proxy -> replica -> AsyncLLM (streamed)
  direct    : AsyncLLM in this process, same engine args, same prompts

Usage:
  python benchmarks/generation.py --model tiny      # tiny random Llama (built locally)
  python benchmarks/generation.py --model smollm2   # SmolLM2-135M-Instruct (prepared offline)
  python benchmarks/generation.py --smoke --address HOST:PORT --api-key-file F \
      --store-dir D --base-dir B                    # one short round against a running platform

Writes benchmarks/results/generation-<model>.json (generation-smoke.json with --smoke)
and prints a table. Every load is bounded: rounds x streams x max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for testkit/

ROOT = Path(__file__).resolve().parent
PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "What are three tips for learning a new language?",
    "Describe the water cycle in simple words.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "How does a refrigerator keep food cold?",
    "What makes a good cup of coffee?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def build_assets(model: str, work: Path, n_adapters: int, base_dir: Path | None = None,
                 store: Path | None = None, base_name: str = "tiny-llama"):
    """The base model and `n_adapters` adapters in the store (`store`: a running
    platform's adapter store, `base_dir` its model)."""
    from testkit.tiny import build_lora_adapter, build_tiny_llama

    if base_dir is not None:
        base, name = base_dir, base_name
    elif model == "tiny":
        base = build_tiny_llama(work / "models" / "tiny-llama")
        name = "tiny-llama"
    else:
        from hybridserve import constants
        from hybridserve.models import prepare_default_model

        base = prepare_default_model(constants.CACHE_DIR)
        name = constants.DEFAULT_MODEL_NAME
    store = store or work / "data" / "adapters"
    adapters = [
        build_lora_adapter(base, store / f"bench{i}", seed=1000 + i, rank=8, base_model_name=name,
                           scale=0.05 if model == "smollm2" else 0.5)
        for i in range(n_adapters)
    ]
    return base, name, adapters


def _setting(text: str) -> tuple[str, object]:
    """`key=value` (value as JSON, else a string) for a serve.* setting."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--serve-set wants key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def make_config(base: Path, name: str, work: Path, args):
    from hybridserve.config import HybridServeConfig

    return HybridServeConfig(
        data_dir=work / "data",
        cache_dir=work / "cache",
        model={"path": str(base), "name": name, "max_model_len": 1024},
        engine={
            "max_loras": args.max_loras,
            "max_cpu_loras": max(args.max_loras, args.adapters + 8),
            "max_lora_rank": 8,
            "max_num_seqs": max(16, args.streams),
            "kv_cache_space_gib": 1 if args.smoke else 2,
            # A smoke run checks that the code runs: no minutes of torch.compile.
            "enforce_eager": args.smoke,
        },
        serve={
            "grpc_port": _free_port(),
            "http_port": _free_port(),
            # Only generation: the knowledge apps would start a weaviate-server.
            "apps": ["generation"],
            **({"stream_interval_ms": args.stream_interval_ms}
               if args.stream_interval_ms is not None else {}),
            **args.serve_set,
        },
        generation={"cpus_per_replica": 0.5},
    )


# -- the two sides ---------------------------------------------------------


class Direct:
    """AsyncLLM in this process with the platform's exact engine args."""

    def __init__(self, config, base: Path):
        from hybridserve.generation.vllm_engine import VLLMEngine, engine_environment

        for k, v in engine_environment(config).items():
            os.environ.setdefault(k, v)
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.llm = AsyncLLM.from_engine_args(VLLMEngine(config, base).engine_args())

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def one(self, prompt: str, max_tokens: int, lora=None):
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, output_kind=RequestOutputKind.DELTA
        )
        t0 = time.perf_counter()
        ttft, n = None, 0
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=self.prompt_ids(prompt)), params, uuid.uuid4().hex,
            lora_request=lora,
        ):
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            n += len(out.outputs[0].token_ids)
        return ttft, n


def use_admin_key(config) -> None:
    """Makes the platform's admin key the one every client here sends."""
    from hybridserve.tenancy.bootstrap import read_key_file

    os.environ["HYBRIDSERVE_API_KEY"] = read_key_file(config.admin_key_path)


class Platform:
    """The GenerationService of one Serve app of a running local platform (aio client)."""

    def __init__(self, address: str, app: str = "generation", api_key: str | None = None):
        from hybridserve.v1 import generation_pb2_grpc

        self.app = app
        key = api_key or os.environ.get("HYBRIDSERVE_API_KEY", "")
        self.auth = [("authorization", f"Bearer {key}")] if key else []
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)

    async def one(self, prompt: str, max_tokens: int, adapter: str = ""):
        from hybridserve.v1 import common_pb2, generation_pb2

        req = generation_pb2.GenerateRequest(adapter=adapter)
        req.messages.messages.append(common_pb2.ChatMessage(role="user", content=prompt))
        req.sampling.max_tokens = max_tokens
        req.sampling.temperature = 0
        md = [("application", self.app), *self.auth] + (
            [("multiplexed_model_id", adapter)] if adapter else [])
        t0 = time.perf_counter()
        ttft, n = None, 0
        async for msg in self.stub.Generate(req, metadata=md, timeout=600):
            if msg.HasField("delta"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += len(msg.delta.token_ids)
        return ttft, n

    async def register(self, name: str, path: str, version: str) -> str:
        from hybridserve import topology
        from hybridserve.v1 import admin_pb2_grpc, generation_pb2

        # Registering is a control-plane call: AdminService, on the admin app.
        reply = await admin_pb2_grpc.AdminServiceStub(self.channel).RegisterAdapter(
            generation_pb2.RegisterAdapterRequest(name=name, path=path, version=version),
            metadata=[("application", topology.ADMIN.name), *self.auth], timeout=120,
        )
        return reply.adapter.id


async def run_load(one, n_streams: int, max_tokens: int, adapters: list):
    """n_streams concurrent requests; stream i uses adapters[i % len] (None = base)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*[
        one(PROMPTS[i % len(PROMPTS)], max_tokens, adapters[i % len(adapters)])
        for i in range(n_streams)
    ])
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft": [t for t, _ in results if t is not None]}


class CpuMeter:
    """CPU seconds by process role over a span, read from every process on the machine:
    where a side's CPU goes. Roles: client (this process: the gRPC client, or direct
    AsyncLLM's output handling), proxy, replica, engine (vLLM's engine-core and worker
    processes), ray (raylet, GCS, controller, agents), other."""

    ROLES = (("ProxyActor", "proxy"), ("ServeReplica", "replica"), ("VLLM::", "engine"),
             ("raylet", "ray"), ("gcs_server", "ray"), ("dashboard", "ray"),
             ("ServeController", "ray"), ("log_monitor", "ray"), ("DashboardAgent", "ray"),
             ("RuntimeEnvAgent", "ray"))

    def __init__(self):
        import psutil

        self.psutil, self.me = psutil, os.getpid()
        self._roles: dict[int, str] = {}  # pid -> role; a process keeps its command line
        self.totals: dict[str, dict] = {}  # side -> wall_s, tokens, cpu (role -> s)

    def _role(self, proc) -> str:
        if proc.pid == self.me:
            return "client"
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except self.psutil.Error:
            return "other"
        return next((role for key, role in self.ROLES if key in text), "other")

    def snapshot(self) -> dict[int, tuple[str, float]]:
        snap = {}
        for proc in self.psutil.process_iter():
            try:
                t = proc.cpu_times()
            except self.psutil.Error:
                continue
            role = self._roles.get(proc.pid) or self._roles.setdefault(proc.pid, self._role(proc))
            snap[proc.pid] = (role, t.user + t.system)
        return snap

    async def measure(self, side: str, coro):
        """Runs `coro`, adding the CPU seconds each role spent meanwhile to `side`."""
        before = self.snapshot()
        result = await coro
        after = self.snapshot()
        acc = self.totals.setdefault(side, {"wall_s": 0.0, "tokens": 0, "cpu": {}})
        acc["wall_s"] += result["wall_s"]
        acc["tokens"] += result["tokens"]
        for pid, (role, cpu) in after.items():
            acc["cpu"][role] = acc["cpu"].get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
        return result

    def report(self) -> dict:
        """side -> CPU ms per 1,000 tokens by role, and the cores used on average."""
        out = {}
        for side, acc in self.totals.items():
            k = max(acc["tokens"], 1) / 1000
            out[side] = {
                "cpu_ms_per_1k_tokens": {r: round(1000 * v / k, 1) for r, v in acc["cpu"].items()},
                "cores_busy": round(sum(acc["cpu"].values()) / max(acc["wall_s"], 1e-9), 2),
            }
        return out

def _summary(rounds):
    ttft = [t for r in rounds for t in r["ttft"]]
    return {
        "tok_s_median": statistics.median(r["tok_s"] for r in rounds),
        "tok_s_rounds": [round(r["tok_s"], 1) for r in rounds],
        "tokens_per_round": [r["tokens"] for r in rounds],
        "ttft_p50_ms": 1000 * _pct(ttft, 50),
        "ttft_p99_ms": 1000 * _pct(ttft, 99),
    }


async def main_async(args) -> dict:
    from contextlib import nullcontext

    from hybridserve import platform as local
    from vllm.lora.request import LoRARequest

    work = Path(args.work).resolve() / args.model
    base, name, adapter_dirs = build_assets(
        args.model, work, args.adapters, Path(args.base_dir) if args.base_dir else None,
        Path(args.store_dir) if args.store_dir else None, args.base_name)
    config = make_config(base, name, work, args)
    print(f"[bench] model={args.model} base={base}", flush=True)

    if args.address:
        from hybridserve.tenancy.bootstrap import read_key_file

        os.environ["HYBRIDSERVE_API_KEY"] = read_key_file(Path(args.api_key_file))
        address, running = args.address, nullcontext()
    else:
        running = local.start(config, progress=lambda m: print("[bench]", m, flush=True))
        use_admin_key(config)
        address = running.grpc_address
    print("[bench] platform up; starting the direct engine", flush=True)
    direct = Direct(config, base)
    plat = Platform(address, app=args.app)
    try:
        ids = [await plat.register(d.name, d.name, "v1") for d in adapter_dirs]
        loras = [LoRARequest(f"bench{i}", i + 1, str(d)) for i, d in enumerate(adapter_dirs)]
        # Warm up both sides (first requests pay one-time costs), adapters loaded.
        await run_load(direct.one, args.streams, 8, [None] + loras)
        await run_load(plat.one, args.streams, 8, [""] + ids)
        print("[bench] warmed up; measuring", flush=True)

        res = {k: [] for k in ("direct_base", "platform_base", "platform_mixed", "platform_base2",
                               "direct_mixed", "direct_base2")}
        ratios, mix_ratios, direct_mix_ratios = [], [], []
        meter = CpuMeter()
        for r in range(args.rounds):
            d = await meter.measure("direct", run_load(direct.one, args.streams, args.max_tokens,
                                                       [None]))
            p = await meter.measure("platform", run_load(plat.one, args.streams, args.max_tokens,
                                                         [""]))
            res["direct_base"].append(d)
            res["platform_base"].append(p)
            ratios.append(p["tok_s"] / d["tok_s"])
            m = await run_load(plat.one, args.streams, args.max_tokens, ids)
            b = await run_load(plat.one, args.streams, args.max_tokens, [""])
            res["platform_mixed"].append(m)
            res["platform_base2"].append(b)
            mix_ratios.append(m["tok_s"] / b["tok_s"])
            # The engine's own cost of mixing adapters, to tell it apart from the platform's.
            dm = await run_load(direct.one, args.streams, args.max_tokens, loras)
            db = await run_load(direct.one, args.streams, args.max_tokens, [None])
            res["direct_mixed"].append(dm)
            res["direct_base2"].append(db)
            direct_mix_ratios.append(dm["tok_s"] / db["tok_s"])
            print(f"[bench] round {r}: platform/direct {ratios[-1]:.3f} "
                  f"(p {p['tok_s']:.0f} vs d {d['tok_s']:.0f} tok/s); "
                  f"mixed/base {mix_ratios[-1]:.3f} ({m['tok_s']:.0f} vs {b['tok_s']:.0f}); "
                  f"direct mixed/base {direct_mix_ratios[-1]:.3f}",
                  flush=True)

        # Cold load: register a brand-new adapter version, then time to its first token.
        cold = []
        for i in range(args.cold):
            t0 = time.perf_counter()
            new_id = await plat.register(f"cold{i}", adapter_dirs[0].name, f"c{uuid.uuid4().hex[:8]}")
            ttft, _ = await plat.one(PROMPTS[0], 4, new_id)
            cold.append(time.perf_counter() - t0)
            _ = ttft
        out = {
            "model": args.model,
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "adapters": args.adapters,
            "max_loras": args.max_loras,
            "stream_interval_ms": config.serve.stream_interval_ms,
            "serve_set": args.serve_set,
            # what Serve's processes got: the platform's settings, unless set here
            "serve_env": {**config.serve.ray_env(),
                          **{k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}},
            "platform_vs_direct_ratio_median": statistics.median(ratios),
            "platform_vs_direct_ratios": [round(x, 3) for x in ratios],
            "mixed_vs_base_ratio_median": statistics.median(mix_ratios),
            "mixed_vs_base_ratios": [round(x, 3) for x in mix_ratios],
            "direct_mixed_vs_base_ratio_median": statistics.median(direct_mix_ratios),
            "direct_mixed_vs_base_ratios": [round(x, 3) for x in direct_mix_ratios],
            "cold_load_p50_ms": 1000 * statistics.median(cold),
            "cpu_by_role": meter.report(),
            "cold_load_all_ms": [round(1000 * c) for c in cold],
            **{k: _summary(v) for k, v in res.items()},
        }
        return out
    finally:
        await plat.channel.close()
        direct.llm.shutdown()
        if not args.address:
            running.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--cold", type=int, default=8, help="cold-load samples")
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="default: the platform's (serve.stream_interval_ms)")
    p.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a serve.* setting of the platform side, e.g. "
                   "router_on_caller_loop=false (repeatable)")
    p.add_argument("--tag", default="", help="suffix for the results file")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "hybridserve" / "bench"))
    p.add_argument("--address", help="use a running platform instead of starting one")
    p.add_argument("--app", default="generation", help="its generation app (with --address)")
    p.add_argument("--api-key-file", help="its admin key (with --address)")
    p.add_argument("--store-dir", help="its adapter store (with --address)")
    p.add_argument("--base-dir", help="its base model folder (with --address)")
    p.add_argument("--base-name", default="tiny-llama", help="its served model name")
    p.add_argument("--smoke", action="store_true",
                   help="one short round of each part (checks that the benchmark still runs)")
    args = p.parse_args()
    args.serve_set = dict(_setting(x) for x in args.serve_set)
    if args.address and not (args.api_key_file and args.store_dir and args.base_dir):
        p.error("--address needs --api-key-file, --store-dir and --base-dir")
    if args.smoke:
        args.streams, args.max_tokens, args.rounds = 2, 4, 1
        args.adapters, args.max_loras, args.cold = 2, 2, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = asyncio.run(main_async(args))
    (ROOT / "results").mkdir(exist_ok=True)
    name = "smoke" if args.smoke else args.model + (f"-{args.tag}" if args.tag else "")
    path = ROOT / "results" / f"generation-{name}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=2))
    for k in ("direct_base", "platform_base", "platform_mixed", "platform_base2", "direct_mixed",
              "direct_base2"):
        s = out[k]
        print(f"{k:16s} tok/s median {s['tok_s_median']:8.1f}  TTFT p50 {s['ttft_p50_ms']:7.1f} ms  p99 {s['ttft_p99_ms']:7.1f} ms")
    for side, cpu in out.get("cpu_by_role", {}).items():
        print(f"{side:16s} CPU ms per 1k tokens {cpu['cpu_ms_per_1k_tokens']}; "
              f"cores busy {cpu['cores_busy']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
