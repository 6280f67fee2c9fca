"""`hybridserve eval`: which mix of retrieval and fine-tuning answers a tenant's questions.

Runs a question set through up to four arms of the served platform (base, adapter, rag,
rag+adapter) and prints a table of answer quality per arm with paired comparisons
(or one JSON document, and/or a self-contained HTML report).

Exit codes: 0 done; 2 bad input, found before any question is asked (the question file,
--arms, the adapter, the tenant's grants or base-model permission, the format options);
1 when any question failed (after retries; it is counted as wrong and reported), or the
--report file could not be written (the results are printed all the same).

A client command: it imports the SDK and hybridserve.evaluation / scoring, nothing of
the server, so it works with `pip install hybridserve` alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hybridserve.cli.client_cmds import client_args, err, platform_settings
from hybridserve.client import AsyncHybridServeClient
from hybridserve.evaluation import (
    ARMS,
    EvalInputError,
    EvalResult,
    FormatCheck,
    RunOptions,
    Sampling,
    Target,
    evaluate,
    load_json_schema,
    parse_arms,
    regex_check,
    render_table,
    resolve_target,
    schema_check,
    to_json,
    write_html,
)
from hybridserve.scoring import Question, QuestionFileError, QuestionSet, load_questions

#: Exit status for input found wrong before anything is asked.
EXIT_BAD_INPUT = 2
#: Exit status when any question failed.
EXIT_FAILED = 1


@dataclass(frozen=True)
class Plan:
    """Everything the command checked offline, before it talks to the platform."""

    question_set: QuestionSet
    questions: list[Question]
    arms: tuple[str, ...]
    options: RunOptions
    format_check: FormatCheck | None
    refusal_messages: tuple[str, ...]
    settings: dict


def make_async_client(ns) -> AsyncHybridServeClient:
    """The asyncio client for the same address, key and TLS options as
    client_cmds.make_client (which gives a blocking one)."""
    settings = platform_settings(ns)
    return AsyncHybridServeClient(
        ns.address or settings.address, api_key_file=getattr(ns, "api_key_file", None),
        default_key_file=settings.admin_key_path, tls=getattr(ns, "tls", False))


def bad_input(message: str) -> int:
    err(message)
    return EXIT_BAD_INPUT


def _load(path: str) -> QuestionSet:
    try:
        return load_questions(path)  # a missing or unreadable file is a QuestionFileError too
    except QuestionFileError as e:
        raise EvalInputError(f"the question file {path} has problems (nothing was asked):\n{e}") \
            from None


def _format(ns) -> tuple[FormatCheck | None, str]:
    """(format check, json_schema to send)."""
    if ns.format_regex is not None:
        return regex_check(ns.format_regex), ""
    if ns.json_schema is not None:
        text, schema = load_json_schema(ns.json_schema)
        return schema_check(schema), text
    return None, ""


def _check_report_path(path: str | None) -> None:
    if not path:
        return
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise EvalInputError(f"--report {path} is a folder; name the HTML file to write")
    if not target.parent.is_dir():
        raise EvalInputError(f"--report {path}: its folder does not exist")


def _check_sampling(ns) -> None:
    """What the server would refuse on every call, refused before any (as exit 2)."""
    if not 0 <= ns.temperature <= 2:
        raise EvalInputError(f"--temperature must be between 0 and 2, not {ns.temperature}")
    if ns.top_p is not None and not 0 < ns.top_p <= 1:
        raise EvalInputError(f"--top-p must be in (0, 1], not {ns.top_p}")
    if not ns.timeout > 0:
        raise EvalInputError(f"--timeout must be a positive number of seconds, not {ns.timeout}")


def plan(ns) -> Plan:
    """Reads and checks the offline input: the question file, the arms, the format
    options, the report's folder.

    Raises:
        EvalInputError: what is wrong, and what to do.
    """
    arms = parse_arms(ns.arms)
    question_set = _load(ns.questions)
    questions = question_set.questions[: ns.limit] if ns.limit else list(question_set.questions)
    format_check, json_schema = _format(ns)
    _check_report_path(ns.report)
    _check_sampling(ns)
    sampling = Sampling(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                        seed=ns.seed)
    options = RunOptions(sampling=sampling, json_schema=json_schema, concurrency=ns.concurrency,
                         retries=ns.retries, timeout_s=ns.timeout)
    settings = {"arms": list(arms), **sampling.kwargs(), "concurrency": ns.concurrency,
                "retries": ns.retries, "timeout_s": ns.timeout, "limit": ns.limit,
                "format_regex": ns.format_regex, "json_schema": ns.json_schema,
                "refusal_messages": list(ns.refusal_message or [])}
    return Plan(question_set, questions, arms, options, format_check,
                tuple(ns.refusal_message or ()), settings)


def _notes(ns, target: Target, arms: tuple[str, ...]) -> None:
    if target.adapter_source == "default":
        print(f"note: using tenant {target.tenant}'s default adapter {target.adapter} "
              "(pass --adapter to choose another)", file=sys.stderr)
    if ns.adapter and not target.adapter:
        print(f"note: --adapter {ns.adapter} is not used by the arms {', '.join(arms)}",
              file=sys.stderr)


async def run(ns, p: Plan) -> EvalResult | int:
    """The checks that need the platform, then the evaluation (an exit status when a
    check fails)."""
    async with make_async_client(ns) as client:
        try:
            target = await resolve_target(client, p.arms, tenant=ns.tenant, adapter=ns.adapter)
        except EvalInputError as e:
            return bad_input(e.message)
        _notes(ns, target, p.arms)
        with tqdm(total=len(p.questions) * len(p.arms), unit="answer", file=sys.stderr,
                  desc=f"eval {target.tenant}", disable=ns.quiet) as bar:
            return await evaluate(client, p.question_set, p.questions, p.arms, target, p.options,
                                  format_check=p.format_check,
                                  refusal_messages=p.refusal_messages, settings=p.settings,
                                  on_done=lambda _o: bar.update(1))


def emit(ns, result: EvalResult) -> bool:
    """The table or the JSON on stdout, then the report file (if asked); False when
    the report could not be written (the results are printed all the same)."""
    if ns.json:
        print(json.dumps(to_json(result), indent=2, ensure_ascii=False))
    else:
        print(render_table(result))
    if not ns.report:
        return True
    try:
        write_html(result, Path(ns.report).expanduser())
    except OSError as e:
        err(f"cannot write the report {ns.report}: {e.strerror or e}")
        return False
    print(f"report written to {ns.report}", file=sys.stderr)
    return True


def cmd_eval(ns) -> int:
    try:
        p = plan(ns)
    except EvalInputError as e:
        return bad_input(e.message)
    result = asyncio.run(run(ns, p))
    if isinstance(result, int):
        return result
    written = emit(ns, result)
    return EXIT_FAILED if result.failures or not written else 0


# -- the parser ------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


ARMS_HELP = ("comma-separated arms to run (default: all four, in this order): base = the base "
             "model alone; adapter = the adapter alone; rag = Ask (retrieval) with the base "
             "model; rag+adapter = Ask with the adapter. base and rag need the tenant's "
             "allow_base; adapter and rag+adapter need an adapter")


def add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="measure a tenant's question set through base, adapter, rag and "
        "rag+adapter", description=__doc__.split("\n\n")[1],
        epilog="exit status: 0 done; 2 bad input, found before any question is asked; 1 when "
        "any question failed (it is counted as wrong, and reported) or the report could not "
        "be written")
    client_args(e)
    e.add_argument("--questions", required=True, metavar="FILE",
                   help="JSONL question set, one object a line: question, answers (reference "
                   "answers), gold_docs (doc ids that hold the answer; empty = unanswerable, "
                   "the right answer is a refusal), optional id. Checked whole before anything "
                   "is asked")
    e.add_argument("--adapter", metavar="ID", help="adapter (name@version) of the adapter and "
                   "rag+adapter arms; must be granted to the tenant (default: the tenant's "
                   "default adapter)")
    e.add_argument("--arms", default=",".join(ARMS), help=ARMS_HELP)
    e.add_argument("--tenant", default="", help="tenant to evaluate: required with an admin "
                   "key; a tenant key evaluates its own tenant")
    e.add_argument("--max-tokens", type=_positive, default=96,
                   help="most tokens per answer, the same on every arm (default 96)")
    e.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature, the same on every arm (default 0: greedy)")
    e.add_argument("--top-p", type=float, help="nucleus sampling, the same on every arm "
                   "(default: the server's)")
    e.add_argument("--seed", type=int, help="sampling seed, the same on every arm "
                   "(default: none)")
    e.add_argument("--concurrency", type=_positive, default=4,
                   help="calls in flight at once (default 4)")
    e.add_argument("--retries", type=_non_negative, default=3,
                   help="retries of a call refused with RESOURCE_EXHAUSTED or UNAVAILABLE, "
                   "each after the error's retry hint (at most 30 s; 1 s without one); then "
                   "the question is failed, counted as wrong, and the exit status is 1 (default 3)")
    e.add_argument("--timeout", type=float, default=300.0,
                   help="deadline of one call in seconds; a timeout fails the question "
                   "(default 300)")
    e.add_argument("--limit", type=_positive, metavar="N",
                   help="ask only the first N questions of the file (default: all)")
    e.add_argument("--json", action="store_true", help="print one JSON document (summaries, "
                   "comparisons, per-question answers and scores, settings, the question "
                   "file's sha256) instead of the table")
    e.add_argument("--report", metavar="FILE.html", help="also write one self-contained HTML "
                   "page: the table, a bar chart per metric, every arm's answer to every "
                   "question side by side")
    fmt = e.add_mutually_exclusive_group()
    fmt.add_argument("--format-regex", metavar="RE", help="measure the format match: the share "
                     "of answers whose stripped text matches RE as a whole (re.fullmatch)")
    fmt.add_argument("--json-schema", metavar="FILE", help="a JSON schema sent as json_schema on "
                     "every arm; the format match checks that the answer parses as JSON with "
                     "the schema's top-level type, required keys and top-level property types")
    e.add_argument("--refusal-message", action="append", metavar="TEXT",
                   help="an answer holding TEXT counts as a refusal (in any case and "
                   "punctuation), besides the built-in phrases (\"I don't know\", \"could not "
                   "find\", ...): give the platform's rag.no_context_message when it is not "
                   "the default, since `hybridserve finetune --rag` trains adapters to refuse "
                   "with it. Repeatable")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)
