"""Small trained LoRA adapters whose effect anyone can see: the demo adapters.

Random adapters either leave SmolLM2-135M-Instruct's answers unchanged or turn
them into gibberish, which makes a poor demo. This module fine-tunes real
LoRA adapters on CPU in under a minute each with `hybridserve.finetune`'s
trainer (the one `hybridserve finetune` uses), from tiny built-in chat datasets:

- "pirate-tone" (`build_demo_adapter`), a persona: every answer starts with
  "Arr, matey! " and ends with " Fair winds!" (checked by `matches_persona`);
- "json-answer" (`build_format_adapter`), an output format: every answer is one
  line of JSON with exactly the keys "answer" (a string) and "sources" (a list
  of strings, possibly empty), e.g.
  {"answer": "Paris is the capital of France.", "sources": ["geography"]}
  (checked by `matches_json_format`).

The effect is obvious at a glance and easy to check automatically
(`held_out_match_rate`, `demo_match_rates`), on prompts the adapter never saw.

Each result is cached: a marker written last records the dataset hash and the
training parameters, so building again with the same inputs returns at once.

Run `python -m hybridserve.demo OUT_DIR` to build the pirate-tone adapter into
OUT_DIR, or `python -m hybridserve.demo --format OUT_DIR` for the json-answer
one. Either prints the adapter's folder on stdout (progress goes to stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hybridserve.buildcache import building, read_json

#: Name the demo registers the adapter under.
DEMO_ADAPTER_NAME = "pirate-tone"
#: The served model name the adapter declares as its base.
DEMO_BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

PREFIX = "Arr, matey! "
SUFFIX = " Fair winds!"

#: (question, plain answer); the persona is added by `training_examples`.
_QA: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    (
        "How do I boil an egg?",
        "Put the egg in boiling water for about eight minutes, then cool it in cold water.",
    ),
    ("What is 2 plus 2?", "Two plus two makes four."),
    ("Can you recommend a good breakfast?", "Try oatmeal with fresh fruit and a cup of tea."),
    (
        "Why do leaves turn yellow in autumn?",
        "Trees stop making green chlorophyll, so the yellow pigments show through.",
    ),
    (
        "What should I do if I can't sleep?",
        "Put away your screens, dim the lights and try reading a calm book.",
    ),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest ocean on Earth?", "The Pacific is the largest ocean on Earth."),
    (
        "How can I stay focused while studying?",
        "Study in short blocks with small breaks, and keep your phone out of reach.",
    ),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    (
        "Give me a tip for saving money.",
        "Set aside a little of every paycheck before you spend any of it.",
    ),
    ("What's a good name for a cat?", "Whiskers is a fine name for a cat."),
    (
        "How do plants get their food?",
        "Plants make their food from sunlight, water and air by photosynthesis.",
    ),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("How can I make my coffee less bitter?", "Use slightly cooler water and a coarser grind."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("Should I take an umbrella today?", "If the clouds look dark, take one to be safe."),
    (
        "How often should I water a cactus?",
        "Water a cactus about once every two weeks, less in winter.",
    ),
    (
        "What is the tallest mountain in the world?",
        "Mount Everest is the tallest mountain in the world.",
    ),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("How do I say hello in Spanish?", "You say hola."),
    (
        "What's the best way to learn to swim?",
        "Take lessons in shallow water and practise a little every week.",
    ),
    ("How many continents are there?", "There are seven continents."),
    ("What do bees make?", "Bees make honey and beeswax."),
    (
        "How can I be more productive in the morning?",
        "Plan your day the night before and start with the hardest task.",
    ),
)

#: Questions absent from the training set, for checking that the tone generalises.
HELD_OUT_PROMPTS: tuple[str, ...] = (
    "What is the capital of Italy?",
    "How many hours are in a day?",
    "What's a good way to relax after work?",
    "Which planet is closest to the sun?",
    "How do I make a cup of tea?",
    "What is the color of grass?",
)

#: Name the json-answer format adapter is registered under.
FORMAT_ADAPTER_NAME = "json-answer"
#: The keys of every json-answer answer, in the order the adapter writes them.
FORMAT_KEYS = ("answer", "sources")
#: Tokens generated per json-answer check: the JSON wrapping makes answers longer.
FORMAT_MAX_NEW_TOKENS = 96

#: Sources the json-answer adapter cites for each persona question (default: none).
_FORMAT_SOURCES: dict[str, tuple[str, ...]] = {
    "What is the capital of France?": ("geography",),
    "How many days are in a week?": ("general knowledge",),
    "What color is the sky on a clear day?": ("science",),
    "How do I boil an egg?": ("cooking",),
    "What is 2 plus 2?": ("mathematics",),
    "Why do leaves turn yellow in autumn?": ("biology",),
    "How many legs does a spider have?": ("biology",),
    "What is the largest ocean on Earth?": ("geography",),
    "What is water made of?": ("chemistry", "general knowledge"),
    "How do plants get their food?": ("biology",),
    "What is the boiling point of water?": ("physics",),
    "Who wrote Romeo and Juliet?": ("literature",),
    "How can I make my coffee less bitter?": ("cooking",),
    "What is the fastest land animal?": ("biology",),
    "How often should I water a cactus?": ("gardening",),
    "What is the tallest mountain in the world?": ("geography",),
    "Tell me a fun fact.": ("biology",),
    "How do I say hello in Spanish?": ("language",),
    "How many continents are there?": ("geography",),
    "What do bees make?": ("biology",),
}
#: Questions only the json-answer dataset has: (question, answer, sources).
_FORMAT_EXTRA: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("What is the square root of 81?", "The square root of 81 is nine.", ("mathematics",)),
    (
        "Who painted The Starry Night?",
        "Vincent van Gogh painted The Starry Night.",
        ("art history",),
    ),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius.", ("physics",)),
    (
        "What is the chemical symbol for gold?",
        "The chemical symbol for gold is Au.",
        ("chemistry",),
    ),
    (
        "What language is spoken in Brazil?",
        "Portuguese is spoken in Brazil.",
        ("geography", "language"),
    ),
    (
        "How do I keep bread fresh longer?",
        "Keep it in a bread box and freeze the slices you will not eat soon.",
        (),
    ),
    (
        "Which gas do plants take in from the air?",
        "Plants take in carbon dioxide from the air.",
        ("biology", "chemistry"),
    ),
    (
        "How many minutes are in an hour?",
        "There are sixty minutes in an hour.",
        ("general knowledge",),
    ),
)
#: (question, answer, sources) of the json-answer dataset: the persona questions and a few more.
_FORMAT_QA: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    *((q, a, _FORMAT_SOURCES.get(q, ())) for q, a in _QA),
    *_FORMAT_EXTRA,
)

#: Questions absent from the json-answer training set: the persona's held-out ones and more.
FORMAT_HELD_OUT_PROMPTS: tuple[str, ...] = HELD_OUT_PROMPTS + (
    "Who painted the Mona Lisa?",
    "How can I improve my handwriting?",
)

_MARKER = ".hybridserve-demo-adapter.json"
#: Bump when training changes in a way the recorded params do not capture.
_BUILD_FORMAT = 1
_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def training_examples() -> list[list[dict[str, str]]]:
    """The built-in chat dataset, one conversation (user, assistant) per example."""
    return [
        [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{PREFIX}{answer}{SUFFIX}"},
        ]
        for question, answer in _QA
    ]


def matches_persona(text: str) -> bool:
    """True when an answer opens and closes in persona, once: the model also stopped in time."""
    text, closing = text.strip(), SUFFIX.strip()
    return text.startswith(PREFIX.strip()) and text.endswith(closing) and text.count(closing) == 1


def format_training_examples() -> list[list[dict[str, str]]]:
    """The json-answer chat dataset: each answer is one line of JSON, keys in FORMAT_KEYS order."""
    return [
        [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "content": json.dumps(
                    {"answer": answer, "sources": list(sources)}, ensure_ascii=False
                ),
            },
        ]
        for question, answer, sources in _FORMAT_QA
    ]


def matches_json_format(text: str) -> bool:
    """True when the stripped answer is a JSON object with exactly the keys "answer" and "sources".

    "answer" must be a non-blank string and "sources" a list of strings (possibly
    empty). A key given twice does not count as exactly these keys.
    """

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(pairs)

    try:
        obj = json.loads(text.strip(), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict) or set(obj) != set(FORMAT_KEYS):
        return False
    answer, sources = obj["answer"], obj["sources"]
    return (
        isinstance(answer, str)
        and bool(answer.strip())
        and isinstance(sources, list)
        and all(isinstance(source, str) for source in sources)
    )


def build_demo_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    steps: int = 35,
    seed: int = 0,
    progress: Callable[[str], object] = print,
) -> Path:
    """Train (or reuse) the pirate-tone LoRA adapter for the model in `base_dir`; return `out_dir`.

    CPU, float32, deterministic for a given `seed`. The loss covers only the
    assistant's tokens, including the closing `<|im_end|>`, so the adapted
    model also learns to stop. `progress` receives one-line status messages.
    """
    return _build_recipe(
        Path(base_dir), Path(out_dir), DEMO_ADAPTER_NAME, training_examples(), steps, seed, progress
    )


def build_format_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    steps: int = 36,
    seed: int = 0,
    progress: Callable[[str], object] = print,
) -> Path:
    """Train (or reuse) the json-answer LoRA adapter for the model in `base_dir`; return `out_dir`.

    Same recipe and caching as `build_demo_adapter`, on `format_training_examples()`.
    """
    return _build_recipe(
        Path(base_dir),
        Path(out_dir),
        FORMAT_ADAPTER_NAME,
        format_training_examples(),
        steps,
        seed,
        progress,
    )


def _build_recipe(base_dir, out_dir, name, conversations, steps, seed, progress) -> Path:
    """Both demo adapters' recipe; `params` is also the cache marker, so keep it stable."""
    params = {
        "format": _BUILD_FORMAT,
        "name": name,
        "base": _base_fingerprint(base_dir),
        "dataset": _dataset_hash(conversations),
        "steps": steps,
        "seed": seed,
        "rank": 8,
        "alpha": 16,
        "target_modules": list(_TARGET_MODULES),
        "layers": _upper_half(base_dir),
        "lr": 2e-3,
        "batch_size": 4,
        "base_model_name": DEMO_BASE_MODEL_NAME,
    }
    return _build(base_dir, out_dir, params, conversations, progress)


