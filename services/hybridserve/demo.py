"""A small trained LoRA adapter whose effect anyone can see: the "pirate-tone" demo.

Random adapters either leave SmolLM2-135M-Instruct's answers unchanged or turn
them into gibberish, which makes a poor demo. This module fine-tunes a real
LoRA adapter on CPU in under a minute with `hybridserve.finetune`'s trainer
(the one `hybridserve finetune` uses), from a tiny built-in chat dataset in
which every answer starts with "Arr, matey! " and ends with " Fair winds!".
The effect is obvious at a glance and easy to check automatically
(`held_out_match_rate`), on prompts the adapter never saw.

The result is cached: a marker written last records the dataset hash and the
training parameters, so building again with the same inputs returns at once.

Run `python -m hybridserve.demo OUT_DIR` to build it into OUT_DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
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
    ("What's a good name for a cat?", 'Whiskers is a fine name for a cat.'),
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
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    params = {
        "format": _BUILD_FORMAT,
        "name": DEMO_ADAPTER_NAME,
        "base": _base_fingerprint(base_dir),
        "dataset": _dataset_hash(),
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
    if read_json(out_dir / _MARKER) == params:
        return out_dir

    with building(out_dir, _MARKER, params) as tmp:
        if tmp is not None:
            started = time.monotonic()
            progress(f"Training the {DEMO_ADAPTER_NAME!r} LoRA adapter ({steps} steps on CPU) ...")
            _train(base_dir, tmp, params, progress)
            progress(f"Trained {DEMO_ADAPTER_NAME!r} in {time.monotonic() - started:.1f}s.")
    return out_dir


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
) -> float:
    """Share of `prompts` whose greedy answer shows the persona (0.0 to 1.0)."""
    answers = generate_answers(base_dir, adapter_dir, prompts)
    return sum(matches_persona(a) for a in answers) / len(answers) if answers else 0.0


# --------------------------------------------------------------------------- internals


def _train(base_dir: Path, out_dir: Path, params: dict, progress: Callable[[str], object]) -> None:
    """Trains with `hybridserve.finetune`'s trainer on the whole built-in dataset."""
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
        for line, conversation in enumerate(training_examples(), start=1)
    ]
    losses: list[float] = []  # since the last report, averaged to smooth batch noise

    def on_step(info: StepInfo) -> None:
        losses.append(info.loss)
        if info.step == 1 or info.step % 10 == 0 or info.step == info.steps:
            progress(f"  step {info.step}/{info.steps}  loss {sum(losses) / len(losses):.4f}")
            losses.clear()

    train(
        base_dir, examples, train_cfg, out_dir,
        base_model_name=params["base_model_name"], on_step=on_step,
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


def _dataset_hash() -> str:
    blob = json.dumps(training_examples(), sort_keys=True).encode()
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
    """`python -m hybridserve.demo OUT_DIR`: build the adapter there and print its path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m hybridserve.demo OUT_DIR", file=sys.stderr)
        return 2
    from hybridserve.constants import CACHE_DIR
    from hybridserve.models import prepare_default_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def progress(message: str) -> None:  # stdout carries only the resulting path
        print(message, file=sys.stderr, flush=True)

    base_dir = prepare_default_model(CACHE_DIR, progress=progress)
    print(build_demo_adapter(base_dir, Path(args[0]), progress=progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
