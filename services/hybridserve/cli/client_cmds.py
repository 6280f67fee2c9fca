"""The client commands: ask, generate, adapters, ingest, search, delete, rerank.

They talk to a running platform through the SDK (`hybridserve.client`) and import
nothing of the server, so they work with `pip install hybridserve` alone.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from hybridserve import constants
from hybridserve.answers import Final, Sources, Token
from hybridserve.client import HybridServeClient
from hybridserve.errors import HybridServeError
from hybridserve.rerank import fusion
from hybridserve.retrieval.sources import find_files, read_documents
from hybridserve.v1 import common_pb2, retrieval_pb2


@dataclass(frozen=True)
class PlatformSettings:
    """What the client commands take from the platform's config."""

    #: host:port of the platform's gRPC endpoint (serve.grpc_host, serve.grpc_port).
    address: str
    #: The local admin key file that the first `hybridserve up` wrote.
    admin_key_path: Path
    #: rerank.fusion_weight: how `search --rerank` orders the hits (as RagService.Ask does).
    fusion_weight: float


#: The settings of the built-in default config, for an install without the server
#: extra (tests/unit/test_packaging.py checks they match HybridServeConfig()).
DEFAULT_SETTINGS = PlatformSettings(
    address=f"127.0.0.1:{constants.DEFAULT_GRPC_PORT}",
    admin_key_path=constants.DATA_DIR.expanduser().resolve() / "admin.key",
    fusion_weight=5.0,
)


def platform_settings(ns) -> PlatformSettings:
    """The settings of the config that --config (or $HYBRIDSERVE_CONFIG) names, else
    the built-in defaults."""
    try:
        # server extra: the config model needs pydantic. Without it (the SDK and the
        # client CLI alone) the built-in defaults apply and no config file can be read.
        from hybridserve.config import HybridServeConfig
    except ImportError as e:  # missing, or a pydantic too old for the config model
        if (e.name or "").split(".")[0] == "hybridserve":
            raise
        path = getattr(ns, "config", None) or constants.CONFIG_FILE
        if path:
            raise HybridServeError(
                f"reading the config file {path} needs the server extra "
                "(pip install 'hybridserve[server]'); without it, pass --address and the key "
                "($HYBRIDSERVE_API_KEY or --api-key-file)") from None
        return DEFAULT_SETTINGS
    cfg = HybridServeConfig.load(getattr(ns, "config", None))
    return PlatformSettings(address=f"{cfg.serve.grpc_host}:{cfg.serve.grpc_port}",
                            admin_key_path=cfg.admin_key_path,
                            fusion_weight=cfg.rerank.fusion_weight)


def make_client(ns, **kwargs) -> HybridServeClient:
    """A client for the platform, with the key the `hybridserve` docstring describes."""
    settings = platform_settings(ns)
    return HybridServeClient(
        ns.address or settings.address, api_key_file=getattr(ns, "api_key_file", None),
        default_key_file=settings.admin_key_path, tls=getattr(ns, "tls", False), **kwargs,
    )


def client_args(sp) -> None:
    """The options of every command that talks to the platform."""
    sp.add_argument("--address", help="host:port of the platform (default: from config)")
    sp.add_argument("--api-key-file", help="file holding the API key (default: "
                    "$HYBRIDSERVE_API_KEY, else <data_dir>/admin.key)")
    sp.add_argument("--tls", action="store_true", help="connect with TLS (through an ingress)")