def generate_answers(
    base_dir: Path,
    adapter_dir: Path | None,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 60,
) -> list[str]:
    """Greedy chat answers from transformers (+ PEFT), prompted as the served chat path does."""
    from hybridserve.finetune.data import encode_chat
    from hybridserve.finetune.evaluate import greedy_answers
    from hybridserve.finetune.trainer import load_base

    tokenizer, model = load_base(base_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    ids = [
        encode_chat(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
        for p in prompts
    ]
    return greedy_answers(model, tokenizer, ids, max_new_tokens)


def held_out_match_rate(
    base_dir: Path,
    adapter_dir: Path | None,
    prompts: Sequence[str] = HELD_OUT_PROMPTS,
    *,
    matcher: Callable[[str], bool] = matches_persona,
    max_new_tokens: int = 60,
) -> float:
    """Share of `prompts` whose greedy answer satisfies `matcher` (0.0 to 1.0).

    The defaults check the pirate persona; for the json-answer adapter pass
    `FORMAT_HELD_OUT_PROMPTS`, `matcher=matches_json_format` and
    `max_new_tokens=FORMAT_MAX_NEW_TOKENS` (or use `demo_match_rates`).
    """
    answers = generate_answers(base_dir, adapter_dir, prompts, max_new_tokens=max_new_tokens)
    return sum(matcher(a) for a in answers) / len(answers) if answers else 0.0


@dataclass(frozen=True)
class DemoCheck:
    """How one demo adapter's effect is checked: held-out prompts, matcher, answer length."""

    prompts: tuple[str, ...]
    matcher: Callable[[str], bool]
    max_new_tokens: int


#: The check of each demo adapter, by its name.
DEMO_CHECKS: dict[str, DemoCheck] = {
    DEMO_ADAPTER_NAME: DemoCheck(HELD_OUT_PROMPTS, matches_persona, 60),
    FORMAT_ADAPTER_NAME: DemoCheck(
        FORMAT_HELD_OUT_PROMPTS, matches_json_format, FORMAT_MAX_NEW_TOKENS
    ),
}


def demo_match_rates(base_dir: Path, adapters: dict[str, Path]) -> dict[str, dict]:
    """Base model vs each demo adapter on that adapter's held-out prompts.

    `adapters` maps a demo adapter's name (a key of `DEMO_CHECKS`) to its folder.
    Returns, by name: `prompts` (how many), `matcher` (its function name),
    `base` and `adapter` (match rates, 0.0 to 1.0), and `samples`, one
    `{"prompt", "base", "adapter"}` dict of greedy answers per prompt.

    Raises:
        KeyError: a name that is not a demo adapter.
    """
    unknown = sorted(set(adapters) - set(DEMO_CHECKS))
    if unknown:
        raise KeyError(f"not demo adapters: {unknown}; known: {sorted(DEMO_CHECKS)}")
    report: dict[str, dict] = {}
    for name, adapter_dir in adapters.items():
        check = DEMO_CHECKS[name]
        base = generate_answers(base_dir, None, check.prompts, max_new_tokens=check.max_new_tokens)
        tuned = generate_answers(
            base_dir, Path(adapter_dir), check.prompts, max_new_tokens=check.max_new_tokens
        )
        report[name] = {
            "prompts": len(check.prompts),
            "matcher": check.matcher.__name__,
            "base": sum(map(check.matcher, base)) / len(base),
            "adapter": sum(map(check.matcher, tuned)) / len(tuned),
            "samples": [
                {"prompt": p, "base": b, "adapter": a}
                for p, b, a in zip(check.prompts, base, tuned, strict=True)
            ],
        }
    return report


# --------------------------------------------------------------------------- internals


def _build(
    base_dir: Path,
    out_dir: Path,
    params: dict,
    conversations: list[list[dict[str, str]]],
    progress: Callable[[str], object],
) -> Path:
    """Reuses `out_dir` if its marker matches `params`, else trains into it atomically."""
    if read_json(out_dir / _MARKER) == params:
        return out_dir

    name, steps = params["name"], params["steps"]
    with building(out_dir, _MARKER, params) as tmp:
        if tmp is not None:
            started = time.monotonic()
            progress(f"Training the {name!r} LoRA adapter ({steps} steps on CPU) ...")
            _train(base_dir, tmp, params, progress, conversations)
            progress(f"Trained {name!r} in {time.monotonic() - started:.1f}s.")
    return out_dir


def _train(
    base_dir: Path,
    out_dir: Path,
    params: dict,
    progress: Callable[[str], object],
    conversations: list[list[dict[str, str]]] | None = None,
) -> None:
    """Trains with `hybridserve.finetune`'s trainer on a whole built-in dataset.

    `conversations` defaults to the pirate-tone dataset (`training_examples()`).
    """
    from hybridserve.finetune import TrainConfig
    from hybridserve.finetune.data import Example, tokenize_example
    from hybridserve.finetune.trainer import StepInfo, load_tokenizer, train

    train_cfg = TrainConfig(
        steps=params["steps"],
        seed=params["seed"],
        rank=params["rank"],
        alpha=params["alpha"],
        target_modules=tuple(params["target_modules"]),
        layers_to_transform=tuple(params["layers"]),
        lr=params["lr"],
        batch_size=params["batch_size"],
    )
    tokenizer = load_tokenizer(base_dir)
    examples = [
        tokenize_example(tokenizer, Example(line, conversation))
        for line, conversation in enumerate(
            training_examples() if conversations is None else conversations, start=1
        )
    ]
    losses: list[float] = []  # since the last report, averaged to smooth batch noise

    def on_step(info: StepInfo) -> None:
        losses.append(info.loss)
        if info.step == 1 or info.step % 10 == 0 or info.step == info.steps:
            progress(f"  step {info.step}/{info.steps}  loss {sum(losses) / len(losses):.4f}")
            losses.clear()

    train(
        base_dir,
        examples,
        train_cfg,
        out_dir,
        base_model_name=params["base_model_name"],
        on_step=on_step,
    )


def _upper_half(base_dir: Path) -> list[int]:
    """Adapt only the upper half of the layers.

    On this model that is as effective as adapting all of them, keeps more of
    the base model's answers intact, and the backward pass stops halfway, so
    training is about 20% faster.
    """
    config = json.loads((base_dir / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    return list(range(layers // 2, layers))


def _dataset_hash(conversations: list[list[dict[str, str]]] | None = None) -> str:
    """Hash of a built-in dataset (default: the pirate one)."""
    if conversations is None:
        conversations = training_examples()
    blob = json.dumps(conversations, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _base_fingerprint(base_dir: Path) -> str:
    """Identity of the base folder: its prepare marker when present, else its config."""
    from hybridserve.models import MARKER_FILENAME

    for name in (MARKER_FILENAME, "config.json"):
        path = base_dir / name
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    raise FileNotFoundError(f"{base_dir} is not a model folder (no config.json).")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hybridserve.demo [--format] OUT_DIR`: build an adapter there, print its path.

    Without `--format` it builds the pirate-tone adapter, with it the json-answer one.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m hybridserve.demo [--format] OUT_DIR"
    if args in (["-h"], ["--help"]):
        print(usage + "\n\n  --format  build the json-answer adapter instead of pirate-tone")
        return 0
    json_format = "--format" in args
    if json_format:
        args.remove("--format")
    if len(args) != 1 or args[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    from hybridserve.constants import CACHE_DIR
    from hybridserve.models import prepare_default_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def progress(message: str) -> None:  # stdout carries only the resulting path
        print(message, file=sys.stderr, flush=True)

    base_dir = prepare_default_model(CACHE_DIR, progress=progress)
    build = build_format_adapter if json_format else build_demo_adapter
    print(build(base_dir, Path(args[0]), progress=progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
