"""Fine-tuning benchmark: training tokens/s of `hybridserve.finetune`'s trainer on CPU.

Tokens are every non-padding token of each batch (prompt and answer: the whole
forward pass; the loss and LM head cover the answer only). The first
`--warmup` steps are excluded from the steady-state rate; the overall rate
includes them.

  tiny     the tiny random Llama (built locally), the synthetic `[OK:word]` data
  smollm2  SmolLM2-135M-Instruct (prepared offline), the demo's persona chats
           (examples/adapters/pirate-tone/train.jsonl)

Usage:
  python benchmarks/finetune.py                    # both models, 1 torch thread
  python benchmarks/finetune.py --model tiny --threads 2 --out benchmarks/results/finetune.json
  python benchmarks/finetune.py --smoke            # tiny, 3 steps: writes results/finetune-smoke.json

Prints one JSON object. Defaults: TrainConfig() (rank 8, q/k/v/o, all layers,
batch 4); every run is bounded by --steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for testkit/
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = {"tiny": 40, "smollm2": 10}
PERSONA_DATA = Path(__file__).resolve().parents[1] / "examples/adapters/pirate-tone/train.jsonl"


def _dataset(model: str, base_dir: Path, tokenizer):
    from hybridserve.finetune.data import Example, load_examples, tokenize_example

    if model == "tiny":
        from testkit.synthetic import format_examples

        chats = []
        for row in format_examples(80):
            chats.append(
                row.get("messages")
                or [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"]},
                ]
            )
    else:
        chats = [example.messages for example in load_examples(PERSONA_DATA).examples]
    return [tokenize_example(tokenizer, Example(i + 1, chat)) for i, chat in enumerate(chats)]


def _base_dir(model: str, work: Path) -> Path:
    if model == "tiny":
        from testkit.tiny import build_tiny_llama

        return build_tiny_llama(work / "tiny")
    from hybridserve.constants import CACHE_DIR
    from hybridserve.models import prepare_default_model

    return prepare_default_model(CACHE_DIR, progress=lambda m: print(m, file=sys.stderr))


def run(model: str, steps: int, warmup: int, work: Path) -> dict:
    from hybridserve.finetune import TrainConfig
    from hybridserve.finetune.trainer import StepInfo, load_tokenizer, train

    base_dir = _base_dir(model, work)
    tokenizer = load_tokenizer(base_dir)
    examples = _dataset(model, base_dir, tokenizer)
    train_cfg = TrainConfig(steps=steps)
    infos: list[StepInfo] = []
    out_dir = Path(tempfile.mkdtemp(prefix=f"adapter-{model}-", dir=work))
    started = time.monotonic()
    stats = train(
        base_dir, examples, train_cfg, out_dir, base_model_name=model, on_step=infos.append
    )
    wall = time.monotonic() - started  # includes loading the model and saving the adapter

    steady = infos[warmup:]
    steady_seconds = (
        steady[-1].elapsed - infos[warmup - 1].elapsed if warmup else steady[-1].elapsed
    )
    steady_tokens = sum(i.tokens for i in steady)
    step_seconds = [b.elapsed - a.elapsed for a, b in itertools.pairwise(infos)]
    return {
        "model": model,
        "config": {
            k: v
            for k, v in train_cfg.model_dump(mode="json").items()
            if k in ("rank", "alpha", "target_modules", "layers_to_transform", "batch_size")
        },
        "examples": len(examples),
        "mean_example_tokens": round(statistics.mean(len(e.input_ids) for e in examples), 1),
        "mean_answer_tokens": round(statistics.mean(e.n_labels for e in examples), 1),
        "steps": stats.steps,
        "warmup_steps": warmup,
        "tokens": stats.tokens,
        "train_seconds": round(stats.seconds, 3),
        "tokens_per_second": round(stats.tokens_per_second, 1),
        "steady_tokens_per_second": round(steady_tokens / steady_seconds, 1),
        "median_step_seconds": round(statistics.median(step_seconds), 4) if step_seconds else None,
        "wall_seconds_with_load_and_save": round(wall, 2),
        "final_loss": round(stats.final_loss, 4) if stats.final_loss is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2", "all"], default="all")
    parser.add_argument("--steps", type=int, help="steps per model (default: tiny 40, smollm2 10)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny model, 3 steps (checks that the benchmark still runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.steps, args.warmup = "tiny", 3, 1
        args.out = args.out or Path(__file__).resolve().parent / "results" / "finetune-smoke.json"

    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    models = ["tiny", "smollm2"] if args.model == "all" else [args.model]
    with tempfile.TemporaryDirectory(prefix="hybridserve-bench-finetune-") as tmp:
        results = [
            run(
                m, args.steps or STEPS[m], min(args.warmup, (args.steps or STEPS[m]) - 1), Path(tmp)
            )
            for m in models
        ]
    report = {
        "benchmark": "finetune",
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