def err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def cmd_ask(ns) -> int:
    filters = [_parse_filter(f) for f in ns.filter or []]
    kwargs = dict(tenant=ns.tenant, adapter=ns.adapter or "", top_k=ns.top_k, alpha=ns.alpha,
                  filters=filters, rerank=False if ns.no_rerank else None,
                  min_score=ns.min_score, max_tokens=ns.max_tokens,
                  temperature=ns.temperature, json_schema=ns.json_schema or "",
                  timeout=ns.timeout)
    sources, final = [], None
    with make_client(ns) as client:
        for event in client.ask_stream(ns.question, **kwargs):
            if isinstance(event, Sources):
                sources = event.citations
            elif isinstance(event, Token):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Final):
                final = event
    print()
    if final is None:
        return err("the answer ended without its final message")
    cited = set(final.cited)
    if sources:
        print("\nSources:")
        for c in sources:
            mark = "*" if c.number in cited else " "
            print(f" {mark}[{c.number}] {c.title or c.doc_id} ({c.source or c.doc_id}"
                  f"#{c.chunk_index}) score={c.score:.3f}")
    if final.invalid_citations:
        print(f"warning: the answer cites [{'], ['.join(map(str, final.invalid_citations))}], "
              "which match no source", file=sys.stderr)
    adapter = "-" if final.finish_reason == "no_context" else (final.adapter or "(base)")
    print(f"[finish={final.finish_reason} adapter={adapter} "
          f"tokens={final.usage.prompt_tokens}+{final.usage.completion_tokens} "
          f"replica={final.replica_id or '-'} cited={sorted(cited) or '-'}]", file=sys.stderr)
    if ns.show_timings:
        t = final.timings
        print("timings (ms): " + "  ".join(
            f"{name}={getattr(t, name + '_ms'):.1f}" for name in
            ("auth", "quota", "embed", "retrieve", "rerank", "prompt", "queue", "first_token",
             "total")), file=sys.stderr)
    return 0


def cmd_generate(ns) -> int:
    kwargs = dict(
        adapter=ns.adapter or "",
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        seed=ns.seed,
        json_schema=ns.json_schema or "",
        timeout=ns.timeout,
    )
    if ns.chat or ns.system:
        msgs = ([("system", ns.system)] if ns.system else []) + [("user", ns.prompt)]
        kwargs["messages"] = msgs
        prompt = None
    else:
        prompt = ns.prompt
    with make_client(ns) as client:
        for msg in client.generate_stream(prompt, **kwargs):
            if msg.HasField("delta"):
                sys.stdout.write(msg.delta.text)
                sys.stdout.flush()
            else:
                f = msg.final
                print(file=sys.stdout)
                print(
                    f"[finish={f.finish_reason and _finish_name(f.finish_reason)} "
                    f"prompt_tokens={f.usage.prompt_tokens} completion_tokens={f.usage.completion_tokens} "
                    f"adapter={f.adapter or '(base)'} replica={f.replica_id}]",
                    file=sys.stderr,
                )
    return 0


def _finish_name(value: int) -> str:
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def cmd_adapters(ns) -> int:
    with make_client(ns) as client:
        if ns.adapters_cmd == "list":
            adapters = client.list_adapters()
            if not adapters:
                print("no adapters registered; add one with `hybridserve adapters register NAME PATH`")
            for a in adapters:
                print(f"{a.id}\trank={a.rank}\tmodules={','.join(a.target_modules)}\tsize={a.size_bytes}")
        elif ns.adapters_cmd == "register":
            meta = dict(kv.split("=", 1) for kv in ns.meta or [])
            reply = client.register_adapter(ns.name, ns.path, version=ns.version or "", metadata=meta)
            print(json.dumps(MessageToDict(reply.adapter), indent=2))
            print("registered" if reply.created else "already registered (same content)", file=sys.stderr)
        elif ns.adapters_cmd == "unregister":
            client.unregister_adapter(ns.id)
            print(f"unregistered {ns.id}")
    return 0



#: Bytes of document text per Upsert call: below the proxy's default message limit
#: (serve.max_message_bytes, 4 MiB), with room for ids, titles and metadata.
INGEST_BATCH_BYTES = 3 * 1024 * 1024


