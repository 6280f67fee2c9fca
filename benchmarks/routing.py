"""Routing benchmarks: the platform's own levers, each against the plain setup.

Both sides of each pair run as Serve apps behind one gRPC proxy, on the same
model, replicas and CPUs, and are driven alternately round by round (ABBA order;
this machine's speed drifts by up to 2x over minutes). Ratios are per round, and
the median is reported.

  base     : requests without an adapter, on a base-pool replica (LoRA off) vs on a
             LoRA-enabled replica (`pool` vs `lora`)
  slots    : 8 adapters over 2 replicas with max_loras=2: the slot-aware router (`slot`)
             vs Serve's default router as Serve sets it up, multiplex cap =
             max_cpu_loras (`serve`), and vs Serve's router with the platform's cap
             (max_loras, `p2c`); tokens/s and TTFT p99
  fit      : 4 adapters over 2 replicas with max_loras=2, a working set that fits the
             slots only if each replica gets 2: slot-aware (`slot`) vs Serve's
             default (`serve`); tokens/s and TTFT p99
  mixed    : 50% base, 50% over 4 adapters: base pool + slot-aware (`pool`) vs one LoRA
             pool of as many replicas (`lora2`)
  overload : ghz, an external gRPC load generator, on one replica with bounded queues:
             16 concurrent streams (the baseline) vs a burst of 400 at once (400 x
             400); rejection codes and latency, and the admitted requests' p99
             against the baseline's. Then a storm: 400 concurrent clients that call
             again the moment they are refused (2,000 calls), reported.
  many     : N distinct adapters registered and served in rotation through the LRU;
             errors, sampled outputs vs the HF+PEFT reference, TTFT p50/p99 (each
             request loads its adapter), the replica's resident memory

Usage:
  python benchmarks/routing.py [--model tiny|smollm2] [--parts base,slots,fit,mixed,overload,many]
  python benchmarks/routing.py --smoke --address HOST:PORT --api-key-file F \\
      --store-dir D --base-dir B --app A --two-replica-app A2
      # one short round of each part against a running platform's apps (both sides
      # of a pair may be one app: a smoke run checks that the benchmark runs)

Writes benchmarks/results/routing-<model>.json (routing-smoke.json with --smoke).
Every load is bounded: rounds x streams x max_tokens, and ghz's -n.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # the repo root, for testkit/
sys.path.insert(0, str(ROOT))

from generation import (  # noqa: E402
    PROMPTS,
    Platform,
    _free_port,
    _pct,
    _summary,
    build_assets,
    run_load,
    use_admin_key,
)


# -- apps -------------------------------------------------------------------------


def base_config(base: Path, name: str, work: Path, args):
    from hybridserve.config import HybridServeConfig

    return HybridServeConfig(
        data_dir=work / "data",
        cache_dir=work / "cache",
        model={"path": str(base), "name": name, "max_model_len": 1024},
        engine={"max_loras": 2, "max_cpu_loras": 12, "max_lora_rank": 8, "max_num_seqs": 32,
                "kv_cache_space_gib": 1},
        serve={"grpc_port": _free_port(), "http_port": _free_port(), "apps": ["generation"]},
        generation={"cpus_per_replica": 0.25},
        observability={"metrics_export_port": _free_port()},
    )


def variant(cfg, **serve_and_engine):
    """A copy of `cfg` with generation.* / serve.* / engine.* keys changed (validated)."""
    data = cfg.model_dump(mode="json")
    for key, value in serve_and_engine.items():
        section, field = key.split("__")
        data[section][field] = value
    return type(cfg).model_validate(data)


APPS = {
    # part -> {app: config changes}
    "base": {"lora": {"generation__replicas": 1},
             "pool": {"generation__replicas": 2, "generation__base_pool_replicas": 1}},
    "slots": {"slot": {"generation__replicas": 2},
              "serve": {"generation__replicas": 2, "generation__request_router": "power_of_two",
                        "max_adapters": "max_cpu_loras"},
              "p2c": {"generation__replicas": 2, "generation__request_router": "power_of_two"}},
    "fit": {"slot": {"generation__replicas": 2},
            "serve": {"generation__replicas": 2, "generation__request_router": "power_of_two",
                      "max_adapters": "max_cpu_loras"}},
    "mixed": {"pool": {"generation__replicas": 2, "generation__base_pool_replicas": 1},
              "lora2": {"generation__replicas": 2}},
    "overload": {"ovl": {"generation__replicas": 1, "serve__max_ongoing_requests": 16,
                         "serve__max_queued_requests": 16}},
    "many": {"many": {"generation__replicas": 1, "engine__max_loras": 4,
                      "engine__max_cpu_loras": 8}},
}


class Apps:
    """Deploys a part's apps into the running Serve (and removes them), or, with
    --address, maps each to an app the platform already runs."""

    def __init__(self, cfg, args):
        self.cfg, self.args = cfg, args

    def name_of(self, app: str) -> str:
        if not self.args.address:
            return app
        two = {"pool", "slot", "serve", "p2c", "lora2"}
        return self.args.two_replica_app if app in two else self.args.app

    def deploy(self, part: str) -> None:
        if self.args.address:
            return
        from hybridserve.app import build_generation_app
        from ray import serve

        for app, changes in APPS[part].items():
            print(f"[bench] deploying {app} ({changes}) ...", flush=True)
            changes = dict(changes)
            # Serve's multiplex cap, named by the engine setting it takes (default: the
            # platform's, max_loras)
            cap = changes.pop("max_adapters", None)
            cfg = variant(self.cfg, **changes)
            serve.run(build_generation_app(cfg, getattr(cfg.engine, cap) if cap else None),
                      name=app, route_prefix=f"/{app}")

    def remove(self, part: str) -> None:
        if self.args.address:
            return
        from ray import serve

        for app in APPS[part]:
            serve.delete(app)


async def interleaved(sides: dict, rounds: int, streams: int, max_tokens: int,
                      adapters: dict[str, list]) -> dict:
    """Rounds of `streams` concurrent requests per side (ABBA...), side -> summary, and
    the per-round tokens/s ratio of the first side over each other side
    (`ratio_median`/`ratios`: over the second; `vs`: over each)."""
    names = list(sides)
    results = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        got = {}
        for n in order:
            got[n] = await run_load(sides[n].one, streams, max_tokens, adapters[n])
            results[n].append(got[n])
        for n in names[1:]:
            ratios[n].append(got[names[0]]["tok_s"] / got[n]["tok_s"])
        print(f"[bench] round {r}: " + ", ".join(
            f"{names[0]}/{n} {v[-1]:.3f}" for n, v in ratios.items()) + " (" + ", ".join(
            f"{n} {got[n]['tok_s']:.0f} tok/s" for n in names) + ")", flush=True)
    second = ratios[names[1]]
    return {"ratio_median": statistics.median(second), "ratios": [round(x, 3) for x in second],
            "vs": {n: {"ratio_median": statistics.median(v), "ratios": [round(x, 3) for x in v]}
                   for n, v in ratios.items()},
            **{n: _summary(v) for n, v in results.items()}}


# -- parts ------------------------------------------------------------------------


async def part_base(apps: Apps, address: str, args) -> dict:
    sides = {"pool": Platform(address, apps.name_of("pool")),
             "lora": Platform(address, apps.name_of("lora"))}
    for s in sides.values():
        await run_load(s.one, args.streams, 8, [""])  # warm-up
    return await interleaved(sides, args.rounds, args.streams, args.max_tokens,
                             {"pool": [""], "lora": [""]})


async def part_slots(apps: Apps, address: str, args, adapter_dirs, part: str = "slots",
                     adapters: int = 8) -> dict:
    sides = {n: Platform(address, apps.name_of(n)) for n in APPS[part]}
    ids = {n: [await s.register(d.name, d.name, "v1") for d in adapter_dirs[:adapters]]
           for n, s in sides.items()}
    for n, s in sides.items():
        await run_load(s.one, args.streams, 8, ids[n])
    return await interleaved(sides, args.rounds, args.streams, args.max_tokens, ids)


async def part_mixed(apps: Apps, address: str, args, adapter_dirs) -> dict:
    sides = {"pool": Platform(address, apps.name_of("pool")),
             "lora2": Platform(address, apps.name_of("lora2"))}
    mixes = {}
    for n, s in sides.items():
        ids = [await s.register(d.name, d.name, "v1") for d in adapter_dirs[:4]]
        mixes[n] = [x for pair in zip([""] * 4, ids) for x in pair]  # 50% base
        await run_load(s.one, args.streams, 8, mixes[n])
    return await interleaved(sides, args.rounds, args.streams, args.max_tokens, mixes)


def ghz_binary() -> str:
    from hybridserve.config import HybridServeConfig

    cached = HybridServeConfig().cache_dir / "bin" / "ghz"
    found = str(cached) if cached.is_file() else shutil.which("ghz")
    if not found:
        raise SystemExit("ghz is not installed: run scripts/install.sh")
    return found


def ghz(address: str, app: str, key: str, concurrency: int, total: int, max_tokens: int) -> dict:
    """One ghz run of Generate (server streaming); per-status counts and latencies (ms).

    NOTE: ghz gets the API from a protoset compiled here: its reflection client does not
    find the services through Serve's proxy, and its .proto parser refuses proto3
    `optional`."""
    data = {"prompt": PROMPTS[0], "sampling": {"max_tokens": max_tokens, "temperature": 0}}
    md = {"application": app, "authorization": f"Bearer {key}"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ghz.json"
        protos, protoset = ROOT.parent / "protos", Path(tmp) / "generation.protoset"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}",
                        "--include_imports", f"--descriptor_set_out={protoset}",
                        str(protos / "hybridserve" / "v1" / "generation.proto")], check=True)
        cmd = [ghz_binary(), "--insecure", "--protoset", str(protoset),
               "--call", "hybridserve.v1.GenerationService.Generate",
               "-d", json.dumps(data), "-m", json.dumps(md), "-c", str(concurrency),
               "-n", str(total), "-t", "120s", "--format", "json", "-o", str(out), address]
        done = subprocess.run(cmd, timeout=900, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"ghz failed ({done.returncode}): {done.stderr[-2000:]}")
        report = json.loads(out.read_text())
    by_status: dict[str, list[float]] = {}
    for d in report.get("details") or []:
        by_status.setdefault(d.get("status", "?"), []).append(d["latency"] / 1e6)
    return {
        "concurrency": concurrency, "total": total,
        "status_counts": {k: len(v) for k, v in by_status.items()},
        "latency_ms": {k: {"p50": _pct(v, 50), "p99": _pct(v, 99)} for k, v in by_status.items()},
        "rps": report.get("rps"),
    }


async def part_overload(apps: Apps, address: str, args) -> dict:
    key = os.environ["HYBRIDSERVE_API_KEY"]
    app = apps.name_of("ovl")
    low = ghz(address, app, key, args.ghz_low, args.ghz_low_total, args.max_tokens)
    high = ghz(address, app, key, args.ghz_high, args.ghz_high, args.max_tokens)
    storm = ghz(address, app, key, args.ghz_high, args.ghz_storm_total, args.max_tokens)
    ok_low = low["latency_ms"].get("OK", {}).get("p99")
    out = {"low": low}
    for name, run in (("high", high), ("storm", storm)):
        ok = run["latency_ms"].get("OK", {}).get("p99")
        print(f"[bench] overload {name}: {args.ghz_low} concurrent p99 {ok_low} ms; "
              f"{run['concurrency']} concurrent x {run['total']}: admitted p99 {ok} ms, "
              f"statuses {run['status_counts']}", flush=True)
        out[name] = run
        out[f"{name}_admitted_p99_vs_low_p99"] = ok / ok_low if ok_low and ok else None
        out[f"{name}_rejected_latency_ms"] = {k: v for k, v in run["latency_ms"].items()
                                              if k != "OK"}
    return out


async def part_many(apps: Apps, address: str, args, base: Path, store: Path, name: str) -> dict:
    from testkit.tiny import build_lora_adapter, hf_greedy

    plat = Platform(address, apps.name_of("many"))
    run = f"m{os.getpid()}"
    dirs = []
    t0 = time.perf_counter()
    for i in range(args.many):
        dirs.append(build_lora_adapter(base, store / f"many{i}", seed=5000 + i, rank=8,
                                       base_model_name=name))
    built_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = [await plat.register(f"many{i}", d.name, run) for i, d in enumerate(dirs)]
    register_s = time.perf_counter() - t0
    ttft, errors = [], 0
    sample_every = max(1, args.many // args.many_samples)
    wrong = []
    for i, adapter in enumerate(ids):
        try:
            first, tokens = await generate_prompt(plat, PROMPTS[0], 8, adapter)
            ttft.append(first)
        except Exception as e:  # noqa: BLE001 - counted, and reported
            errors += 1
            print(f"[bench] many: {adapter}: {e}", flush=True)
            continue
        if i % sample_every == 0:
            expected = hf_greedy(base, [PROMPTS[0]], 8, adapter_dir=dirs[i])[0]
            if tokens != expected:
                wrong.append(adapter)
    from ray import serve

    rss = None
    try:
        # Awaited: a handle's blocking .result() refuses to run inside an event loop.
        stats = await serve.get_app_handle(apps.name_of("many")).stats.remote()
        rss = stats.get("rss_bytes")
    except Exception as e:  # noqa: BLE001 - reported as missing, with the reason
        print(f"[bench] many: no replica memory: {e!r}", flush=True)
    return {"adapters": args.many, "errors": errors, "sampled": args.many // sample_every,
            "sampled_wrong": wrong, "ttft_ms": {"p50": 1e3 * _pct(ttft, 50),
                                                "p99": 1e3 * _pct(ttft, 99)},
            "build_s": round(built_s, 1), "register_s": round(register_s, 1),
            "replica_rss_bytes": rss}


async def generate_prompt(plat: Platform, prompt: str, max_tokens: int, adapter: str):
    """(TTFT s, token ids) of a plain-prompt greedy generation (as the PEFT reference
    tokenizes it)."""
    from hybridserve.v1 import generation_pb2

    req = generation_pb2.GenerateRequest(prompt=prompt, adapter=adapter)
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0
    md = [("application", plat.app), *plat.auth, ("multiplexed_model_id", adapter)]
    t0 = time.perf_counter()
    ttft, ids = None, []
    async for msg in plat.stub.Generate(req, metadata=md, timeout=600):
        if msg.HasField("delta"):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            ids.extend(msg.delta.token_ids)
    return ttft, ids


# -- main -------------------------------------------------------------------------


async def main_async(args) -> dict:
    from contextlib import nullcontext

    from hybridserve import platform as local

    work = Path(args.work).resolve() / args.model
    base, name, adapter_dirs = build_assets(
        args.model, work, 8, Path(args.base_dir) if args.base_dir else None,
        Path(args.store_dir) if args.store_dir else None, args.base_name)
    cfg = base_config(base, name, work, args)
    if args.address:
        import ray
        from hybridserve.tenancy.bootstrap import read_key_file

        os.environ["HYBRIDSERVE_API_KEY"] = read_key_file(Path(args.api_key_file))
        ray.init(address="auto", namespace="hybridserve", log_to_driver=False)
        address, running = args.address, nullcontext()
        store = Path(args.store_dir)
    else:
        running = local.start(cfg, progress=lambda m: print("[bench]", m, flush=True))
        use_admin_key(cfg)
        address = running.grpc_address
        store = cfg.adapter_store
    apps = Apps(cfg, args)
    out: dict = {"model": args.model, "rounds": args.rounds, "streams": args.streams,
                 "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
                 "when": time.strftime("%Y-%m-%d %H:%M")}
    try:
        for part in args.parts:
            apps.deploy(part)
            try:
                if part == "base":
                    out[part] = await part_base(apps, address, args)
                elif part == "slots":
                    out[part] = await part_slots(apps, address, args, adapter_dirs)
                elif part == "fit":
                    out[part] = await part_slots(apps, address, args, adapter_dirs, "fit", 4)
                elif part == "mixed":
                    out[part] = await part_mixed(apps, address, args, adapter_dirs)
                elif part == "overload":
                    out[part] = await part_overload(apps, address, args)
                elif part == "many":
                    out[part] = await part_many(apps, address, args, base, store, name)
            finally:
                apps.remove(part)
        return out
    finally:
        if not args.address:
            running.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--parts", default="base,slots,fit,mixed,overload,many")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ghz-low", type=int, default=16)
    p.add_argument("--ghz-low-total", type=int, default=300)
    p.add_argument("--ghz-high", type=int, default=400)
    p.add_argument("--ghz-storm-total", type=int, default=2000,
                   help="calls of the storm (at --ghz-high concurrent)")
    p.add_argument("--many", type=int, default=1000, help="distinct adapters in the many part")
    p.add_argument("--many-samples", type=int, default=20, help="outputs checked against PEFT")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "hybridserve" / "bench-routing"))
    p.add_argument("--address", help="use a running platform's apps instead of deploying")
    p.add_argument("--app", default="generation", help="its one-replica app (with --address)")
    p.add_argument("--two-replica-app", default="generation",
                   help="its two-replica app (with --address)")
    p.add_argument("--api-key-file", help="its admin key (with --address)")
    p.add_argument("--store-dir", help="its adapter store (with --address)")
    p.add_argument("--base-dir", help="its base model folder (with --address)")
    p.add_argument("--base-name", default="tiny-llama", help="its served model name")
    p.add_argument("--smoke", action="store_true", help="one short round of each part")
    p.add_argument("--tag", default="", help="suffix for the results file")
    args = p.parse_args()
    args.parts = [x for x in args.parts.split(",") if x]
    if args.address and not (args.api_key_file and args.store_dir and args.base_dir):
        p.error("--address needs --api-key-file, --store-dir and --base-dir")
    if args.smoke:
        args.rounds, args.streams, args.max_tokens = 2, 2, 4
        args.ghz_low, args.ghz_low_total, args.ghz_high, args.ghz_storm_total = 2, 4, 4, 8
        args.many, args.many_samples = 3, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = asyncio.run(main_async(args))
    (ROOT / "results").mkdir(exist_ok=True)
    name = "smoke" if args.smoke else args.model + (f"-{args.tag}" if args.tag else "")
    path = ROOT / "results" / f"routing-{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
