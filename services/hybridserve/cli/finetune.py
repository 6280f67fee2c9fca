"""The `hybridserve finetune` subcommand (a server command: it needs the server extra).

Runs against the adapter store and registry on disk (no running platform
needed): a running platform sees the new adapter at once, through the shared
registry files. With `--output DIR` it only trains, into DIR (cached; see
`pipeline.train_to_folder`), and registers nothing: scripts/demo.sh builds its
adapters from examples/adapters/ that way.
"""

from __future__ import annotations

import argparse
import sys
import time

from hybridserve.exceptions import RateLimitError, UnavailableError


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `finetune` to the `hybridserve` subcommands; returns its parser."""
    p = subparsers.add_parser(
        "finetune",
        help="train, evaluate and register a LoRA adapter from a JSONL file (on CPU)",
        description="Train a LoRA adapter for the served base model on a JSONL file of chats "
        '({"messages": [...]} or {"prompt": ..., "completion": ...} per line), evaluate it '
        "against the base model on a held-out split, and register it as name@<content hash> "
        "if it beats the base model (lower held-out loss or a higher task metric). With "
        "--output DIR, train on every example into DIR instead: no evaluation, no registering.",
    )
    p.add_argument("--data", metavar="PATH", help="JSONL training examples (not with --rag)")
    p.add_argument("--name", required=True, help="adapter name; the version is the content hash")
    p.add_argument("--steps", type=int, help="optimizer steps (default: 3 epochs)")
    p.add_argument(
        "--epochs", type=float, help="passes over the training split (instead of --steps)"
    )
    p.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=int, help="LoRA alpha (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 4)")
    p.add_argument("--max-seq-len", type=int, help="longest example in tokens (default 512)")
    p.add_argument(
        "--layers",
        type=_layers,
        metavar="SPEC",
        help="decoder layers to adapt, as indices and ranges, e.g. 15-29 or 0,2,4-7 "
        "(default: all); adapting only the upper layers trains faster",
    )
    p.add_argument(
        "--seed", type=int, help="seed; same seed and data give the same adapter (default 0)"
    )
    p.add_argument(
        "--eval-max-examples", type=int, metavar="N",
        help="held-out examples (with --rag: questions) the acceptance check evaluates at "
        "most (default 64); fewer is faster, and less certain",
    )
    p.add_argument(
        "--format-regex",
        metavar="RE",
        help="task metric: share of held-out answers that fully match RE (default: exact match)",
    )
    p.add_argument(
        "--force", action="store_true", help="register even if the adapter does not beat the base"
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        help="train on every example (nothing held out) and save the adapter into DIR, without "
        "evaluating or registering it (register it later with `hybridserve adapters register`); "
        "prints DIR. DIR is reused without training when it was built from the same data, base "
        "model, name and options (its .hybridserve-finetune.json marker records them)",
    )
    rag = p.add_argument_group(
        "retrieval-aware fine-tuning (--rag)",
        "Train the adapter to answer from the passages the tenant's own retrieval finds, and "
        "cite them: RAFT chats built with the prompts the platform's Ask builds (the gold "
        "passage among retrieved distractors, or removed so that it learns to refuse). Needs "
        "the running platform and a key of the tenant (or an admin key with --tenant); the "
        "split holds out whole documents, and the adapter is registered only if, on the "
        "held-out questions and with Ask's prompts, its answers contain the reference more "
        "often than the base model's (or --force). See docs/evaluation.md.",
    )
    rag.add_argument("--rag", action="store_true", help="retrieval-aware fine-tuning")
    rag.add_argument("--questions", metavar="FILE", help="the question file: JSONL of "
                     '{"question", "answers", "gold_docs", "id"?} (as `hybridserve eval`)')
    rag.add_argument("--tenant", default="", help="the tenant (with an admin key)")
    rag.add_argument("--p-gold", type=float, default=0.8, metavar="P",
                     help="share of answerable questions trained with their gold passage shown "
                     "(the rest train the refusal; default 0.8)")
    rag.add_argument("--answer-tokens", type=int, default=96, metavar="N",
                     help="max_tokens the prompts are built for, as Ask's (default 96)")
    rag.add_argument("--held-out-fraction", type=float, metavar="F",
                     help="share of gold documents held out with their questions (default 0.15)")
    rag.add_argument("--write-held-out", metavar="FILE",
                     help="write the held-out questions there, for `hybridserve eval`")
    rag.add_argument("--reuse", action="store_true",
                     help="if an adapter of this --name was already registered from the same "
                     "question file, options, system prompt, RAG instructions and base model, "
                     "print its id and train nothing (the documents are not compared: after "
                     "changing them, leave --reuse out)")
    rag.add_argument("--address", help="host:port of the platform (default: from config)")
    rag.add_argument("--api-key-file", help="file holding the API key (default: "
                     "$HYBRIDSERVE_API_KEY, else <data_dir>/admin.key)")
    rag.add_argument("--tls", action="store_true", help="connect with TLS (through an ingress)")
    rag.add_argument("--app", default="", help=argparse.SUPPRESS)  # tests: another rag app
    p.set_defaults(func=cmd_finetune)
    return p


class AskPromptSource:
    """`finetune.raft.PromptSource` over the platform: an Ask with prompt_only per call,
    as the tenant (`tenant` names it for an admin key)."""

    #: Filters one request may carry (retrieval's limit); further exclusions are
    #: dropped from the passages by the builder instead.
    MAX_FILTERS = 16
    #: Retries of a call refused for quota or overload, after the server's hint (<= 30 s).
    RETRIES = 5

    def __init__(self, client, *, tenant: str = "", max_tokens: int = 96, app: str = "",
                 timeout: float = 120, sleep=time.sleep):
        self.client, self.tenant, self.max_tokens = client, tenant, max_tokens
        self.kwargs = {"app": app} if app else {}
        self.timeout = timeout
        self.sleep = sleep

    def prompt(self, question: str, *, only_docs=(), exclude_docs=()):
        # server extra: the training data types live with training
        from hybridserve.finetune.raft import AskPrompt, PromptPassage

        filters, extra = [], {}
        if only_docs:
            # The gold documents' chunks, each whatever its score: the one holding the
            # fact may rank low for a paraphrased question (min_score would drop it).
            filters.append(("doc_id", "any_of", list(only_docs)))
            extra = {"min_score": -1.0}
        filters += [("doc_id", "not_equal", [d]) for d in exclude_docs]
        for attempt in range(self.RETRIES + 1):
            try:
                answer = self.client.ask(
                    question, tenant=self.tenant, prompt_only=True, max_tokens=self.max_tokens,
                    filters=filters[: self.MAX_FILTERS], timeout=self.timeout, **extra,
                    **self.kwargs)
                break
            except (RateLimitError, UnavailableError) as e:  # the tenant's quota, overload
                if attempt == self.RETRIES:
                    raise
                self.sleep(min(30.0, e.retry_after if e.retry_after is not None else 1.0))
        return AskPrompt(
            tuple(PromptPassage(c.number, c.doc_id, c.chunk_id, c.title, c.text)
                  for c in answer.citations),
            tuple(answer.final.prompt_token_ids),
            answer.final.passage_token_budget,
        )


def cmd_finetune(ns) -> int:
    # server extra: training needs torch, transformers and peft
    from hybridserve.config import HybridServeConfig
    from hybridserve.finetune import AdapterNotBetter, TrainConfig, finetune, train_to_folder

    if ns.rag:
        return _cmd_finetune_rag(ns)
    if ns.data is None or ns.questions is not None:
        print("hybridserve finetune: error: give --data (or --rag with --questions)",
              file=sys.stderr)
        return 2
    if ns.output is not None and (ns.force or ns.format_regex is not None):
        print(
            "hybridserve finetune: error: --force and --format-regex apply to the held-out "
            "evaluation, which --output skips",
            file=sys.stderr,
        )
        return 2  # a usage error, as argparse's
    cfg = HybridServeConfig.load(getattr(ns, "config", None))
    train_cfg = TrainConfig.from_options(
        steps=ns.steps,
        epochs=ns.epochs,
        rank=ns.rank,
        alpha=ns.alpha,
        lr=ns.lr,
        batch_size=ns.batch_size,
        max_seq_len=ns.max_seq_len,
        layers_to_transform=ns.layers,
        seed=ns.seed,
        format_regex=ns.format_regex,
        eval_max_examples=ns.eval_max_examples,
    )

    def progress(message: str) -> None:  # stdout carries only the result
        print(message, file=sys.stderr, flush=True)

    if ns.output is not None:
        built = train_to_folder(
            cfg, ns.data, ns.name, ns.output, train_cfg, progress=progress, progress_bar=True
        )
        print(built.path)
        return 0
    try:
        result = finetune(
            cfg, ns.data, ns.name, train_cfg, force=ns.force, progress=progress, progress_bar=True
        )
    except AdapterNotBetter as exc:
        print(exc.eval.table())
        raise
    print(result.record.id)
    _print_result(result, f" from {result.adapter_dir}")
    return 0


def _print_result(result, after_id: str) -> None:
    """The acceptance table and samples on stdout; what was registered on stderr."""
    print(result.eval.table())
    for sample in result.eval.samples:
        print(f"\nheld-out line {sample.line}:" if sample.line else "")
        print(f"  reference: {_short(sample.reference)}")
        print(f"  base:      {_short(sample.base)}")
        print(f"  adapter:   {_short(sample.adapter)}")
    note = "registered" if result.created else "already registered (same content)"
    if result.forced:
        note += " with --force: it does NOT beat the base model"
    print(f"\n{note}: {result.record.id}{after_id}", file=sys.stderr)


def _cmd_finetune_rag(ns) -> int:
    # server extra: training needs torch, transformers and peft
    from hybridserve.cli.client_cmds import make_client
    from hybridserve.config import HybridServeConfig
    from hybridserve.finetune import AdapterNotBetter, TrainConfig, finetune_rag
    from hybridserve.scoring import QuestionFileError, load_questions

    problems = [msg for bad, msg in (
        (ns.questions is None, "--rag needs --questions FILE"),
        (ns.data is not None, "--rag trains on --questions, not --data"),
        (ns.output is not None, "--rag registers the adapter; --output does not apply"),
        (ns.format_regex is not None, "--rag is accepted on containment; --format-regex does not apply"),
        (not 0 <= ns.p_gold <= 1, "--p-gold must be between 0 and 1"),
        (ns.answer_tokens < 1, "--answer-tokens must be at least 1"),
    ) if bad]
    if problems:
        for msg in problems:
            print(f"hybridserve finetune: error: {msg}", file=sys.stderr)
        return 2
    try:  # the whole file checked before the platform is called
        load_questions(ns.questions)
    except QuestionFileError as e:
        print(f"hybridserve finetune: error: {e}", file=sys.stderr)
        return 2
    cfg = HybridServeConfig.load(getattr(ns, "config", None))
    train_cfg = TrainConfig.from_options(
        steps=ns.steps, epochs=ns.epochs, rank=ns.rank, alpha=ns.alpha, lr=ns.lr,
        batch_size=ns.batch_size, layers_to_transform=ns.layers, seed=ns.seed,
        held_out_fraction=ns.held_out_fraction, eval_max_examples=ns.eval_max_examples,
    )

    def progress(message: str) -> None:  # stdout carries only the result
        print(message, file=sys.stderr, flush=True)

    with make_client(ns) as client:
        who = client.whoami()
        if who.kind == "admin":
            if not ns.tenant:
                print("hybridserve finetune: error: an admin key must name the tenant whose "
                      "retrieval to train on (--tenant)", file=sys.stderr)
                return 2
            tenant = client.get_tenant(ns.tenant)
        else:
            if ns.tenant and ns.tenant != who.tenant.id:
                print(f"hybridserve finetune: error: this key belongs to tenant {who.tenant.id!r}, "
                      f"not {ns.tenant!r}; leave --tenant out, or use an admin key",
                      file=sys.stderr)
                return 2
            tenant = who.tenant
        source = AskPromptSource(client, tenant=ns.tenant, max_tokens=ns.answer_tokens, app=ns.app)
        try:
            out = finetune_rag(
                cfg, ns.questions, ns.name, source, train_cfg, tenant=tenant.id,
                system_prompt=tenant.system_prompt,
                p_gold=ns.p_gold, max_tokens=ns.answer_tokens, force=ns.force,
                held_out_path=ns.write_held_out, reuse=ns.reuse, progress=progress,
                progress_bar=True,
            )
        except AdapterNotBetter as exc:
            print(exc.eval.table())
            raise
    result = out.result
    print(out.record.id)
    if result is None:  # reused
        return 0
    _print_result(result, f"; grant it to {tenant.id} (`hybridserve admin grants add {tenant.id} "
                  f"{result.record.id}`), then compare the arms with `hybridserve eval`")
    return 0


def _layers(spec: str) -> tuple[int, ...]:
    """`--layers`: "15-29" or "0,2,4-7" -> sorted unique layer indices."""
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            start, stop = int(first), int(last or first)
            if start < 0 or stop < start:
                raise ValueError
            layers.update(range(start, stop + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not a list of layer indices or ranges such as 15-29 or 0,2,4-7"
        ) from None
    return tuple(sorted(layers))


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