def _batches(docs, max_docs: int, max_bytes: int):
    batch, size = [], 0
    for d in docs:
        n = len(d.text.encode()) + 1024
        if batch and (len(batch) >= max_docs or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(d)
        size += n
    if batch:
        yield batch


def cmd_ingest(ns) -> int:
    files = find_files(Path(ns.path))
    if not files:
        return err(f"no .txt, .md, .html or .jsonl files under {ns.path}")
    # Read and check everything first: a malformed file stops the run before
    # anything is written.
    docs, empty, errors = [], [], []
    for f in files:
        try:
            for d in read_documents(f):
                (docs if d.text.strip() else empty).append(d)
        except HybridServeError as e:
            errors.append(e.message)
    for msg in errors:
        print(f"error: {msg}", file=sys.stderr)
    if errors:
        return err(f"{len(errors)} file(s) could not be read; nothing was ingested")
    for d in empty:
        print(f"skipped {d.source}: no text", file=sys.stderr)
    written = removed = unchanged = 0
    failures = []
    with make_client(ns) as client, tqdm(
        total=len(docs), unit="doc", desc=f"ingest -> {ns.tenant or 'my tenant'}", file=sys.stderr,
        disable=ns.quiet,
    ) as bar:
        for batch in _batches(docs, ns.batch_docs, INGEST_BATCH_BYTES):
            reply = client.upsert(
                ns.tenant,
                [
                    retrieval_pb2.Document(id=d.id, text=d.text, title=d.title, source=d.source,
                                           metadata=dict(d.metadata))
                    for d in batch
                ],
                timeout=ns.timeout,
            )
            written += reply.chunks_written
            removed += reply.chunks_removed
            unchanged += reply.documents_unchanged
            failures.extend(reply.failures)
            bar.update(len(batch))
            bar.set_postfix(chunks=written, unchanged=unchanged, failed=len(failures))
    for f in failures:
        print(f"failed: {f.doc_id} chunk {f.chunk_index}: {f.message}", file=sys.stderr)
    print(
        f"{len(docs)} documents: {written} chunks written, {removed} stale chunks removed, "
        f"{unchanged} documents unchanged, {len(failures)} chunks failed"
    )
    return 1 if failures else 0


def _parse_filter(text: str):
    # field=value, field!=value, field=a|b|c (any of)
    if "!=" in text:
        field, value = text.split("!=", 1)
        return field, "not_equal", [value]
    if "=" not in text:
        raise HybridServeError(f"bad --filter {text!r}: use field=value, field!=value or field=a|b")
    field, value = text.split("=", 1)
    values = value.split("|")
    return field, ("any_of" if len(values) > 1 else "equal"), values


def cmd_search(ns) -> int:
    filters = [_parse_filter(f) for f in ns.filter or []]
    with make_client(ns) as client:
        hits = client.search(ns.tenant, ns.query, top_k=ns.top_k, alpha=ns.alpha, filters=filters)
        rerank_scores: list[float | None] = [None] * len(hits)
        if ns.rerank and hits:
            # The same order RagService.Ask uses: retrieval fused with rerank.
            reply = client.rerank(ns.query, [h.text for h in hits])
            scores = [0.0] * len(hits)
            for r in reply.results:
                scores[r.index] = r.score
            order = fusion.order([h.score for h in hits], scores, platform_settings(ns).fusion_weight)
            hits = [hits[i] for i in order]
            rerank_scores = [scores[i] for i in order]
        if ns.json:
            out = [MessageToDict(h) | ({"rerankScore": r} if r is not None else {})
                   for h, r in zip(hits, rerank_scores, strict=True)]
            print(json.dumps(out, indent=2))
            return 0
        if not hits:
            print("no hits")
        for rank, (h, rr) in enumerate(zip(hits, rerank_scores, strict=True), 1):
            score = f"score={h.score:.3f}" + (f" rerank={rr:.3f}" if rr is not None else "")
            snippet = " ".join(h.text.split())[:160]
            print(f"{rank}. [{h.doc_id}#{h.chunk_index}] {h.title} ({score})\n   {snippet}\n   source: {h.source}")
    return 0


def cmd_delete(ns) -> int:
    with make_client(ns) as client:
        n = client.delete_documents(ns.tenant, ns.doc_ids)
    print(f"deleted {n} chunks")
    return 0


def cmd_rerank(ns) -> int:
    with make_client(ns) as client:
        reply = client.rerank(ns.query, ns.passages, top_n=ns.top_n)
    for r in reply.results:
        print(f"{r.score:+.4f}\t{ns.passages[r.index]}")
    print(f"[{reply.model}]", file=sys.stderr)
    return 0




# Parsers, one per command; cli/main.py adds them in the order `hybridserve --help` lists.

def add_ask_parser(sub) -> None:
    q = sub.add_parser("ask", help="answer a question from the tenant's documents through its "
                       "adapter, with cited sources")
    client_args(q)
    q.add_argument("question")
    q.add_argument("--tenant", default="", help="default: the API key's tenant")
    q.add_argument("--adapter", help="one of the tenant's adapters (default: its default adapter)")
    q.add_argument("--top-k", type=int, help="candidates to retrieve (default: rag.top_k)")
    q.add_argument("--alpha", type=float, help="0 keyword only ... 1 vector only")
    q.add_argument("--filter", action="append", metavar="FIELD=VALUE",
                   help="doc_id, source, title or metadata.KEY; = or !=; a|b for any of")
    q.add_argument("--no-rerank", action="store_true", help="keep the retrieval order")
    q.add_argument("--min-score", type=float, help="least relevance a passage needs")
    q.add_argument("--max-tokens", type=int)
    q.add_argument("--temperature", type=float)
    q.add_argument("--json-schema", help="constrain the answer to this JSON schema")
    q.add_argument("--show-timings", action="store_true", help="print each stage's time")
    q.add_argument("--timeout", type=float, default=300, help="deadline in seconds (default 300)")
    q.set_defaults(func=cmd_ask)


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="stream a generation")
    client_args(g)
    g.add_argument("prompt")
    g.add_argument("--adapter", help="adapter id (name@version); default: the base model")
    g.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    g.add_argument("--system", help="system message (implies --chat)")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--json-schema", help="constrain the output to this JSON schema (a JSON string)")
    g.add_argument("--timeout", type=float, default=300, help="deadline in seconds (default 300)")
    g.set_defaults(func=cmd_generate)


