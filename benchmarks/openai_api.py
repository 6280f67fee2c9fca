"""OpenAI-compatible API benchmarks: the HTTP API (/v1) vs the gRPC API, side by side.

The HTTP arm goes through the `openai` app (Serve's HTTP proxy, /v1); the gRPC arm
through the same platform's gRPC apps. The two arms are interleaved round by round
(this machine's speed drifts by up to 2x over minutes), and each ratio is the median of
the per-round ratios.

  stream : aggregate streamed tokens/s of N concurrent chat completions (stream=True,
           the official `openai` client) vs N concurrent Generate streams (the SDK's
           `HybridServeClient.generate_stream` with the same chat message), the same
           adapter (or the base model), greedy, the same max_tokens. Greedy: both arms
           produce the same tokens. The arm that goes first alternates per round.
  ttft   : time to the first content token, one request at a time, HTTP and gRPC
           alternating request by request. Every request has a fresh prompt, so neither
           arm hits a prefix the other just cached (both arms are the same tenant).
  rag    : a chat completion with `rag` (not streamed) vs Ask (gRPC), end to end, one
           at a time, alternating, on a tenant with a few documents ingested (the
           support corpus of tests/data/knowledge). Each question carries a fresh tag,
           for the same reason as in ttft.

Usage (against a running platform; an admin key creates the tenant, its key and its
documents, and deletes the tenant at the end):
  .venv/bin/python benchmarks/openai_api.py --address 127.0.0.1:50051 --api-key-file KEY \\
      --openai-url http://127.0.0.1:8765/v1 [--adapter NAME_OR_ID] [--rounds 4]
  .venv/bin/python benchmarks/openai_api.py --smoke --address ... --api-key-file ... \\
      --openai-url ...     (one tiny round at concurrency 2; the test suite runs this)

The HTTP arm answers through the `openai` app's gateway, which generates with
`rag.generation_app` of its config; `--app` and `--rag-app` must name the gRPC apps it
is paired with (the defaults, `generation` and `rag`, are what `hybridserve up` runs).

Writes benchmarks/results/openai_api.json (openai_api-smoke.json with --smoke) and
prints a table. Every load is bounded in count (rounds x requests x max_tokens) and in
time (a per-request timeout, and no round starts after --budget-s). --smoke asserts that
every request succeeded and every figure is finite, never a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from generation import PROMPTS  # noqa: E402

RESULTS = ROOT / "results"
DATA = ROOT.parent / "tests" / "data" / "knowledge"
ARMS = ("http", "grpc")
PARTS = ("stream", "ttft", "rag")
#: Retrieval options, the same on both arms: min_score -1 so that every question has
#: passages (an answer without context skips generation and would time nothing).
TOP_K, MIN_SCORE = 4, -1.0


def _p50(values):
    return statistics.median(values) if values else float("nan")


def _fresh(text: str) -> str:
    """`text` with a unique tag of fixed length in front (a prompt no cache has seen)."""
    return f"[{uuid.uuid4().hex[:8]}] {text}"


@dataclass
class Sample:
    """One request: time to the first content token, end to end, completion tokens."""

    ttft_s: float
    total_s: float
    tokens: int
    #: no delta carried text (ttft_s is then the end of the stream)
    no_text: bool = False


@dataclass
class Target:
    """The two clients and what they answer with (the same model on both)."""

    http: object  # openai.OpenAI
    grpc: object  # hybridserve.client.HybridServeClient
    #: the HTTP `model` of a plain completion: the adapter's id, or the base model's name
    chat_model: str
    #: the HTTP `model` of a RAG completion: the adapter's id, or `default` (as Ask's
    #: empty adapter: the tenant's default, here the base model)
    rag_model: str
    adapter: str
    rag_app: str
    timeout_s: float


# -- one request per arm ---------------------------------------------------------------


def http_stream(t: Target, prompt: str, max_tokens: int) -> Sample:
    t0 = time.perf_counter()
    first, tokens = None, None
    stream = t.http.chat.completions.create(
        model=t.chat_model, messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    with stream:
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    if tokens is None:
        raise RuntimeError("the stream ended without its usage chunk")
    return Sample(first if first is not None else total, total, tokens, first is None)


def grpc_stream(t: Target, prompt: str, max_tokens: int) -> Sample:
    t0 = time.perf_counter()
    first, tokens = None, None
    for msg in t.grpc.generate_stream(messages=[("user", prompt)], adapter=t.adapter,
                                      max_tokens=max_tokens, temperature=0.0,
                                      timeout=t.timeout_s):
        if msg.HasField("delta"):
            if first is None and msg.delta.text:
                first = time.perf_counter() - t0
        elif msg.HasField("final"):
            tokens = msg.final.usage.completion_tokens
    total = time.perf_counter() - t0
    if tokens is None:
        raise RuntimeError("the stream ended without its final message")
    return Sample(first if first is not None else total, total, tokens, first is None)


def http_rag(t: Target, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    out = t.http.chat.completions.create(
        model=t.rag_model, messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens, temperature=0,
        extra_body={"rag": {"top_k": TOP_K, "min_score": MIN_SCORE}})
    total = time.perf_counter() - t0
    extra = out.model_extra or {}
    return {"ms": total * 1e3, "tokens": out.usage.completion_tokens,
            "sources": len(extra.get("sources") or ()),
            "finish": extra["rag"]["finish_reason"],
            "server_total_ms": extra["rag"]["timings"]["total_ms"]}


def grpc_rag(t: Target, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ans = t.grpc.ask(question, app=t.rag_app, adapter=t.adapter, top_k=TOP_K,
                     min_score=MIN_SCORE, max_tokens=max_tokens, temperature=0.0,
                     timeout=t.timeout_s)
    total = time.perf_counter() - t0
    return {"ms": total * 1e3, "tokens": ans.final.usage.completion_tokens,
            "sources": len(ans.citations), "finish": ans.final.finish_reason,
            "server_total_ms": ans.final.timings.total_ms}


STREAM = {"http": http_stream, "grpc": grpc_stream}
RAG = {"http": http_rag, "grpc": grpc_rag}


# -- the parts, one round each ------------------------------------------------------------


def stream_load(pool: ThreadPoolExecutor, t: Target, arm: str, streams: int,
                max_tokens: int) -> dict:
    """`streams` concurrent streams of one arm over the 8 prompts; aggregate tok/s."""
    one = STREAM[arm]
    t0 = time.perf_counter()
    futures = [pool.submit(one, t, PROMPTS[i % len(PROMPTS)], max_tokens)
               for i in range(streams)]
    samples = [f.result() for f in futures]  # re-raises a failed request
    wall = time.perf_counter() - t0
    tokens = sum(s.tokens for s in samples)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft_p50_ms": 1e3 * _p50([s.ttft_s for s in samples])}


def stream_round(pool, t: Target, r: int, streams: int, max_tokens: int) -> dict:
    out = {}
    for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
        out[arm] = stream_load(pool, t, arm, streams, max_tokens)
    out["ratio"] = out["http"]["tok_s"] / out["grpc"]["tok_s"]
    return out


def ttft_round(t: Target, r: int, requests: int, max_tokens: int) -> dict:
    """`requests` fresh prompts per arm, one at a time, the arms alternating."""
    out: dict = {arm: [] for arm in ARMS}
    no_text = 0
    for i in range(requests):
        for arm in ARMS if (r + i) % 2 == 0 else ARMS[::-1]:
            s = STREAM[arm](t, _fresh(PROMPTS[i % len(PROMPTS)]), max_tokens)
            out[arm].append(s.ttft_s * 1e3)
            no_text += s.no_text
    return {"ttft_ms": out, "no_text": no_text,
            "diff_p50_ms": _p50(out["http"]) - _p50(out["grpc"])}


def rag_round(t: Target, r: int, questions: list[str], max_tokens: int) -> dict:
    """Each question once per arm, one at a time, the arms alternating."""
    out: dict = {arm: [] for arm in ARMS}
    for i, q in enumerate(questions):
        for arm in ARMS if (r + i) % 2 == 0 else ARMS[::-1]:
            out[arm].append(RAG[arm](t, f"{q} (ref {uuid.uuid4().hex[:8]})", max_tokens))
    return {**out, "ratio": _p50([x["ms"] for x in out["http"]])
            / _p50([x["ms"] for x in out["grpc"]])}


# -- setup -------------------------------------------------------------------------------


def _corpus(n_docs: int) -> tuple[list[dict], list[str]]:
    """The first `n_docs` documents of the support corpus, and the questions they answer."""
    docs = [json.loads(x) for x in (DATA / "corpus.jsonl").read_text().splitlines() if x][:n_docs]
    ids = {d["id"] for d in docs}
    qs = [json.loads(x) for x in (DATA / "questions.jsonl").read_text().splitlines() if x]
    return docs, [q["question"] for q in qs if set(q["relevant"]) <= ids]


def _adapter_id(admin, wanted: str) -> str:
    """The registered adapter `wanted` names: an id, or a name (its newest version)."""
    if not wanted:
        return ""
    adapters = admin.list_adapters()
    for a in adapters:
        if a.id == wanted:
            return a.id
    named = [a for a in adapters if a.name == wanted]
    if not named:
        raise SystemExit(f"no adapter {wanted!r} is registered; registered: "
                         f"{', '.join(a.id for a in adapters) or '(none)'}")
    return max(named, key=lambda a: a.registered_at).id


def _tenant(admin, address: str, tenant: str, adapter: str, docs: list[dict]) -> str:
    """A tenant without quotas (the load must not be throttled), `adapter` granted,
    `docs` ingested; returns its key."""
    from hybridserve.client import HybridServeClient

    admin.create_tenant(tenant, allow_base=True, requests_per_minute=0, tokens_per_minute=0,
                        concurrent_streams=0)
    if adapter:
        admin.grant_adapter(tenant, adapter)
    key = admin.create_key(tenant, name="bench-openai").secret
    with HybridServeClient(address, api_key=key) as c:
        assert not c.upsert("", docs).failures
    return key


def _chat_model(http, adapter: str) -> str:
    """The HTTP `model` of `adapter` ("": the base model's name), as GET /v1/models
    lists it for the tenant (which also checks the grant reached the HTTP app)."""
    models = http.models.list().data
    if adapter:
        wanted = [m.id for m in models if m.id == adapter]
    else:  # the base model is the entry without a parent
        wanted = [m.id for m in models if (m.model_extra or {}).get("parent") is None]
    if not wanted:
        raise RuntimeError(f"GET /v1/models does not list {adapter or 'the base model'}: "
                           f"{[m.id for m in models]}")
    return wanted[0]


def _check_finite(obj, where: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), f"{where} is {obj}"


# -- the run -------------------------------------------------------------------------------


def run(args, admin_key: str) -> dict:
    import openai
    from hybridserve.client import HybridServeClient

    parts = [p for p in PARTS if p in set(args.parts.split(","))]
    docs, questions = _corpus(args.docs)
    questions = questions[: args.questions]
    tenant = f"bench-oai-{uuid.uuid4().hex[:6]}"
    with HybridServeClient(args.address, api_key=admin_key) as admin:
        adapter = _adapter_id(admin, args.adapter)
        http = g = None
        try:
            t0 = time.perf_counter()
            key = _tenant(admin, args.address, tenant, adapter, docs)
            ingest_s = time.perf_counter() - t0
            http = openai.OpenAI(base_url=args.openai_url, api_key=key, max_retries=0,
                                 timeout=args.request_timeout_s)
            g = HybridServeClient(args.address, api_key=key, application=args.app)
            chat_model = _chat_model(http, adapter)
            t = Target(http, g, chat_model, adapter or "default", adapter, args.rag_app,
                       args.request_timeout_s)
            out = measure(args, t, parts, questions)
        finally:
            for c in (http, g):
                if c is not None:
                    c.close()
            try:
                admin.delete_tenant(tenant)
            except Exception as e:  # noqa: BLE001 - a leftover tenant is not the result
                print(f"[bench] could not delete tenant {tenant}: {e}", file=sys.stderr)
    return {"smoke": args.smoke, "openai_url": args.openai_url, "app": args.app,
            "rag_app": args.rag_app, "model": chat_model, "adapter": adapter,
            "docs": len(docs), "ingest_s": round(ingest_s, 2), **out}


def measure(args, t: Target, parts: list[str], questions: list[str]) -> dict:
    rounds: dict[str, list] = {p: [] for p in parts}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.streams) as pool:
        # Warm up both arms (the first requests pay one-time costs: connections, the
        # adapter's load, the HTTP app's first JSON and SSE paths).
        for arm in ARMS:
            stream_load(pool, t, arm, args.streams, 8)
            if "rag" in parts and questions:
                RAG[arm](t, questions[0], 8)
        print("[bench] warmed up; measuring", flush=True)
        for r in range(args.rounds):
            if r and time.monotonic() - started > args.budget_s:
                print(f"[bench] --budget-s {args.budget_s} spent: stopping after {r} rounds",
                      flush=True)
                break
            line = [f"[bench] round {r}:"]
            if "stream" in parts:
                s = stream_round(pool, t, r, args.streams, args.max_tokens)
                rounds["stream"].append(s)
                line.append(f"stream HTTP/gRPC {s['ratio']:.3f} ({s['http']['tok_s']:.0f} vs "
                            f"{s['grpc']['tok_s']:.0f} tok/s);")
            if "ttft" in parts:
                s = ttft_round(t, r, args.ttft_requests, args.ttft_max_tokens)
                rounds["ttft"].append(s)
                line.append(f"TTFT p50 HTTP-gRPC {s['diff_p50_ms']:+.1f} ms;")
            if "rag" in parts:
                s = rag_round(t, r, questions, args.rag_max_tokens)
                rounds["rag"].append(s)
                line.append(f"RAG p50 HTTP/gRPC {s['ratio']:.3f}")
            print(" ".join(line), flush=True)
    out: dict = {"rounds_run": max((len(v) for v in rounds.values()), default=0),
                 "seconds": round(time.monotonic() - started, 1)}
    if rounds.get("stream"):
        out["stream"] = summarize_stream(rounds["stream"], args)
    if rounds.get("ttft"):
        out["ttft"] = summarize_ttft(rounds["ttft"], args)
    if rounds.get("rag"):
        out["rag"] = summarize_rag(rounds["rag"], args)
    return out


def summarize_stream(rounds: list[dict], args) -> dict:
    out: dict = {"streams": args.streams, "max_tokens": args.max_tokens}
    for arm in ARMS:
        rs = [r[arm] for r in rounds]
        out[arm] = {"tok_s_median": _p50([x["tok_s"] for x in rs]),
                    "tok_s_pooled": sum(x["tokens"] for x in rs) / sum(x["wall_s"] for x in rs),
                    "tok_s_rounds": [round(x["tok_s"], 1) for x in rs],
                    "tokens_per_round": [x["tokens"] for x in rs],
                    "ttft_p50_ms_at_load": _p50([x["ttft_p50_ms"] for x in rs])}
    ratios = [r["ratio"] for r in rounds]
    out["ratio_median"] = _p50(ratios)
    out["ratios"] = [round(x, 3) for x in ratios]
    # Greedy: equal counts say both arms generated the same thing.
    out["same_tokens"] = out["http"]["tokens_per_round"] == out["grpc"]["tokens_per_round"]
    return out


def summarize_ttft(rounds: list[dict], args) -> dict:
    out: dict = {"requests_per_arm": sum(len(r["ttft_ms"]["http"]) for r in rounds),
                 "max_tokens": args.ttft_max_tokens,
                 "no_text": sum(r["no_text"] for r in rounds)}
    for arm in ARMS:
        ms = [x for r in rounds for x in r["ttft_ms"][arm]]
        out[arm] = {"p50_ms": _p50(ms), "min_ms": min(ms), "max_ms": max(ms)}
    out["diff_p50_ms"] = out["http"]["p50_ms"] - out["grpc"]["p50_ms"]
    out["diff_p50_ms_rounds"] = [round(r["diff_p50_ms"], 1) for r in rounds]
    return out


def summarize_rag(rounds: list[dict], args) -> dict:
    out: dict = {"questions_per_arm": sum(len(r["http"]) for r in rounds),
                 "max_tokens": args.rag_max_tokens, "top_k": TOP_K}
    for arm in ARMS:
        xs = [x for r in rounds for x in r[arm]]
        out[arm] = {"p50_ms": _p50([x["ms"] for x in xs]),
                    "server_total_p50_ms": _p50([x["server_total_ms"] for x in xs]),
                    "tokens": sum(x["tokens"] for x in xs),
                    "sources_p50": _p50([x["sources"] for x in xs]),
                    "finish_reasons": sorted({x["finish"] for x in xs})}
    ratios = [r["ratio"] for r in rounds]
    out["ratio_median"] = _p50(ratios)
    out["ratios"] = [round(x, 3) for x in ratios]
    out["ratio_pooled"] = out["http"]["p50_ms"] / out["grpc"]["p50_ms"]
    return out


def table(out: dict) -> str:
    rows = [("what", "HTTP", "gRPC", "HTTP vs gRPC", "target")]
    if "stream" in out:
        s = out["stream"]
        rows.append((f"streamed tok/s, {s['streams']} concurrent (median of rounds)",
                     f"{s['http']['tok_s_median']:.1f}", f"{s['grpc']['tok_s_median']:.1f}",
                     f"{s['ratio_median']:.3f}x ({' / '.join(f'{x:.2f}' for x in s['ratios'])})",
                     ">= 0.9x"))
    if "ttft" in out:
        s = out["ttft"]
        rows.append((f"TTFT p50, one at a time ({s['requests_per_arm']} a side)",
                     f"{s['http']['p50_ms']:.1f} ms", f"{s['grpc']['p50_ms']:.1f} ms",
                     f"{s['diff_p50_ms']:+.1f} ms", "report"))
    if "rag" in out:
        s = out["rag"]
        rows.append((f"RAG end to end p50, one at a time ({s['questions_per_arm']} a side)",
                     f"{s['http']['p50_ms']:.1f} ms", f"{s['grpc']['p50_ms']:.1f} ms",
                     f"{s['ratio_median']:.3f}x ({' / '.join(f'{x:.2f}' for x in s['ratios'])})",
                     "<= 1.1x"))
        rows.append(("  of which the server's own total (p50)",
                     f"{s['http']['server_total_p50_ms']:.1f} ms",
                     f"{s['grpc']['server_total_p50_ms']:.1f} ms", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    from hybridserve import constants

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the platform's gRPC address")
    p.add_argument("--api-key-file", required=True,
                   help="an admin key (creates the tenant, its key and its documents)")
    p.add_argument("--openai-url", default=f"http://127.0.0.1:{constants.DEFAULT_HTTP_PORT}/v1",
                   help="the OpenAI-compatible API's base URL (serve.http_port, then /v1)")
    p.add_argument("--app", default="generation",
                   help="the gRPC generation app (the one the `openai` app generates with)")
    p.add_argument("--rag-app", default="rag", help="the gRPC rag app paired with it")
    p.add_argument("--adapter", default="",
                   help="an adapter id or name to answer with on both arms (default: the base)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--streams", type=int, default=16, help="stream: concurrent requests")
    p.add_argument("--max-tokens", type=int, default=128, help="stream: tokens per request")
    p.add_argument("--ttft-requests", type=int, default=8, help="ttft: per arm and round")
    p.add_argument("--ttft-max-tokens", type=int, default=4)
    p.add_argument("--questions", type=int, default=6, help="rag: per arm and round")
    p.add_argument("--rag-max-tokens", type=int, default=32)
    p.add_argument("--docs", type=int, default=8, help="rag: documents ingested")
    p.add_argument("--parts", default="stream,ttft,rag")
    p.add_argument("--request-timeout-s", type=float, default=300)
    p.add_argument("--budget-s", type=float, default=1800,
                   help="no round starts after this many seconds of measuring")
    p.add_argument("--tag", default="", help="suffix for the results file")
    p.add_argument("--smoke", action="store_true",
                   help="one tiny round at concurrency 2 (checks that the benchmark runs)")
    args = p.parse_args(argv)
    for name in ("rounds", "streams", "max_tokens", "ttft_requests", "ttft_max_tokens",
                 "questions", "rag_max_tokens", "docs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    if args.smoke:
        args.rounds, args.streams, args.max_tokens = 1, 2, 8
        args.ttft_requests, args.questions, args.rag_max_tokens, args.docs = 2, 2, 8, 3
        args.request_timeout_s, args.budget_s = 60, 60
    from hybridserve.client import resolve_api_key

    out = run(args, resolve_api_key(None, args.api_key_file))
    if args.smoke:
        # Every request raised if it failed; the figures must be numbers.
        _check_finite(out)
        assert out["rounds_run"] == 1
    RESULTS.mkdir(exist_ok=True)
    name = "smoke" if args.smoke else args.tag
    path = RESULTS / (f"openai_api-{name}.json" if name else "openai_api.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    summary = {k: v for k, v in out.items() if not isinstance(v, dict)}
    for part, keys in (("stream", ("ratio_median", "ratios", "same_tokens")),
                       ("ttft", ("diff_p50_ms", "no_text")),
                       ("rag", ("ratio_median", "ratios", "ratio_pooled"))):
        if part in out:
            summary[part] = {k: out[part][k] for k in keys}
            for arm in ARMS:
                summary[part][arm] = out[part][arm]
    print(json.dumps(summary, indent=2))
    print(table(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
