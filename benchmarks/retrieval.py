"""Knowledge-path benchmarks: ingestion vs raw embedding, search latency, rerank batching.

All against the real stack: gRPC client -> Serve gRPC proxy -> retrieval /
embedder / rerank replicas -> a real weaviate-server (started here on loopback
with a throwaway data dir). Comparisons are interleaved round by round in one
run and the median of the per-round ratios is reported (this machine drifts).

  ingest : Upsert of fresh documents end to end (chunk, embed via the Embedder
           deployment, write to Weaviate) vs sentence-transformers `encode` of
           the same chunk texts in this process, same thread count.
  search : p50/p99 latency and QPS of keyword (alpha 0), vector (1) and hybrid
           (0.5) search over >= 20k chunks, at a fixed concurrency; and the
           server-side stages (embed, retrieve, total) of the same searches, read
           from the platform's stage histograms on Ray's metrics endpoint.
  rerank : throughput of concurrent Rerank calls with Serve batching vs the same
           load on a deployment that scores one request at a time.

Usage:
  .venv/bin/python benchmarks/retrieval.py [--rounds 3] [--search-chunks 20000]
  .venv/bin/python benchmarks/retrieval.py --smoke --address HOST:PORT --api-key-file F \
      --config C --metrics-url URL        # one short round against a running platform

Writes benchmarks/results/retrieval.json (retrieval-smoke.json with --smoke). Every
load is bounded in count. With --address, this process joins the platform's Ray
cluster (`ray.init(address="auto")`) to deploy the one-at-a-time rerank app beside
it, and removes that app afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from generation import _free_port, _pct, use_admin_key  # noqa: E402

WORDS = (
    "harbour crane container vessel tide lighthouse keeper engine valve pressure pump filter "
    "invoice refund customer account password token server latency cache replica tenant "
    "garden tomato compost soil water seed leaf root bicycle chain tire brake gear saddle "
    "coffee grinder espresso milk bean roast kettle oven bread flour yeast salt butter "
    "policy leave expense travel meeting report budget quarter revenue margin forecast "
    "the a of to and in is for on with as by at from that this it be are was were"
).split()




def _text(rng: random.Random, words: int) -> str:
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(8, 16):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def start_platform(work: Path, args):
    from hybridserve import platform as local
    from hybridserve.config import HybridServeConfig

    wport = _free_port()
    while wport > 55000:
        wport = _free_port()
    cfg = HybridServeConfig(
        data_dir=work / "data",
        serve={"grpc_port": _free_port(), "http_port": _free_port(), "apps": ["retrieval", "rerank"]},
        weaviate={"http_port": wport, "grpc_port": _free_port(), "write_timeout_s": 300,
                  "query_timeout_s": 30},
        retrieval={"max_documents_per_request": 256, "max_top_k": 100},
        rerank={"max_batch_size": args.rerank_batch},
    )
    plat = local.start(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    use_admin_key(cfg)
    deploy_unbatched_rerank(cfg)
    return plat, cfg


def deploy_unbatched_rerank(cfg) -> None:
    """The `rerank1` app: the rerank deployment with batches of one (the baseline)."""
    from hybridserve.app import build_rerank_app
    from ray import serve

    one = cfg.model_copy(deep=True)
    one.rerank.max_batch_size = 1
    one.rerank.cpus_per_replica = 0  # beside a running platform whose CPUs are all taken
    serve.run(build_rerank_app(one), name="rerank1", route_prefix="/rerank1")


class _Running:
    """A platform this benchmark did not start: only its address and metrics URL."""

    def __init__(self, address: str, metrics_url: str):
        self.grpc_address, self.metrics_url = address, metrics_url

    def stop(self) -> None:
        from ray import serve

        serve.delete("rerank1")


def join_platform(args):
    import ray
    from hybridserve.config import HybridServeConfig
    from hybridserve.tenancy.bootstrap import read_key_file

    os.environ["HYBRIDSERVE_API_KEY"] = read_key_file(Path(args.api_key_file))
    cfg = HybridServeConfig.load(args.config)
    ray.init(address="auto", namespace="hybridserve", log_to_driver=False)
    deploy_unbatched_rerank(cfg)
    return _Running(args.address, args.metrics_url), cfg


def bench_ingest(client, cfg, rounds: int, docs_per_round: int, words: int):
    from hybridserve.retrieval.chunking import chunk_text
    from hybridserve.embedding import SentenceTransformerEmbedder

    emb = SentenceTransformerEmbedder(None, batch_size=cfg.retrieval.embed_batch_size,
                                      threads=os.cpu_count() or 1)
    rng = random.Random(1)
    out = []
    for r in range(rounds):
        tenant = f"ingest-{r}-{uuid.uuid4().hex[:6]}"
        client.create_tenant(tenant)
        docs = [{"id": f"d{i}", "text": _text(rng, words), "title": f"Doc {i}"} for i in range(docs_per_round)]
        chunks = [c for d in docs for c in chunk_text(
            emb.tokenizer, d["text"], cfg.retrieval.chunk_tokens, cfg.retrieval.chunk_overlap)]
        # Alternate which side goes first, so drift does not favour one.
        sides = ["raw", "platform"] if r % 2 == 0 else ["platform", "raw"]
        res = {}
        for side in sides:
            t0 = time.perf_counter()
            if side == "raw":
                emb.embed(chunks)
                res["raw"] = len(chunks) / (time.perf_counter() - t0)
            else:
                written = 0
                step = min(64, cfg.retrieval.max_documents_per_request)
                for i in range(0, len(docs), step):
                    reply = client.upsert(tenant, docs[i : i + step], timeout=600)
                    assert not reply.failures, reply.failures[:3]
                    written += reply.chunks_written
                assert written == len(chunks), (written, len(chunks))
                res["platform"] = written / (time.perf_counter() - t0)
        res["chunks"] = len(chunks)
        res["ratio"] = res["platform"] / res["raw"]
        print(f"ingest round {r}: {res['chunks']} chunks, platform {res['platform']:.1f}/s, "
              f"raw encode {res['raw']:.1f}/s, ratio {res['ratio']:.2f}", flush=True)
        out.append(res)
        client.delete_tenant(tenant)
    return {"rounds": out, "median_ratio": statistics.median(x["ratio"] for x in out)}


def load_search_corpus(client, n_chunks: int, per_call: int = 256) -> str:
    tenant = f"search-{uuid.uuid4().hex[:6]}"
    client.create_tenant(tenant)
    rng = random.Random(2)
    t0 = time.perf_counter()
    written = 0
    batch = []
    for i in range(n_chunks):
        # ~40 words: one chunk per document.
        batch.append({"id": f"s{i}", "text": _text(rng, 40), "metadata": {"shard": str(i % 10)}})
        if len(batch) == per_call or i == n_chunks - 1:
            reply = client.upsert(tenant, batch, timeout=900)
            assert not reply.failures
            written += reply.chunks_written
            batch = []
            print(f"\rsearch corpus: {written}/{n_chunks} chunks", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    took = time.perf_counter() - t0
    print(f"search corpus: {written} chunks in {took:.0f} s ({written / took:.0f}/s)", flush=True)
    return tenant


def stage_histograms(metrics_url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the retrieval service's stages, summed over Ray's
    per-process labels: {stage: {le: count}}, as Ray's metrics agent serves them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "ray_hybridserve_stage_duration_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_bucket") and labels.get("service") == "retrieval":
                le = float(labels["le"])
                stage = out.setdefault(labels["stage"], {})
                stage[le] = stage.get(le, 0.0) + sample.value
    return out


def _bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """histogram_quantile over cumulative buckets (linear within the bucket)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    rank, low, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return low
            inside = buckets[le] - below
            return low + (le - low) * ((rank - below) / inside if inside else 1.0)
        low, below = le, buckets[le]
    return low


