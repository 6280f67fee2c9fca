"""Knowledge plus skill, measured, on the real platform (SmolLM2 on vLLM, weaviate-server,
the rerank and rag apps): retrieval-aware training prompts equal Ask's token for token,
`finetune --rag` trains and registers an adapter from the tenant's own retrieval, and
`hybridserve eval` scores the four arms, its `rag` arm agreeing with direct Ask calls.
Bad input (a malformed file, an adapter not granted, base arms without allow_base) is
refused before any question is asked."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from hybridserve.cli.finetune import AskPromptSource
from hybridserve.client import AsyncHybridServeClient, HybridServeClient
from hybridserve.evaluation import RunOptions, Sampling, evaluate, resolve_target
from hybridserve.finetune import TrainConfig, finetune_rag, raft
from hybridserve.models import model_dir_for
from hybridserve.rag.prompt import PromptBuilder
from hybridserve.retrieval.sources import find_files, read_documents
from hybridserve.scoring import Outcome, load_questions, score

from .conftest import RAG_SMOL_APP, SMOL_APP

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "examples" / "tenants" / "northwind"
QUESTIONS = ROOT / "examples" / "eval" / "northwind.jsonl"
SYSTEM = "You answer for Northwind Transit."


@dataclass
class Northwind:
    tenant: str
    key: str
    #: a small question file: the questions of a few documents, and unanswerable ones
    questions: Path


@pytest.fixture(scope="module")
def northwind(platform, tmp_path_factory):
    tenant = f"nw-{uuid.uuid4().hex[:6]}"
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.create_tenant(tenant, allow_base=True, system_prompt=SYSTEM)
        key = admin.create_key(tenant, name="eval").secret
    docs = [d for f in find_files(DOCS) for d in read_documents(f)]
    with HybridServeClient(platform.address, api_key=key) as c:
        reply = c.upsert("", [{"id": d.id, "title": d.title, "text": d.text, "source": d.source}
                              for d in docs])
        assert not reply.failures
    wanted = ("a-fares.md", "a-refunds.md", "b-bikes-on-board.md", "b-night-buses.md")
    lines = [line for line in QUESTIONS.read_text().splitlines() if line.strip()]
    chosen = [line for line in lines if set(json.loads(line)["gold_docs"]) & set(wanted)][::2]
    chosen += [line for line in lines if not json.loads(line)["gold_docs"]][:4]
    path = tmp_path_factory.mktemp("eval") / "questions.jsonl"
    path.write_text("\n".join(chosen) + "\n")
    yield Northwind(tenant, key, path)
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.delete_tenant(tenant)


def test_a_training_prompt_equals_asks_prompt_token_for_token(platform, northwind):
    builder = PromptBuilder.for_model(model_dir_for(platform.smol), platform.smol)
    questions = load_questions(northwind.questions).questions[:6]
    with HybridServeClient(platform.address, api_key=northwind.key) as c:
        source = AskPromptSource(c, max_tokens=96, app=RAG_SMOL_APP)
        for q in questions:
            asked = source.prompt(q.question)
            assert asked.passages and asked.token_ids
            same = builder.build(question=q.question, system_prompt=SYSTEM, max_tokens=96,
                                 passages=[(p.title, p.text) for p in asked.passages])
            assert list(asked.token_ids) == same.token_ids, q.id
            # And what Ask then generates from is that prompt.
            answer = c.ask(q.question, app=RAG_SMOL_APP, base_model=True, include_prompt=True,
                           max_tokens=96, temperature=0)
            assert answer.final.prompt_token_ids == list(asked.token_ids)
        # The builder of the training data checks every prompt the same way (it raises
        # FailedPrecondition on a difference); its gold-absent prompts hold no gold passage.
        examples, report = raft.build_examples(
            questions, source, builder, system_prompt=SYSTEM, refusal="No.", max_tokens=96)
    assert examples and len(examples) + len(report.skipped) == len(questions)
    for e in examples:
        q = next(q for q in questions if q.id == e.question_id)
        if e.kind != "gold":
            assert not {p.doc_id for p in e.passages} & set(q.gold_docs)
        else:
            assert e.passages[e.gold_number - 1].doc_id in q.gold_docs


def _eval_cli(platform, key_file: Path, *args: str) -> subprocess.CompletedProcess:
    # The key through the environment, as a tenant's shell would have it (it takes
    # precedence over --api-key-file, and the session's environment holds the admin key).
    env = {**os.environ, "HYBRIDSERVE_API_KEY": key_file.read_text().strip()}
    return subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", "eval", "--address", platform.address,
         "--quiet", *args], capture_output=True, text=True, timeout=300, env=env)


def test_bad_input_is_refused_before_any_question(platform, northwind, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(northwind.key)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answers": ["a"], "gold_docs": ["d"]}\n{"question": ""}\n')
    proc = _eval_cli(platform, key_file, "--questions", str(bad))
    assert proc.returncode == 2 and f"{bad}:2:" in proc.stderr, proc.stderr
    proc = _eval_cli(platform, key_file, "--questions", str(northwind.questions),
                     "--adapter", platform.ids["alpha"])
    assert proc.returncode == 2 and "not granted" in proc.stderr, proc.stderr
    # A tenant without allow_base cannot run the base arms.
    other = f"nobase-{uuid.uuid4().hex[:6]}"
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.create_tenant(other)
        admin.grant_adapter(other, platform.ids["alpha"], make_default=True)
        key_file.write_text(admin.create_key(other, name="eval").secret)
    try:
        proc = _eval_cli(platform, key_file, "--questions", str(northwind.questions),
                         "--arms", "base,rag")
        assert proc.returncode == 2 and "allow_base" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
            admin.delete_tenant(other)


class _NoCalls:
    def prompt(self, *a, **kw):
        raise AssertionError("a reused recipe asks nothing")


def test_finetune_rag_then_eval_over_the_four_arms(platform, northwind, tmp_path):
    cfg = platform.smol.model_copy(deep=True)
    with HybridServeClient(platform.address, api_key=northwind.key) as c:
        source = AskPromptSource(c, max_tokens=64, app=RAG_SMOL_APP)
        # A short run (two steps on the top layer): the mechanics, not the quality (that is
        # benchmarks/eval.py's job).
        out = finetune_rag(
            cfg, northwind.questions, "nw-cite", source,
            TrainConfig(steps=2, batch_size=2, layers_to_transform=(29,), eval_max_examples=3,
                        held_out_fraction=0.3),
            system_prompt=SYSTEM, max_tokens=64, force=True,
            held_out_path=tmp_path / "held.jsonl", progress=lambda m: None)
    record = out.result.record
    assert out.record == record
    # The same recipe again, with reuse: the registered adapter, nothing asked or trained
    # (an adapter registered with force is reused only with force).
    again = finetune_rag(
        cfg, northwind.questions, "nw-cite", _NoCalls(),
        TrainConfig(steps=2, batch_size=2, layers_to_transform=(29,), eval_max_examples=3,
                    held_out_fraction=0.3),
        system_prompt=SYSTEM, max_tokens=64, reuse=True, force=True, progress=lambda m: None)
    assert again.record.id == record.id and again.result is None
    assert [q.id for q in again.held_out] == [q.id for q in out.held_out]
    assert out.held_out and out.held_out_docs and out.build.examples > 0
    held_docs = set(out.held_out_docs)
    assert all(set(q.gold_docs) <= held_docs for q in out.held_out if q.answerable)
    assert json.loads(record.metadata["eval"])["metric"] == "containment"
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.grant_adapter(northwind.tenant, record.id)

    questions = load_questions(tmp_path / "held.jsonl")
    qs = questions.questions[:3]

    async def run():
        async with AsyncHybridServeClient(platform.address, api_key=northwind.key,
                                          application=SMOL_APP) as client:
            target = await resolve_target(client, ("base", "adapter", "rag", "rag+adapter"),
                                          adapter=record.id)
            return await evaluate(client, questions, qs, ("base", "adapter", "rag", "rag+adapter"),
                                  target, RunOptions(Sampling(max_tokens=48), concurrency=1,
                                                     rag_app=RAG_SMOL_APP))

    # Every prompt once before, so that the evaluation's rag arm and the direct Asks
    # below both run on the tenant's warm prefix cache (vLLM's cached and recomputed
    # KV are not bit for bit the same on CPU, and greedy text could differ).
    with HybridServeClient(platform.address, api_key=northwind.key) as c:
        for q in qs:
            c.ask(q.question, app=RAG_SMOL_APP, base_model=True, max_tokens=1, temperature=0)
    result = asyncio.run(run())
    assert not result.failures, result.failures
    for arm in ("base", "adapter", "rag", "rag+adapter"):
        s = result.summaries[arm]
        assert s.questions == len(qs) and s.failed == 0
        assert s.containment is not None and s.token_f1 is not None
        assert s.latency_p50_s > 0 and s.completion_tokens_mean > 0
    for arm in ("rag", "rag+adapter"):
        s = result.summaries[arm]
        assert s.recall_at_k is not None and s.citation_rate is not None
    assert result.summaries["base"].recall_at_k is None
    assert {(c.a, c.b) for c in result.comparisons} >= {("rag", "rag+adapter")}
    for arm, outcomes in result.outcomes.items():
        assert [o.question_id for o in outcomes] == [q.id for q in qs], arm
        assert all(o.answer or o.finish_reason == "no_context" for o in outcomes), arm
    assert all(o.rag and o.sources for o in result.outcomes["rag+adapter"] if o.finish_reason != "no_context")

    # The rag arm's containment is what direct Ask calls give for the same questions.
    direct = 0
    with HybridServeClient(platform.address, api_key=northwind.key) as c:
        for q in qs:
            if not q.answerable:
                continue
            a = c.ask(q.question, app=RAG_SMOL_APP, base_model=True, max_tokens=48,
                      temperature=0)
            direct += score(q, Outcome(q.id, "rag", a.text, a.final.finish_reason, rag=True)).contained
    answerable = sum(q.answerable for q in qs)
    assert result.summaries["rag"].containment == pytest.approx(direct / answerable)
