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
    p.add_argument("--data", required=True, metavar="PATH", help="JSONL training examples")
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
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(ns) -> int:
    # server extra: training needs torch, transformers and peft
    from hybridserve.config import HybridServeConfig
    from hybridserve.finetune import AdapterNotBetter, TrainConfig, finetune, train_to_folder

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
    print(result.eval.table())
    for sample in result.eval.samples:
        print(f"\nheld-out line {sample.line}:")
        print(f"  reference: {_short(sample.reference)}")
        print(f"  base:      {_short(sample.base)}")
        print(f"  adapter:   {_short(sample.adapter)}")
    note = "registered" if result.created else "already registered (same content)"
    if result.forced:
        note += " with --force: it does NOT beat the base model"
    print(f"\n{note}: {result.record.id} from {result.adapter_dir}", file=sys.stderr)
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
