"""`hybridserve eval`: the arms, the pre-checks, retries, concurrency and the outputs,
against a fake of the SDK's asyncio client.

The fake implements the client methods the runner calls (whoami, get_tenant,
generate, ask) and returns what the real ones do: protobuf messages for whoami,
get_tenant and generate, `answers.Answer` for ask; failures are the SDK's own typed
exceptions. Scoring is the real `hybridserve.scoring`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import grpc
import pytest

from hybridserve.answers import Answer, Citation, Final, StageTimings, Usage
from hybridserve.client import ask_request, generate_request
from hybridserve.cli import eval as eval_cli
from hybridserve.cli.main import build_parser, main
from hybridserve.evaluation import formats, report, runner
from hybridserve.evaluation.runner import RunOptions, Sampling, Target
from hybridserve.exceptions import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    RateLimitError,
    UnavailableError,
)
from hybridserve.scoring import cited_numbers, load_questions
from hybridserve.v1 import admin_pb2, common_pb2, generation_pb2

ADAPTER = "pirate@v1"
HOSTILE = "<script>alert(1)</script>"

QUESTIONS = [
    {"id": "refund", "question": "How long does a refund take?", "answers": ["14 days"],
     "gold_docs": ["doc-refunds"]},
    {"id": "daypass", "question": "What does a day pass cost?", "answers": ["5 euros"],
     "gold_docs": ["doc-fares"]},
    {"id": "ceo", "question": "Who is the CEO of the moon?", "answers": [], "gold_docs": []},
]

#: What each arm answers, by question id: the base model knows nothing, the adapter
#: knows one answer, retrieval finds both and cites them; everyone refuses "ceo".
REPLIES = {
    "base": {"refund": "I do not know.", "daypass": "I do not know.", "ceo": "I do not know."},
    "adapter": {"refund": "Arr, 14 days it be.", "daypass": "Arr, 3 doubloons.",
                "ceo": "I do not know, matey."},
    "rag": {"refund": "Refunds take 14 days [1].", "daypass": "A day pass costs 5 euros [2].",
            "ceo": "I could not find the answer in your documents."},
    "rag+adapter": {"refund": "Arr, 14 days [1].", "daypass": "Arr, 5 euros [2][7].",
                    "ceo": "I could not find the answer in your documents."},
}

SOURCES = [  # (number, doc_id, whole text, snippet)
    (1, "doc-refunds", "Refunds are paid within 14 days of the request.", "Refunds are paid"),
    (2, "doc-fares", "", "A day pass costs 5 euros."),  # no text: the snippet stands in
]


def make_tenant(**kw) -> admin_pb2.Tenant:
    fields = dict(id="northwind", allow_base=True, adapters=[ADAPTER, "json@v2"],
                  default_adapter="", system_prompt="You are Northwind's helpful assistant.")
    fields.update(kw)
    return admin_pb2.Tenant(**fields)


class FakeClient:
    """The methods of AsyncHybridServeClient that `hybridserve eval` calls."""

    def __init__(self, *, kind: str = "tenant", tenant: admin_pb2.Tenant | None = None,
                 replies: dict | None = None, errors: dict | None = None, yields: int = 3):
        self.kind = kind
        self.tenant = tenant or make_tenant()
        self.replies = replies or REPLIES
        #: (arm, question id) -> exceptions to raise, one per call, before answering.
        self.errors = {k: list(v) for k, v in (errors or {}).items()}
        self.calls: list[tuple[str, dict]] = []
        #: The real SDK's requests for the calls, built from the same arguments.
        self.requests: list = []
        self.yields = yields
        self.in_flight = 0
        self.max_in_flight = 0

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def whoami(self, timeout: float = 30):
        self.calls.append(("whoami", {}))
        if self.kind == "admin":
            return admin_pb2.WhoAmIResponse(kind="admin", key_id="k1", key_name="ops")
        return admin_pb2.WhoAmIResponse(kind="tenant", key_id="k2", tenant=self.tenant)

    async def get_tenant(self, tenant_id: str, timeout: float = 30):
        self.calls.append(("get_tenant", {"tenant_id": tenant_id}))
        if tenant_id != self.tenant.id:
            raise NotFoundError(grpc.StatusCode.NOT_FOUND, f"unknown tenant {tenant_id!r}",
                                reason="TENANT_NOT_FOUND")
        return self.tenant

    async def _busy(self, arm: str, qid: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(self.yields):
                await asyncio.sleep(0)  # let the other calls in: no real waiting
        finally:
            self.in_flight -= 1
        pending = self.errors.get((arm, qid))
        if pending:
            raise pending.pop(0)

    def _qid(self, question: str) -> str:
        return next(q["id"] for q in QUESTIONS if q["question"] == question)

    async def generate(self, prompt=None, *, messages=None, adapter: str = "", **kwargs):
        self.calls.append(("generate", {"prompt": prompt, "messages": messages,
                                        "adapter": adapter, **kwargs}))
        self.requests.append(generate_request(prompt, messages=messages, adapter=adapter,
                                              **_without_timeout(kwargs)))
        arm = "adapter" if adapter else "base"
        qid = self._qid(messages[-1][1])
        await self._busy(arm, qid)
        text = self.replies[arm][qid]
        final = generation_pb2.GenerationFinal(
            finish_reason=common_pb2.FINISH_REASON_STOP, adapter=adapter,
            usage=common_pb2.Usage(prompt_tokens=30, completion_tokens=len(text.split())))
        return text, [1, 2, 3], final

    async def ask(self, question: str = "", **kwargs) -> Answer:
        self.calls.append(("ask", {"question": question, **kwargs}))
        self.requests.append(ask_request(question, **_without_timeout(kwargs)))
        arm = "rag" if kwargs.get("base_model") else "rag+adapter"
        qid = self._qid(question)
        await self._busy(arm, qid)
        text = self.replies[arm][qid]
        full = kwargs.get("include_prompt", False)
        citations = [Citation(number=n, chunk_id=f"{d}#0", doc_id=d, chunk_index=0, title=d,
                              source=f"{d}.md", snippet=snip, score=0.9, retrieval_score=0.8,
                              text=body if full else "")
                     for n, d, body, snip in SOURCES]
        numbers = cited_numbers(text)
        final = Final(
            finish_reason="stop", usage=Usage(120, len(text.split())),
            adapter=kwargs.get("adapter", ""), replica_id="r1",
            cited=[n for n in numbers if n <= len(SOURCES)],
            invalid_citations=[n for n in numbers if n > len(SOURCES)],
            timings=StageTimings(*([1.0] * 9)), request_id="req", client_request_id="",
            tenant=self.tenant.id, passage_token_budget=512, passage_tokens=80,
            prompt_token_ids=[5, 6, 7] if full else [])
        return Answer(text, citations, final)

    def asked(self) -> list[tuple[str, dict]]:
        return [c for c in self.calls if c[0] in ("generate", "ask")]


def _without_timeout(kwargs: dict) -> dict:
    # The SDK's methods take `timeout` for the call, not for the request.
    return {k: v for k, v in kwargs.items() if k != "timeout"}


@pytest.fixture
def qfile(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def target(**kw) -> Target:
    fields = dict(tenant="northwind", request_tenant="", allow_base=True, adapter=ADAPTER,
                  adapter_source="--adapter",
                  system_prompt="You are Northwind's helpful assistant.")
    fields.update(kw)
    return Target(**fields)


class Sleeps:
    """An injected sleep: records the waits, never waits."""

    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def run_eval(client, qfile, *, arms=runner.ARMS, options=None, sleep=None,
                   format_check=None, tgt=None):
    qs = load_questions(qfile)
    return await runner.evaluate(client, qs, qs.questions, arms, tgt or target(),
                                 options or RunOptions(), format_check=format_check,
                                 sleep=sleep or Sleeps(), settings={"max_tokens": 96})


def run_cli(monkeypatch, client, *args) -> int:
    monkeypatch.setattr(eval_cli, "make_async_client", lambda ns: client)
    return main(["eval", "--quiet", *map(str, args)])


# -- the arms ----------------------------------------------------------------------------

async def test_arms_map_to_the_right_calls_with_the_same_sampling(qfile):
    client = FakeClient()
    sampling = Sampling(max_tokens=64, temperature=0.0, top_p=0.9, seed=7)
    await run_eval(client, qfile, options=RunOptions(sampling=sampling, timeout_s=12.0))
    calls = client.asked()
    assert len(calls) == len(QUESTIONS) * 4
    for _, kw in calls:  # the same sampling options on every arm
        assert {k: kw[k] for k in ("max_tokens", "temperature", "top_p", "seed")} == \
            {"max_tokens": 64, "temperature": 0.0, "top_p": 0.9, "seed": 7}
        assert kw["timeout"] == 12.0 and kw["json_schema"] == ""
    gens = [kw for m, kw in calls if m == "generate"]
    assert sorted(kw["adapter"] for kw in gens) == [""] * 3 + [ADAPTER] * 3
    for kw in gens:  # chat path: the tenant's system prompt, then the question
        assert kw["prompt"] is None
        assert kw["messages"][0] == ("system", "You are Northwind's helpful assistant.")
        assert kw["messages"][1][0] == "user" and len(kw["messages"]) == 2
    asks = [kw for m, kw in calls if m == "ask"]
    rag = [kw for kw in asks if kw["base_model"]]
    rag_adapter = [kw for kw in asks if not kw["base_model"]]
    assert len(rag) == len(rag_adapter) == 3
    assert all(kw["adapter"] == "" and kw["include_prompt"] for kw in rag)
    assert all(kw["adapter"] == ADAPTER and kw["include_prompt"] for kw in rag_adapter)
    assert all(kw["tenant"] == "" for kw in asks)  # a tenant key asks in its own tenant
    # The real SDK builds these calls into the requests the server reads.
    reqs = client.requests
    assert {r.sampling.max_tokens for r in reqs} == {64} and {r.sampling.seed for r in reqs} == {7}
    assert {round(r.sampling.top_p, 3) for r in reqs} == {0.9}
    assert all(r.sampling.HasField("temperature") and r.sampling.temperature == 0 for r in reqs)
    ask_reqs = [r for r in reqs if r.DESCRIPTOR.name == "AskRequest"]
    assert sorted((r.base_model, r.adapter, r.include_prompt) for r in ask_reqs) == \
        [(False, ADAPTER, True)] * 3 + [(True, "", True)] * 3
    gen_reqs = [r for r in reqs if r.DESCRIPTOR.name == "GenerateRequest"]
    assert all(r.WhichOneof("input") == "messages" for r in gen_reqs)


async def test_no_system_turn_without_a_system_prompt_and_admin_names_the_tenant(qfile):
    client = FakeClient(kind="admin")
    await run_eval(client, qfile, arms=("base", "rag"),
                   tgt=target(system_prompt="", request_tenant="northwind"))
    gens = [kw for m, kw in client.asked() if m == "generate"]
    assert all(kw["messages"] == [("user", kw["messages"][0][1])] for kw in gens)
    assert all(kw["tenant"] == "northwind" for m, kw in client.asked() if m == "ask")


async def test_outcomes_carry_sources_citations_tokens_and_latency(qfile):
    ticks = iter(range(1000))
    qs = load_questions(qfile)
    client = FakeClient()
    result = await runner.evaluate(client, qs, qs.questions, ("rag+adapter",), target(),
                                   RunOptions(concurrency=1), sleep=Sleeps(),
                                   clock=lambda: float(next(ticks)))
    daypass = result.outcomes["rag+adapter"][1]
    assert daypass.sources[0].text == "Refunds are paid within 14 days of the request."
    assert daypass.sources[1].text == "A day pass costs 5 euros."  # the snippet stands in
    assert daypass.cited == (2,) and daypass.invalid_citations == (7,)
    assert daypass.rag and daypass.prompt_tokens == 120 and daypass.completion_tokens == 4
    assert daypass.latency_s == 1.0  # one tick of the injected clock: the call's wall time
    summary = result.summaries["rag+adapter"]
    assert summary.recall_at_k == 1.0 and summary.invalid_citations == 1
    assert summary.containment == 1.0 and summary.refusal_correct == 1.0


async def test_scores_and_paired_comparisons(qfile):
    result = await run_eval(FakeClient(), qfile)
    s = result.summaries
    assert s["base"].containment == 0.0 and s["base"].recall_at_k is None
    assert s["adapter"].containment == 0.5
    assert s["rag"].containment == 1.0
    pairs = {(p.b, p.a): p for p in result.comparisons}
    assert list(pairs) == [("rag+adapter", "rag"), ("rag", "base"), ("adapter", "base"),
                           ("rag+adapter", "adapter")]
    assert (pairs["rag", "base"].wins, pairs["rag", "base"].losses,
            pairs["rag", "base"].ties) == (2, 0, 1)


async def test_only_comparisons_whose_arms_ran(qfile):
    result = await run_eval(FakeClient(), qfile, arms=("adapter", "rag+adapter"))
    assert [(p.b, p.a) for p in result.comparisons] == [("rag+adapter", "adapter")]


def test_parse_arms_orders_and_rejects():
    assert runner.parse_arms("rag+adapter, base") == ("base", "rag+adapter")
    with pytest.raises(runner.EvalInputError, match="unknown arm.*lora"):
        runner.parse_arms("base,lora")


# -- pre-checks ----------------------------------------------------------------------------

def assert_nothing_asked(client: FakeClient) -> None:
    assert client.asked() == [], client.calls


def test_not_granted_adapter_stops_before_any_question(monkeypatch, qfile, capsys):
    client = FakeClient()
    code = run_cli(monkeypatch, client, "--questions", qfile, "--adapter", "evil@v9")
    assert code == 2
    err = capsys.readouterr().err
    assert f"adapter evil@v9 is not granted to tenant northwind; its adapters: {ADAPTER}, json@v2" \
        in err
    assert_nothing_asked(client)


def test_no_allow_base_suggests_the_adapter_arms(monkeypatch, qfile, capsys):
    client = FakeClient(tenant=make_tenant(allow_base=False))
    code = run_cli(monkeypatch, client, "--questions", qfile, "--adapter", ADAPTER)
    assert code == 2
    err = capsys.readouterr().err
    assert "may not use the base model" in err and "--arms adapter,rag+adapter" in err
    assert_nothing_asked(client)


def test_admin_key_without_tenant_is_an_error(monkeypatch, qfile, capsys):
    client = FakeClient(kind="admin")
    assert run_cli(monkeypatch, client, "--questions", qfile, "--adapter", ADAPTER) == 2
    assert "pass --tenant" in capsys.readouterr().err
    assert_nothing_asked(client)


def test_admin_key_with_unknown_tenant_is_an_error(monkeypatch, qfile, capsys):
    client = FakeClient(kind="admin")
    assert run_cli(monkeypatch, client, "--questions", qfile, "--tenant", "acme") == 2
    assert "unknown tenant 'acme'" in capsys.readouterr().err
    assert_nothing_asked(client)


def test_tenant_key_naming_another_tenant_is_an_error(monkeypatch, qfile, capsys):
    client = FakeClient()
    assert run_cli(monkeypatch, client, "--questions", qfile, "--tenant", "acme") == 2
    assert "belongs to tenant 'northwind'" in capsys.readouterr().err
    assert_nothing_asked(client)


def test_adapter_arms_without_any_adapter(monkeypatch, qfile, capsys):
    client = FakeClient()
    assert run_cli(monkeypatch, client, "--questions", qfile) == 2
    err = capsys.readouterr().err
    assert "need an adapter" in err and "--adapter" in err
    assert_nothing_asked(client)


def test_default_adapter_is_used_and_said(monkeypatch, qfile, capsys):
    client = FakeClient(tenant=make_tenant(default_adapter=ADAPTER))
    assert run_cli(monkeypatch, client, "--questions", qfile) == 0
    assert f"default adapter {ADAPTER}" in capsys.readouterr().err
    assert {kw["adapter"] for m, kw in client.asked() if m == "generate"} == {"", ADAPTER}


def test_bad_question_file_lists_every_problem_before_any_call(monkeypatch, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": ["x"], "gold_docs": []}\nnot json\n')
    client = FakeClient()
    assert run_cli(monkeypatch, client, "--questions", path, "--adapter", ADAPTER) == 2
    err = capsys.readouterr().err
    assert f"{path}:1:" in err and f"{path}:2:" in err and "did you mean 'answers'" in err
    assert client.calls == []  # not even whoami


def test_bad_arms_and_bad_regex_exit_2(monkeypatch, qfile, capsys):
    client = FakeClient()
    assert run_cli(monkeypatch, client, "--questions", qfile, "--arms", "base,nope") == 2
    assert run_cli(monkeypatch, client, "--questions", qfile, "--format-regex", "(") == 2
    assert client.calls == []
    with pytest.raises(SystemExit) as exc:  # one format option at a time
        run_cli(monkeypatch, client, "--questions", qfile, "--format-regex", "x",
                "--json-schema", qfile)
    assert exc.value.code == 2


# -- retries, failures, concurrency ------------------------------------------------------

def quota(retry_after: float | None) -> RateLimitError:
    return RateLimitError(grpc.StatusCode.RESOURCE_EXHAUSTED, "tokens per minute exceeded",
                          reason="QUOTA_EXCEEDED", retry_after=retry_after)


async def test_retries_honour_the_hint_capped_and_defaulted(qfile):
    client = FakeClient(errors={
        ("rag", "refund"): [quota(7.5), quota(120.0),
                            UnavailableError(grpc.StatusCode.UNAVAILABLE, "draining")]})
    sleeps = Sleeps()
    result = await run_eval(client, qfile, arms=("rag",), options=RunOptions(retries=3),
                            sleep=sleeps)
    assert sleeps.waits == [7.5, 30.0, 1.0]
    assert result.outcomes["rag"][0].error == ""
    assert result.outcomes["rag"][0].answer == "Refunds take 14 days [1]."
    assert result.failures == []


async def test_failure_after_retries_is_counted(qfile):
    client = FakeClient(errors={("base", "daypass"): [quota(2.0) for _ in range(3)]})
    sleeps = Sleeps()
    result = await run_eval(client, qfile, arms=("base",), options=RunOptions(retries=2),
                            sleep=sleeps)
    assert sleeps.waits == [2.0, 2.0]
    failed = result.outcomes["base"][1]
    assert failed.error == "RESOURCE_EXHAUSTED: tokens per minute exceeded"
    s = result.summaries["base"]
    assert s.failed == 1 and s.questions == 3 and s.answerable == 2  # still in the denominators
    assert result.scores["base"][1].correct is False
    assert result.failures == [failed]


@pytest.mark.parametrize("bad, expected", [
    (InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "json_schema is not valid"),
     "INVALID_ARGUMENT: json_schema is not valid"),
    (DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
     "DEADLINE_EXCEEDED: Deadline Exceeded"),
    (TimeoutError(), "DEADLINE_EXCEEDED: the call timed out"),
    (RuntimeError("the stream ended without its final message"),
     "RuntimeError: the stream ended without its final message"),
])
async def test_other_errors_and_timeouts_fail_at_once(qfile, bad, expected):
    client = FakeClient(errors={("adapter", "ceo"): [bad]})
    sleeps = Sleeps()
    result = await run_eval(client, qfile, arms=("adapter",), sleep=sleeps)
    assert sleeps.waits == []
    assert result.outcomes["adapter"][2].error == expected
    assert result.summaries["adapter"].failed == 1


async def test_concurrency_bound_is_respected(qfile):
    client = FakeClient(yields=5)
    await run_eval(client, qfile, options=RunOptions(concurrency=3))
    assert client.max_in_flight == 3
    client = FakeClient(yields=5)
    await run_eval(client, qfile, options=RunOptions(concurrency=1))
    assert client.max_in_flight == 1


def test_cli_exits_1_when_a_question_failed(monkeypatch, qfile, capsys):
    bad = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "too long")
    client = FakeClient(errors={("rag", "ceo"): [bad]})
    assert run_cli(monkeypatch, client, "--questions", qfile, "--adapter", ADAPTER) == 1
    out = capsys.readouterr().out
    assert "failed: rag 1/3" in out and "ceo [rag] INVALID_ARGUMENT: too long" in out


# -- outputs ---------------------------------------------------------------------------------

def test_table_shape(monkeypatch, qfile, capsys):
    client = FakeClient()
    assert run_cli(monkeypatch, client, "--questions", qfile, "--adapter", ADAPTER) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["arm", "containment", "token-F1", "recall@k", "cited",
                                "cite-prec", "refusals-ok", "false-ref", "p50", "s",
                                "tokens/answer"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:5]}
    assert list(rows) == ["base", "adapter", "rag", "rag+adapter"]
    assert rows["base"][:5] == ["0.00", "0.00", "-", "-", "-"]
    assert rows["rag"][:3] == ["1.00", rows["rag"][1], "1.00"]
    assert any(re.fullmatch(r"rag\+adapter vs rag: \d+ questions better, \d+ worse, \d+ tied "
                            r"\(exact sign test p = [\d.e-]+\)", line) for line in lines)
    assert "rag vs base: 2 questions better, 0 worse, 1 tied (exact sign test p = 0.500)" in lines
    assert not any(line.startswith("failed") for line in lines)


def test_refusal_message_counts_as_a_refusal(monkeypatch, qfile, capsys):
    replies = {arm: dict(r) for arm, r in REPLIES.items()}
    replies["adapter"]["ceo"] = "Arr, that be beyond me charts."
    client = FakeClient(replies=replies)
    args = ("--questions", qfile, "--adapter", ADAPTER, "--arms", "adapter", "--json")
    assert run_cli(monkeypatch, client, *args) == 0
    assert json.loads(capsys.readouterr().out)["summaries"]["adapter"]["refusal_correct"] == 0.0
    assert run_cli(monkeypatch, client, *args, "--refusal-message", "beyond me charts") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summaries"]["adapter"]["refusal_correct"] == 1.0
    assert doc["settings"]["refusal_messages"] == ["beyond me charts"]


def test_json_shape(monkeypatch, qfile, capsys):
    client = FakeClient()
    code = run_cli(monkeypatch, client, "--questions", qfile, "--adapter", ADAPTER, "--json",
                   "--seed", "3", "--limit", "2")
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["question_file"] == {"path": str(qfile), "questions": 3, "asked": 2,
                                    "sha256": hashlib.sha256(qfile.read_bytes()).hexdigest()}
    assert doc["tenant"] == "northwind" and doc["adapter"] == ADAPTER
    assert doc["arms"] == ["base", "adapter", "rag", "rag+adapter"]
    assert doc["settings"]["seed"] == 3 and doc["settings"]["max_tokens"] == 96
    assert doc["settings"]["temperature"] == 0.0 and doc["settings"]["concurrency"] == 4
    assert set(doc["summaries"]) == set(doc["arms"])
    assert doc["summaries"]["rag"]["recall_at_k"] == 1.0
    assert [c["summary"].split(":")[0] for c in doc["comparisons"]] == [
        "rag+adapter vs rag", "rag vs base", "adapter vs base", "rag+adapter vs adapter"]
    assert {"a", "b", "wins", "losses", "ties", "p_value"} <= set(doc["comparisons"][0])
    assert [q["id"] for q in doc["questions"]] == ["refund", "daypass"]
    rec = doc["questions"][0]["arms"]["rag"]
    assert rec["outcome"]["sources"][0]["doc_id"] == "doc-refunds"
    assert rec["score"]["correct"] is True
    assert doc["failed"] == 0


async def test_html_report_is_self_contained_and_escapes_answers(qfile, tmp_path):
    replies = {arm: dict(r) for arm, r in REPLIES.items()}
    replies["adapter"]["refund"] = HOSTILE
    client = FakeClient(replies=replies, errors={
        ("base", "ceo"): [InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "<b>bad</b>")]})
    result = await run_eval(client, qfile)
    path = tmp_path / "report.html"
    report.write_html(result, path)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for banned in ("http://", "https://", "<script src", "<link", "@import", "url("):
        assert banned not in page
    assert HOSTILE not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bad&lt;/b&gt;" in page and "<b>bad</b>" not in page
    assert page.count("<svg") == len(report.shown_metrics(result, table=False))
    for q in QUESTIONS:  # every question, with every arm's answer
        assert f"{q['id']}: " in page
    assert page.count('class="cell ') == len(QUESTIONS) * 4
    assert "Refunds take 14 days [1]." in page and "wrong" in page and "correct" in page
    assert list(tmp_path.glob(".report.html.*")) == []  # the temporary file was renamed


def test_cli_writes_the_report(monkeypatch, qfile, tmp_path, capsys):
    path = tmp_path / "out.html"
    assert run_cli(monkeypatch, FakeClient(), "--questions", qfile, "--adapter", ADAPTER,
                   "--report", path) == 0
    assert "<svg" in path.read_text()
    assert capsys.readouterr().out.startswith("arm")
    assert run_cli(monkeypatch, FakeClient(), "--questions", qfile, "--adapter", ADAPTER,
                   "--report", tmp_path / "missing" / "out.html") == 2


def test_cli_report_that_cannot_be_written_exits_1_after_printing(monkeypatch, qfile, tmp_path,
                                                                  capsys):
    def disk_full(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eval_cli, "write_html", disk_full)
    assert run_cli(monkeypatch, FakeClient(), "--questions", qfile, "--adapter", ADAPTER,
                   "--report", tmp_path / "r.html") == 1
    out, err = capsys.readouterr()
    assert out.startswith("arm") and "cannot write the report" in err


def test_cli_report_naming_a_folder_is_bad_input_before_any_call(monkeypatch, qfile, tmp_path,
                                                                capsys):
    folder = tmp_path / "taken.html"
    folder.mkdir()
    client = FakeClient()
    assert run_cli(monkeypatch, client, "--questions", qfile, "--adapter", ADAPTER,
                   "--report", folder) == 2
    assert "is a folder" in capsys.readouterr().err


# -- formats ---------------------------------------------------------------------------------

async def test_regex_format_match(qfile):
    result = await run_eval(FakeClient(), qfile, arms=("rag",),
                            format_check=formats.regex_check(r".*\[\d\]\."))
    assert result.summaries["rag"].format_match == pytest.approx(2 / 3)
    assert "format" in report.render_table(result).splitlines()[0]


def test_json_schema_is_sent_on_every_arm_and_checked(monkeypatch, qfile, tmp_path, capsys):
    schema = {"type": "object", "required": ["answer"],
              "properties": {"answer": {"type": "string"}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    replies = {arm: {qid: json.dumps({"answer": text}) for qid, text in r.items()}
               for arm, r in REPLIES.items()}
    client = FakeClient(replies=replies)
    assert run_cli(monkeypatch, client, "--questions", qfile, "--adapter", ADAPTER,
                   "--json-schema", path, "--json") == 0
    assert all(kw["json_schema"] == json.dumps(schema) for _, kw in client.asked())
    doc = json.loads(capsys.readouterr().out)
    assert {s["format_match"] for s in doc["summaries"].values()} == {1.0}


def test_schema_subset():
    check = formats.schema_check({"type": "object", "required": ["a"],
                                  "properties": {"a": {"type": "integer"},
                                                 "b": {"type": ["string", "null"]}}})
    assert check('  {"a": 1, "b": null} ')
    assert not check('{"a": true}')  # a boolean is not an integer
    assert not check('{"b": "x"}')  # required key missing
    assert not check('{"a": 1, "b": 2}')  # wrong property type
    assert not check("[1]") and not check("not json")
    assert formats.schema_check({"type": "array"})("[]")


def test_load_json_schema_errors(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text("[1, 2]")
    with pytest.raises(runner.EvalInputError, match="JSON object"):
        formats.load_json_schema(bad)
    with pytest.raises(runner.EvalInputError, match="cannot read"):
        formats.load_json_schema(tmp_path / "nope.json")


# -- the command -------------------------------------------------------------------------------

def test_every_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd").choices["eval"]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in options} >= {
        "--questions", "--adapter", "--arms", "--tenant", "--max-tokens", "--temperature",
        "--top-p", "--seed", "--concurrency", "--retries", "--limit", "--json", "--report",
        "--format-regex", "--json-schema", "--quiet", "--address", "--api-key-file", "--tls"}
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