def add_adapters_parser(sub) -> None:
    a = sub.add_parser("adapters", help="manage LoRA adapters")
    asub = a.add_subparsers(dest="adapters_cmd", required=True)
    al = asub.add_parser("list", help="list registered adapters")
    client_args(al)
    ar = asub.add_parser("register", help="register an adapter folder inside the adapter store")
    client_args(ar)
    ar.add_argument("name")
    ar.add_argument("path", help="folder relative to the adapter store (<data_dir>/adapters)")
    ar.add_argument("--version", help="default: the first 12 hex digits of the content hash")
    ar.add_argument("--meta", action="append", metavar="KEY=VALUE")
    au = asub.add_parser("unregister", help="remove an adapter from the registry")
    client_args(au)
    au.add_argument("id")
    a.set_defaults(func=cmd_adapters)


def add_ingest_parser(sub) -> None:
    i = sub.add_parser("ingest", help="ingest .txt/.md/.html/.jsonl files into a tenant (safe to re-run)")
    client_args(i)
    i.add_argument("path", help="a file or a folder (searched recursively)")
    i.add_argument("--tenant", default="", help="default: the API key's tenant (an admin key must name one)")
    i.add_argument("--batch-docs", type=int, default=32, help="documents per Upsert call (default 32)")
    i.add_argument("--timeout", type=float, default=600, help="deadline per Upsert call, seconds")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_ingest)


def add_search_parser(sub) -> None:
    s = sub.add_parser("search", help="hybrid search in a tenant's documents")
    client_args(s)
    s.add_argument("query")
    s.add_argument("--tenant", default="", help="default: the API key's tenant")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--alpha", type=float, help="0 keyword only ... 1 vector only (default: server's)")
    s.add_argument("--filter", action="append", metavar="FIELD=VALUE",
                   help="doc_id, source, title or metadata.KEY; = or !=; a|b for any of")
    s.add_argument("--rerank", action="store_true", help="reorder the hits with the reranker")
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    s.set_defaults(func=cmd_search)


def add_delete_parser(sub) -> None:
    d = sub.add_parser("delete", help="delete documents (every chunk) by id")
    client_args(d)
    d.add_argument("doc_ids", nargs="+")
    d.add_argument("--tenant", default="", help="default: the API key's tenant")
    d.set_defaults(func=cmd_delete)


def add_rerank_parser(sub) -> None:
    r = sub.add_parser("rerank", help="score passages against a query, best first")
    client_args(r)
    r.add_argument("query")
    r.add_argument("passages", nargs="+")
    r.add_argument("--top-n", type=int, default=0)
    r.set_defaults(func=cmd_rerank)
