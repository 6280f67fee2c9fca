"""Knowledge plus skill, measured: retrieval-aware fine-tuning (`finetune --rag`) and the four
arms of `hybridserve eval`, on a running platform that serves SmolLM2 with LoRA.

  1. the Northwind Transit tenant (examples/tenants/northwind, examples/eval/northwind.jsonl):
     its documents ingested, then `finetune_rag` on its questions, split by document; the
     time to build the data and to train, and the acceptance check on held-out questions
  2. the four arms (base, adapter, rag, rag+adapter) on the held-out questions, side by side
     in one run, with the paired sign tests, and the evaluation's throughput
  3. transfer: the same adapter on another tenant's documents and questions of another
     domain (tests/data/knowledge: a support knowledge base), rag vs rag+adapter

Usage (with `hybridserve up` running, its admin key in the data dir):
  .venv/bin/python benchmarks/eval.py --address 127.0.0.1:50051 --data-dir ~/.local/share/hybridserve
  .venv/bin/python benchmarks/eval.py --smoke --address ... --api-key-file ... --data-dir ... \\
      --rag-app rag-smol --generation-app smol      (a tiny run; the test suite runs this)

Writes benchmarks/results/eval.json (eval-smoke.json with --smoke). Every part is bounded
in count (questions, steps); nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NORTHWIND = ROOT / "examples" / "tenants" / "northwind"
NORTHWIND_Q = ROOT / "examples" / "eval" / "northwind.jsonl"
TRANSFER = ROOT / "tests" / "data" / "knowledge"
SYSTEM = "You answer questions for Northwind Transit's passengers."
ARMS = ("base", "adapter", "rag", "rag+adapter")


def _tenant(address: str, admin, tenant: str, docs: list[dict], system_prompt: str = "") -> str:
    from hybridserve.client import HybridServeClient

    admin.create_tenant(tenant, allow_base=True, system_prompt=system_prompt)
    key = admin.create_key(tenant, name="bench-eval").secret
    with HybridServeClient(address, api_key=key) as c:
        for start in range(0, len(docs), 16):
            assert not c.upsert("", docs[start:start + 16]).failures
    return key


def _northwind_docs() -> list[dict]:
    from hybridserve.retrieval.sources import find_files, read_documents

    return [{"id": d.id, "title": d.title, "text": d.text, "source": d.source}
            for f in find_files(NORTHWIND) for d in read_documents(f)]


def _transfer(tmp: Path) -> tuple[list[dict], Path]:
    docs = [json.loads(x) for x in (TRANSFER / "corpus.jsonl").read_text().splitlines() if x]
    qs = [json.loads(x) for x in (TRANSFER / "questions.jsonl").read_text().splitlines() if x]
    path = tmp / "transfer.jsonl"
    path.write_text("".join(json.dumps({"id": f"kb-{i:02d}", "question": q["question"],
                                        "answers": q["answers"], "gold_docs": q["relevant"]}) + "\n"
                            for i, q in enumerate(qs)))
    return docs, path


def _evaluate(address: str, key: str, questions_path: Path, arms, adapter: str, args) -> dict:
    from hybridserve.client import AsyncHybridServeClient
    from hybridserve.evaluation import (
        RunOptions,
        Sampling,
        evaluate,
        render_table,
        resolve_target,
        to_json,
    )
    from hybridserve.scoring import load_questions

    qset = load_questions(questions_path)
    questions = qset.questions[: args.eval_questions]

    async def run():
        kwargs = {"application": args.generation_app} if args.generation_app else {}
        async with AsyncHybridServeClient(address, api_key=key, **kwargs) as client:
            target = await resolve_target(client, arms, adapter=adapter)
            return await evaluate(client, qset, questions, arms, target,
                                  RunOptions(Sampling(max_tokens=args.max_tokens),
                                             concurrency=args.concurrency,
                                             rag_app=args.rag_app))

    t0 = time.perf_counter()
    result = asyncio.run(run())
    seconds = time.perf_counter() - t0
    print(render_table(result), flush=True)
    answers = len(questions) * len(arms)
    return {"seconds": round(seconds, 1), "answers": answers,
            "answers_per_s": round(answers / seconds, 3), **to_json(result)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the running platform's gRPC address")
    p.add_argument("--api-key-file", help="its admin key (default: <data-dir>/admin.key)")
    p.add_argument("--data-dir", required=True, type=Path,
                   help="the platform's data dir (its adapter store and registry)")
    p.add_argument("--max-model-len", type=int, default=2048, help="the served model.max_model_len")
    p.add_argument("--rag-app", default="", help="the rag app (default: the platform's own)")
    p.add_argument("--generation-app", default="", help="the generation app (default: its own)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, help="instead of --epochs")
    p.add_argument("--layers", default="22-29", help="decoder layers to adapt")
    p.add_argument("--held-out-fraction", type=float, default=0.2)
    p.add_argument("--eval-questions", type=int, default=10_000, help="per question file, at most")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="12 questions, 1 step, top layer only")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.layers, args.eval_questions, args.max_tokens = 1, "29", 2, 24

    from hybridserve.cli.finetune import AskPromptSource, _layers
    from hybridserve.client import HybridServeClient
    from hybridserve.config import HybridServeConfig
    from hybridserve.finetune import TrainConfig, finetune_rag

    key_file = Path(args.api_key_file or args.data_dir / "admin.key")
    cfg = HybridServeConfig(data_dir=args.data_dir, model={"max_model_len": args.max_model_len})
    run = uuid.uuid4().hex[:6]
    out: dict = {"smoke": args.smoke, "layers": args.layers, "epochs": args.epochs,
                 "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp_dir, \
            HybridServeClient(args.address, api_key_file=key_file) as admin:
        tmp = Path(tmp_dir)
        questions = NORTHWIND_Q
        if args.smoke:  # the questions of three documents, and two unanswerable ones
            lines = [x for x in NORTHWIND_Q.read_text().splitlines() if x.strip()]
            keep = ("a-fares.md", "a-refunds.md", "b-night-buses.md")
            picked = [x for x in lines if set(json.loads(x)["gold_docs"]) & set(keep)][::3]
            picked += [x for x in lines if not json.loads(x)["gold_docs"]][:2]
            questions = tmp / "questions.jsonl"
            questions.write_text("\n".join(picked) + "\n")
        t0 = time.perf_counter()
        key = _tenant(args.address, admin, f"bench-nw-{run}", _northwind_docs(), SYSTEM)
        out["ingest_s"] = round(time.perf_counter() - t0, 1)
        train_cfg = TrainConfig(steps=args.steps, epochs=None if args.steps else args.epochs,
                                layers_to_transform=_layers(args.layers), seed=0,
                                held_out_fraction=args.held_out_fraction,
                                eval_max_examples=4 if args.smoke else 64)
        timings: dict[str, float] = {}
        marks = [time.perf_counter()]

        def progress(message: str) -> None:
            print(message, file=sys.stderr, flush=True)
            if message.startswith(("Training", "Trained", "Registered")):
                timings[message.split()[0].lower()] = time.perf_counter() - marks[0]

        with HybridServeClient(args.address, api_key=key) as c:
            source = AskPromptSource(c, max_tokens=args.max_tokens, app=args.rag_app)
            t0 = time.perf_counter()
            ft = finetune_rag(cfg, questions, f"bench-cite-{run}", source, train_cfg,
                              system_prompt=SYSTEM, max_tokens=args.max_tokens, force=True,
                              held_out_path=tmp / "held.jsonl", progress=progress)
        res = ft.result
        out["finetune"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "build_data_s": round(timings.get("training", 0.0), 1),
            "train_s": round(res.train.seconds, 1),
            "accept_s": round(timings.get("registered", 0.0) - timings.get("trained", 0.0), 1),
            "examples": {"gold": ft.build.gold, "no_gold": ft.build.no_gold,
                         "unanswerable": ft.build.unanswerable, "skipped": len(ft.build.skipped)},
            "steps": res.train.steps, "tokens": res.train.tokens,
            "tokens_per_s": round(res.train.tokens_per_second, 1),
            "held_out_questions": len(ft.held_out), "held_out_docs": ft.held_out_docs,
            "acceptance": res.eval.to_dict(), "accepted": res.eval.beats_base,
            "adapter": res.record.id,
        }
        admin.grant_adapter(f"bench-nw-{run}", res.record.id)
        out["northwind"] = _evaluate(args.address, key, tmp / "held.jsonl", ARMS,
                                     res.record.id, args)
        docs, transfer_q = _transfer(tmp)
        transfer_key = _tenant(args.address, admin, f"bench-kb-{run}", docs)
        admin.grant_adapter(f"bench-kb-{run}", res.record.id)
        out["transfer"] = _evaluate(args.address, transfer_key, transfer_q, ("rag", "rag+adapter"),
                                    res.record.id, args)
        for t in (f"bench-nw-{run}", f"bench-kb-{run}"):
            admin.delete_tenant(t)
    RESULTS.mkdir(exist_ok=True)
    name = "eval-smoke.json" if args.smoke else "eval.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
