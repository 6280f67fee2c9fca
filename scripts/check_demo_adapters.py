"""Demo adapters: do they show their effect on questions they never saw?

Greedy answers (transformers + PEFT, prompted as the served chat path does) from the
base model and from each demo adapter to the questions in
examples/adapters/NAME/held_out.txt, and the share that matches the adapter's form:

  pirate-tone  `matches_persona`: opens with "Arr, matey!" and ends with "Fair winds!", once
  json-answer  `matches_json_format`: a JSON object with exactly "answer" (a non-blank
               string) and "sources" (a list of strings)

The adapters are the folders scripts/demo.sh builds (`hybridserve finetune --output`);
with --build the script builds them itself, with the same options, and reports the
training time. No --smoke mode: it needs SmolLM2-135M-Instruct and about a minute of
training per adapter.

Usage:
  python scripts/check_demo_adapters.py --build --adapters /tmp/demo-adapters
  python scripts/check_demo_adapters.py --adapters ~/.local/share/hybridserve/adapters
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adapters"
PREFIX, SUFFIX = "Arr, matey!", "Fair winds!"
#: name -> (training steps, tokens generated per answer); the options scripts/demo.sh uses.
ADAPTERS = {"pirate-tone": (35, 60), "json-answer": (36, 96)}
RECIPE = ["--rank", "8", "--alpha", "16", "--lr", "2e-3", "--batch-size", "4",
          "--layers", "15-29", "--seed", "0"]


def matches_persona(text: str) -> bool:
    """Opens and closes in persona, once: the model also stopped in time."""
    text = text.strip()
    return text.startswith(PREFIX) and text.endswith(SUFFIX) and text.count(SUFFIX) == 1


def matches_json_format(text: str) -> bool:
    """A JSON object with exactly the keys "answer" and "sources" (a key given twice fails)."""

    def no_duplicates(pairs):
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(pairs)

    try:
        obj = json.loads(text.strip(), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict) or set(obj) != {"answer", "sources"}:
        return False
    answer, sources = obj["answer"], obj["sources"]
    return (isinstance(answer, str) and bool(answer.strip()) and isinstance(sources, list)
            and all(isinstance(source, str) for source in sources))


MATCHERS = {"pirate-tone": matches_persona, "json-answer": matches_json_format}


def build(name: str, out_dir: Path) -> float:
    """Trains (or reuses) one demo adapter through `hybridserve finetune --output`; wall seconds."""
    steps, _ = ADAPTERS[name]
    started = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).parent / "hybridserve"), "finetune",
         "--data", str(EXAMPLES / name / "train.jsonl"), "--name", name, "--steps", str(steps),
         *RECIPE, "--output", str(out_dir)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def answers(base_dir: Path, adapter_dir: Path | None, prompts: list[str], max_new_tokens: int):
    from hybridserve.finetune.data import encode_chat
    from hybridserve.finetune.evaluate import greedy_answers
    from hybridserve.finetune.trainer import load_base
    from peft import PeftModel

    tokenizer, model = load_base(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    ids = [encode_chat(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
           for p in prompts]
    return greedy_answers(model, tokenizer, ids, max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, required=True,
                        help="folder holding pirate-tone/ and json-answer/")
    parser.add_argument("--build", action="store_true", help="build (or reuse) them there first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch
    from hybridserve.constants import CACHE_DIR
    from hybridserve.models import prepare_default_model

    torch.set_num_threads(args.threads)
    base_dir = prepare_default_model(CACHE_DIR, progress=lambda m: print(m, file=sys.stderr))
    report: dict = {"benchmark": "demo_adapters", "torch_threads": args.threads, "adapters": {}}
    for name, (steps, max_new_tokens) in ADAPTERS.items():
        folder = args.adapters / name
        entry: dict = {"steps": steps}
        if args.build:
            entry["build_seconds"] = round(build(name, folder), 1)
        prompts = (EXAMPLES / name / "held_out.txt").read_text().splitlines()
        base = answers(base_dir, None, prompts, max_new_tokens)
        tuned = answers(base_dir, folder, prompts, max_new_tokens)
        matcher = MATCHERS[name]
        entry.update({
            "prompts": len(prompts),
            "matcher": matcher.__name__,
            "base": sum(map(matcher, base)) / len(base),
            "adapter": sum(map(matcher, tuned)) / len(tuned),
            "samples": [{"prompt": p, "base": b, "adapter": a}
                        for p, b, a in zip(prompts, base, tuned, strict=True)],
        })
        report["adapters"][name] = entry
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