def stage_split(metrics_url: str, before: dict, expected: int) -> dict[str, dict[str, float]]:
    """p50/p90 per stage of the searches since `before`, from the stage histograms.
    Waits (bounded) until Ray's agent, which reports every 10 s, shows all of them."""
    deadline = time.monotonic() + 90
    while True:
        after = stage_histograms(metrics_url)
        delta = {
            stage: {le: n - before.get(stage, {}).get(le, 0.0) for le, n in b.items()}
            for stage, b in after.items()
        }
        count = delta.get("total", {}).get(float("inf"), 0.0)
        if count >= expected or time.monotonic() > deadline:
            break
        time.sleep(2)
    return {
        stage: {"calls": b[float("inf")], "p50_ms": 1e3 * _bucket_quantile(b, 0.5),
                "p90_ms": 1e3 * _bucket_quantile(b, 0.9)}
        for stage, b in delta.items() if b.get(float("inf"))
    }


def bench_search(client, tenant: str, queries: int, concurrency: int, metrics_url: str):
    rng = random.Random(3)
    qs = [" ".join(rng.choice(WORDS[:60]) for _ in range(5)) for _ in range(queries)]
    out = {}
    for name, alpha in (("keyword", 0.0), ("vector", 1.0), ("hybrid", 0.5)):
        client.search(tenant, qs[0], top_k=10, alpha=alpha)  # warm
        time.sleep(11)  # the warm call reaches Ray's agent before the baseline is taken
        before = stage_histograms(metrics_url)

        def one(q):
            t = time.perf_counter()
            hits = client.search(tenant, q, top_k=10, alpha=alpha)
            assert hits
            return time.perf_counter() - t

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            lat = list(pool.map(one, qs))
        wall = time.perf_counter() - t0
        out[name] = {"p50_ms": _pct(lat, 50) * 1e3, "p99_ms": _pct(lat, 99) * 1e3,
                     "qps": len(qs) / wall, "queries": len(qs), "concurrency": concurrency}
        # Server-side stages (embed: the query's Embedder call, retrieve: Weaviate),
        # from hybridserve's own stage histograms: bucket-interpolated, so coarse.
        out[name]["stages"] = stage_split(metrics_url, before, len(qs))
        print(f"search {name}: p50 {out[name]['p50_ms']:.1f} ms, p99 {out[name]['p99_ms']:.1f} ms, "
              f"{out[name]['qps']:.1f} QPS; server stages p50: " + ", ".join(
                  f"{k} {v['p50_ms']:.0f} ms" for k, v in sorted(out[name]["stages"].items())),
              flush=True)
    return out


