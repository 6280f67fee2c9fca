"""RagService.Ask benchmarks, on the real platform (Serve gRPC proxy, the rag gateway,
retrieval + weaviate-server, rerank, vLLM generation).

  overhead   : Ask end to end vs the same work called stage by stage from the client
               (Search, the fused order, the prompt built client-side, Generate with its
               token ids), interleaved per question; and the server-side stage timings.
  ttft       : the median time of each stage of an Ask, up to the first token.
  prefetch   : TTFT of an Ask whose adapter is cold (registered just before, never
               loaded), on a gateway that prefetches the adapter during retrieval vs
               one that does not, interleaved.
  throughput : Asks/s and tokens/s of 2 tenants x 2 adapters mixed vs 1 tenant with 1
               adapter, same concurrency, interleaved.
  embed      : where the query is embedded: in the gateway replica (no hop) vs through
               the retrieval app's batched Embedder deployment (a handle hop from the
               retrieval replica), same questions interleaved, sequential and at the
               throughput concurrency.

Usage:
  .venv/bin/python benchmarks/rag.py [--model tiny|smollm2] [--rounds 4]
  .venv/bin/python benchmarks/rag.py --smoke --address HOST:PORT --api-key-file F
      (one short round against a running platform; the test suite runs this)

Starts its own platform (tiny model, or SmolLM2) unless --address is given. Writes
benchmarks/results/rag-<model>.json (rag-smoke.json with --smoke). Every load is
bounded in count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # the repo root, for testkit/
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results"
DATA = ROOT.parent / "tests" / "data" / "knowledge"


def _pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _corpus():
    corpus = [json.loads(x) for x in (DATA / "corpus.jsonl").read_text().splitlines()]
    questions = [json.loads(x)["question"] for x in (DATA / "questions.jsonl").read_text().splitlines()]
    return corpus, questions


def _tenant(admin, address, adapters, corpus, name):
    from hybridserve.client import HybridServeClient

    admin.create_tenant(name, allow_base=not adapters)
    for i, a in enumerate(adapters):
        admin.grant_adapter(name, a, make_default=i == 0)
    key = admin.create_key(name, name="bench").secret
    with HybridServeClient(address, api_key=key) as c:
        assert not c.upsert("", corpus).failures
    return key


def bench_overhead(address, key, questions, rounds, max_tokens, app, gen_app, model_dir,
                   max_model_len, instructions):
    """Ask vs the same stages from the client, per question, interleaved."""
    from hybridserve.answers import Token
    from hybridserve.client import HybridServeClient
    from hybridserve.rag.prompt import HFChatTokenizer, PromptBuilder
    from hybridserve.rerank import fusion

    builder = PromptBuilder(HFChatTokenizer(model_dir), max_model_len, instructions)
    ask_ms, direct_ms, server = [], [], []
    with HybridServeClient(address, api_key=key, application=gen_app) as c:
        tenant = c.whoami().tenant
        for r in range(rounds):
            for i, q in enumerate(questions):
                order = ("ask", "direct") if (r + i) % 2 == 0 else ("direct", "ask")
                for side in order:
                    t0 = time.perf_counter()
                    if side == "ask":
                        events = list(c.ask_stream(q, app=app, max_tokens=max_tokens,
                                                   temperature=0))
                        ask_ms.append((time.perf_counter() - t0) * 1e3)
                        server.append(events[-1].timings)
                        assert any(isinstance(e, Token) for e in events)
                        continue
                    hits = c.search("", q, top_k=8)
                    # As the gateway does: the default reranker's score is the vector
                    # score search returned (no rerank call).
                    scores = [h.vector_score for h in hits]
                    kept = [hits[j] for j in fusion.order([h.score for h in hits], scores, 5.0)[:4]]
                    built = builder.build(question=q, max_tokens=max_tokens,
                                          passages=[(h.title, h.text) for h in kept],
                                          system_prompt=tenant.system_prompt)
                    c.generate(prompt_token_ids=built.token_ids, adapter=tenant.default_adapter,
                               max_tokens=max_tokens, temperature=0)
                    direct_ms.append((time.perf_counter() - t0) * 1e3)
    added = [a - d for a, d in zip(ask_ms, direct_ms, strict=False)]
    stage_sum = [t.auth_ms + t.quota_ms + t.embed_ms + t.retrieve_ms + t.rerank_ms + t.prompt_ms
                 for t in server]
    return {
        "asks": len(ask_ms),
        "ask_p50_ms": _pct(ask_ms, 50), "ask_p99_ms": _pct(ask_ms, 99),
        "direct_p50_ms": _pct(direct_ms, 50), "direct_p99_ms": _pct(direct_ms, 99),
        "added_p50_ms": _pct(added, 50), "added_p99_ms": _pct(added, 99),
        "server_stages_before_generation_p50_ms": _pct(stage_sum, 50),
        "stages_p50_ms": {name: _pct([getattr(t, f"{name}_ms") for t in server], 50)
                          for name in ("auth", "quota", "embed", "retrieve", "rerank", "prompt",
                                       "queue", "first_token", "total")},
    }


def make_loras(base_dir: Path, folders: list[Path], base_name: str, seed: int = 0) -> None:
    """Random rank-8 LoRA adapters (non-zero B, so each changes the output) for any
    Llama-style base: tiny test models through the cached builder, others with PEFT."""
    from testkit.tiny import _TINY_MARKER, build_lora_adapter

    todo = [f for f in folders if not (f / "adapter_config.json").is_file()]
    if not todo:
        return
    if (Path(base_dir) / _TINY_MARKER).is_file():
        for i, folder in enumerate(todo):
            build_lora_adapter(base_dir, folder, seed=seed + i, rank=8, base_model_name=base_name)
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(seed)
    for folder in todo:
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.empty_like(param).uniform_(-0.02, 0.02, generator=gen))
        peft.save_pretrained(str(folder))
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(cfg, indent=2))


def bench_prefetch(address, admin, store_dir, base_dir, base_name, corpus, questions, rounds,
                   apps):
    """Cold-adapter TTFT with and without prefetch: each Ask uses a new adapter."""
    from hybridserve.client import HybridServeClient

    names = [f"cold-{uuid.uuid4().hex[:8]}" for _ in range(rounds * len(apps))]
    make_loras(base_dir, [store_dir / n for n in names], base_name, seed=1000)
    out = {side: [] for side in apps}
    for r in range(rounds):
        for side in (list(apps) if r % 2 == 0 else list(reversed(apps))):
            name = names.pop()
            adapter = admin.register_adapter(name, name).adapter.id
            tenant = f"pf-{uuid.uuid4().hex[:6]}"
            key = _tenant(admin, address, [adapter], corpus[:6], tenant)
            with HybridServeClient(address, api_key=key) as c:
                answer = c.ask(questions[r % len(questions)], app=apps[side], max_tokens=4,
                               temperature=0)
            out[side].append(answer.timings.first_token_ms)
    ratio = [a / b for a, b in zip(out["prefetch"], out["no_prefetch"], strict=False)]
    return {
        "asks_per_side": rounds,
        "ttft_prefetch_p50_ms": _pct(out["prefetch"], 50),
        "ttft_no_prefetch_p50_ms": _pct(out["no_prefetch"], 50),
        "ratio_median": statistics.median(ratio) if ratio else float("nan"),
        "ratio_of_p50": _pct(out["prefetch"], 50) / _pct(out["no_prefetch"], 50),
    }


def bench_embed(address, key, questions, rounds, concurrency, apps):
    """embed + retrieve time of Asks, gateway-embedded vs Embedder-embedded."""
    from hybridserve.client import HybridServeClient

    def one(app, q):
        with HybridServeClient(address, api_key=key) as c:
            t = c.ask(q, app=app, max_tokens=1, temperature=0).timings
            return t.embed_ms + t.retrieve_ms, t.first_token_ms

    out = {side: {"seq": [], "conc": [], "ttft": []} for side in apps}
    for r in range(rounds):
        for side in (list(apps) if r % 2 == 0 else list(reversed(apps))):
            for q in questions:
                er, ttft = one(apps[side], q)
                out[side]["seq"].append(er)
                out[side]["ttft"].append(ttft)
            with ThreadPoolExecutor(concurrency) as pool:
                out[side]["conc"].extend(er for er, _ in pool.map(
                    lambda q, side=side: one(apps[side], q), questions * 2))
    return {side: {"embed_retrieve_p50_ms": _pct(v["seq"], 50),
                   "embed_retrieve_p50_ms_concurrent": _pct(v["conc"], 50),
                   "first_token_p50_ms": _pct(v["ttft"], 50)} for side, v in out.items()}


def bench_throughput(address, keys_mixed, key_single, questions, rounds, concurrency, max_tokens,
                     app):
    from hybridserve.client import HybridServeClient

    def load(keys):
        def one(i):
            with HybridServeClient(address, api_key=keys[i % len(keys)]) as c:
                a = c.ask(questions[i % len(questions)], app=app, max_tokens=max_tokens,
                          temperature=0)
                return a.usage.completion_tokens
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = sum(pool.map(one, range(concurrency * 2)))
        wall = time.perf_counter() - t0
        return concurrency * 2 / wall, tokens / wall

    results = {"mixed": [], "single": []}
    for r in range(rounds):
        for side in (("mixed", "single") if r % 2 == 0 else ("single", "mixed")):
            results[side].append(load(keys_mixed if side == "mixed" else [key_single]))
    ratio = [m[1] / s[1] for m, s in zip(results["mixed"], results["single"], strict=False)]
    return {
        "concurrency": concurrency,
        "mixed_asks_per_s": statistics.median(x[0] for x in results["mixed"]),
        "single_asks_per_s": statistics.median(x[0] for x in results["single"]),
        "mixed_tok_s": statistics.median(x[1] for x in results["mixed"]),
        "single_tok_s": statistics.median(x[1] for x in results["single"]),
        "tok_s_ratio_median": statistics.median(ratio),
    }


def start_platform(model: str, work: Path):
    """A local platform: the chosen model with 4 adapters on the `generation` app,
    and two gateways (`rag` prefetches adapters, `rag-noprefetch` does not)."""
    from generation import _free_port, use_admin_key
    from hybridserve import platform as local
    from hybridserve.config import HybridServeConfig
    from testkit.tiny import build_tiny_llama

    data = work / "data"
    ports = [_free_port() for _ in range(5)]
    weaviate_http = _free_port()
    while weaviate_http > 55000:
        weaviate_http = _free_port()
    base = {
        "data_dir": str(data),
        "serve": {"grpc_port": ports[0], "http_port": ports[1]},
        "generation": {"cpus_per_replica": 0.5},
        "observability": {"metrics_export_port": ports[2]},
        "weaviate": {"http_port": weaviate_http, "grpc_port": ports[3]},
        "engine": {"max_lora_rank": 8, "max_num_seqs": 16, "kv_cache_space_gib": 1},
    }
    if model == "tiny":
        base_dir = build_tiny_llama(work / "models" / "tiny-llama")
        base["model"] = {"path": str(base_dir), "name": "tiny-llama", "max_model_len": 1024}
        base_name = "tiny-llama"
    else:
        base_dir, base_name = None, None
    cfg = HybridServeConfig.model_validate(base)
    if base_dir is None:
        from hybridserve.platform import ensure_model

        base_dir = ensure_model(cfg)
        base_name = cfg.model.name
    store = cfg.adapter_store
    make_loras(base_dir, [store / f"a{i}" for i in range(4)], base_name, seed=200)
    no_prefetch = cfg.model_copy(deep=True)
    no_prefetch.rag.prefetch_adapter = False
    via_embedder = cfg.model_copy(deep=True)
    via_embedder.rag.embed_in_gateway = False
    running = local.start(cfg, progress=lambda m: print("[bench]", m, flush=True),
                          rag_apps={"rag": cfg, "rag-noprefetch": no_prefetch,
                                    "rag-embedder": via_embedder})
    use_admin_key(cfg)
    return running, cfg, base_dir, base_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--questions", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--address", help="use a running platform (its `rag` and `generation` apps)")
    p.add_argument("--api-key-file", help="the admin key of that platform")
    p.add_argument("--model-dir", help="the served model's folder (with --address: for the "
                   "overhead part, which rebuilds the prompt client-side)")
    p.add_argument("--max-model-len", type=int, default=2048, help="with --address")
    p.add_argument("--smoke", action="store_true", help="one short round of each part")
    p.add_argument("--parts", default="overhead,prefetch,embed,throughput",
                   help="comma-separated parts to run (default: all)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.questions, args.concurrency, args.max_tokens = 1, 2, 2, 4
    parts = set(args.parts.split(","))

    from hybridserve.client import HybridServeClient

    corpus, questions = _corpus()
    questions = questions[: args.questions]
    running = None
    work = Path(tempfile.mkdtemp(prefix="hs-rag-bench-"))
    if args.address:
        address = args.address
        from hybridserve.client import resolve_api_key

        admin_key = resolve_api_key(None, args.api_key_file)
        cfg = None
    else:
        running, cfg, base_dir, base_name = start_platform(args.model, work)
        address = running.grpc_address
        admin_key = None
    results: dict = {"model": args.model, "args": vars(args)}
    try:
        with HybridServeClient(address, api_key=admin_key) as admin:
            if cfg is not None:
                for i in range(4):
                    admin.register_adapter(f"a{i}", f"a{i}")
            adapters = sorted(a.id for a in admin.list_adapters())[:4]
            assert len(adapters) >= 2, f"the platform has too few adapters: {adapters}"
            run = uuid.uuid4().hex[:6]
            key_single = _tenant(admin, address, adapters[:1], corpus, f"bench-single-{run}")
            keys_mixed = [
                _tenant(admin, address, adapters[0:2], corpus, f"bench-m1-{run}"),
                _tenant(admin, address, adapters[2:4] or adapters[0:2], corpus, f"bench-m2-{run}"),
            ]
            if cfg is not None:
                model_dir = cfg.model.path or base_dir
                max_model_len, instructions = cfg.model.max_model_len, cfg.rag.instructions
            else:
                from hybridserve.config import HybridServeConfig

                defaults = HybridServeConfig()
                model_dir, max_model_len = args.model_dir, args.max_model_len
                instructions = defaults.rag.instructions
            if model_dir is not None and "overhead" in parts:
                results["overhead"] = bench_overhead(
                    address, key_single, questions, args.rounds, args.max_tokens, "rag",
                    "generation", model_dir, max_model_len, instructions)
                print(json.dumps(results["overhead"]), flush=True)
            if cfg is not None and "prefetch" in parts:
                results["prefetch"] = bench_prefetch(
                    address, admin, cfg.adapter_store, base_dir, base_name, corpus, questions,
                    max(args.rounds * 2, 2), {"prefetch": "rag", "no_prefetch": "rag-noprefetch"})
                print(json.dumps(results["prefetch"]), flush=True)
            if cfg is not None and "embed" in parts:
                results["embed"] = bench_embed(
                    address, key_single, questions, args.rounds, args.concurrency,
                    {"gateway": "rag", "embedder": "rag-embedder"})
                print(json.dumps(results["embed"]), flush=True)
            if "throughput" in parts:
                results["throughput"] = bench_throughput(
                    address, keys_mixed, key_single, questions, args.rounds, args.concurrency,
                    args.max_tokens, "rag")
                print(json.dumps(results["throughput"]), flush=True)
    finally:
        if running is not None:
            running.stop()
    RESULTS.mkdir(exist_ok=True)
    name = "rag-smoke.json" if args.smoke else f"rag-{args.model}.json"
    if not args.smoke and parts != {"overhead", "prefetch", "embed", "throughput"}:
        name = f"rag-{args.model}-{'-'.join(sorted(parts))}.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