def bench_rerank(address: str, rounds: int, calls: int, concurrency: int, passages: int):
    from hybridserve.client import HybridServeClient

    rng = random.Random(4)
    reqs = [(_text(rng, 8), [_text(rng, 60) for _ in range(passages)]) for _ in range(calls)]
    out = []
    with HybridServeClient(address) as batched, HybridServeClient(address) as single:
        single.rerank_app = "rerank1"
        for c in (batched, single):
            c.rerank(*reqs[0])
        for r in range(rounds):
            res = {}
            order = [("batched", batched), ("one_at_a_time", single)]
            for name, c in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(lambda q: c.rerank(q[0], q[1]), reqs))
                res[name] = len(reqs) / (time.perf_counter() - t0)
            res["ratio"] = res["batched"] / res["one_at_a_time"]
            print(f"rerank round {r}: batched {res['batched']:.1f} calls/s, one at a time "
                  f"{res['one_at_a_time']:.1f} calls/s, ratio {res['ratio']:.2f}", flush=True)
            out.append(res)
    from ray import serve

    sizes = serve.get_app_handle("rerank").stats.remote().result(timeout_s=30)["batch_sizes"]
    return {"rounds": out, "median_ratio": statistics.median(x["ratio"] for x in out),
            "calls": calls, "concurrency": concurrency, "passages_per_call": passages,
            "batch_sizes": sizes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ingest-docs", type=int, default=120, help="documents per ingest round")
    p.add_argument("--ingest-words", type=int, default=600, help="words per ingested document")
    p.add_argument("--search-chunks", type=int, default=20000)
    p.add_argument("--search-queries", type=int, default=400)
    p.add_argument("--search-concurrency", type=int, default=8)
    p.add_argument("--rerank-calls", type=int, default=96)
    p.add_argument("--rerank-concurrency", type=int, default=16)
    p.add_argument("--rerank-passages", type=int, default=10)
    p.add_argument("--rerank-batch", type=int, default=16)
    p.add_argument("--skip", action="append", default=[], choices=["ingest", "search", "rerank"])
    p.add_argument("--tag", default="")
    p.add_argument("--address", help="use a running platform (its retrieval and rerank apps)")
    p.add_argument("--api-key-file", help="its admin key (with --address)")
    p.add_argument("--config", help="its config file (with --address: chunking, limits)")
    p.add_argument("--metrics-url", help="its Ray metrics endpoint (with --address)")
    p.add_argument("--smoke", action="store_true",
                   help="one short round of each part (checks that the benchmark still runs)")
    args = p.parse_args()
    if args.address and not (args.api_key_file and args.config and args.metrics_url):
        p.error("--address needs --api-key-file, --config and --metrics-url")
    if args.smoke:
        args.rounds, args.ingest_docs, args.ingest_words = 1, 4, 200
        args.search_chunks, args.search_queries, args.search_concurrency = 64, 8, 2
        args.rerank_calls, args.rerank_concurrency, args.rerank_passages = 4, 2, 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from hybridserve.client import HybridServeClient

    results = {"args": vars(args), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory(prefix="hs-bench-") as tmp:
        plat, cfg = join_platform(args) if args.address else start_platform(Path(tmp), args)
        try:
            with HybridServeClient(plat.grpc_address) as client:
                if "ingest" not in args.skip:
                    results["ingest"] = bench_ingest(client, cfg, args.rounds, args.ingest_docs,
                                                     args.ingest_words)
                if "search" not in args.skip:
                    tenant = load_search_corpus(
                        client, args.search_chunks,
                        min(256, cfg.retrieval.max_documents_per_request))
                    results["search"] = bench_search(client, tenant, args.search_queries,
                                                     args.search_concurrency, plat.metrics_url)
                    results["search"]["chunks"] = args.search_chunks
            if "rerank" not in args.skip:
                results["rerank"] = bench_rerank(plat.grpc_address, args.rounds, args.rerank_calls,
                                                 args.rerank_concurrency, args.rerank_passages)
        finally:
            plat.stop()
    (ROOT / "results").mkdir(exist_ok=True)
    name = "smoke" if args.smoke else args.tag
    path = ROOT / "results" / f"retrieval{'-' + name if name else ''}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
