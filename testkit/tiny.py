"""Tiny, deterministic Llama checkpoints and LoRA adapters for tests and benchmarks.

Everything is built locally in seconds on a CPU, with no download:

- `build_tiny_llama` trains a small byte-level BPE tokenizer on a built-in
  corpus and saves a randomly initialised `LlamaForCausalLM` next to it, in the
  layout vLLM and transformers both load (safetensors, config, tokenizer, chat
  template).
- `build_lora_adapter` saves a PEFT LoRA adapter for such a model whose A and B
  matrices are seeded random values, so each adapter visibly changes the output
  and two seeds give two different adapters.
- `hf_greedy` is the reference: greedy token ids from transformers (+ PEFT),
  tokenised and stopped exactly the way vLLM does for a plain string prompt.

Outputs are cached: calling a builder again with the same arguments returns the
existing folder at once.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from hybridserve.buildcache import building, read_json

_TINY_MARKER = ".hybridserve-tiny.json"
_ADAPTER_MARKER = ".hybridserve-tiny-adapter.json"
#: Bump when the builders change what they produce, so caches are rebuilt.
_BUILD_FORMAT = 1

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3, in this order

#: Role-tagged, Llama-style; vLLM's chat path tokenises the rendered text
#: without adding special tokens, so the template carries the BOS itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "A tenant uploads documents, and the service answers questions about them.",
    "Retrieval finds the passages; the model writes the answer.",
    "Every adapter changes the output of the base model a little.",
    "The weather today is sunny with a light breeze from the west.",
    "She opened the window and listened to the rain on the roof.",
    "Numbers like 1, 2, 3, 42 and 1000 appear in many documents.",
    "Please summarize the following paragraph in one sentence.",
    "The server returned an error, so the client tried again later.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "He bought bread, cheese, apples and a bottle of milk.",
    "The library opens at nine in the morning and closes at six.",
    "Machine learning models learn patterns from examples.",
    "Can you explain how a hash table works?",
    "The train to London leaves from platform four.",
    "Our team ships small changes often and measures everything.",
    "The cat slept on the warm windowsill all afternoon.",
    "Thank you for your help; I really appreciate it!",
)
_SUBJECTS = (
    "The model",
    "A user",
    "The tenant",
    "My friend",
    "The teacher",
    "Our service",
    "The robot",
    "A child",
)
_VERBS = ("reads", "writes", "finds", "answers", "likes", "explains", "remembers", "sends")
_OBJECTS = (
    "a short story",
    "the question",
    "every document",
    "a long letter",
    "the blue book",
    "some numbers",
    "the final answer",
    "an old song",
)
_TAILS = (
    "today.",
    "again.",
    "very quickly.",
    "with care.",
    "in the morning.",
    "before dinner.",
    "at night.",
    "!",
)


def corpus() -> list[str]:
    """The built-in English training corpus for the tiny tokenizer (deterministic)."""
    rng = random.Random(0)
    lines = list(_SENTENCES)
    for _ in range(600):
        lines.append(
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        )
    return lines


def build_tiny_llama(
    out_dir: Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position: int = 1024,
    head_dim: int = 32,
    initializer_range: float = 0.2,
) -> Path:
    """Build (or reuse) a tiny random Llama checkpoint with its own BPE tokenizer in `out_dir`.

    `head_dim` is set explicitly, independent of `hidden_size // heads`,
    because vLLM's CPU attention only supports head sizes of 32 and up. The
    large `initializer_range` keeps greedy decoding from collapsing onto a
    single repeated token. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    params = {
        "format": _BUILD_FORMAT,
        "seed": seed,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "intermediate": intermediate,
        "max_position": max_position,
        "head_dim": head_dim,
        "initializer_range": initializer_range,
    }
    if read_json(out_dir / _TINY_MARKER) == params:
        return out_dir

    with building(out_dir, _TINY_MARKER, params) as tmp:
        if tmp is not None:
            tokenizer = _build_tokenizer(vocab_size, max_position)
            tokenizer.save_pretrained(tmp)
            _save_random_llama(tmp, tokenizer, params)
    return out_dir


def build_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    base_model_name: str | None = None,
    scale: float = 0.5,
) -> Path:
    """Build (or reuse) a PEFT LoRA adapter for the model in `base_dir`, saved to `out_dir`.

    Every `lora_B` is drawn uniformly from [-scale, scale] and every `lora_A`
    uniformly from its usual Kaiming range, both from a generator seeded with
    `seed`, so the adapter always changes the output and is reproducible.
    `adapter_config.json` names `base_model_name` (default: `str(base_dir)`) as
    its base. Returns `out_dir`.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base_marker = read_json(base_dir / _TINY_MARKER)
    params = {
        "format": _BUILD_FORMAT,
        "base": _fingerprint(base_dir, base_marker),
        "seed": seed,
        "rank": rank,
        "alpha": alpha,
        "target_modules": list(target_modules),
        "base_model_name": base_model_name or str(base_dir),
        "scale": scale,
    }
    if read_json(out_dir / _ADAPTER_MARKER) == params:
        return out_dir

    with building(out_dir, _ADAPTER_MARKER, params) as tmp:
        if tmp is not None:
            _save_random_lora(base_dir, tmp, params)
    return out_dir


def hf_greedy(
    base_dir: Path,
    prompts: list[str],
    max_tokens: int,
    adapter_dir: Path | None = None,
) -> list[list[int]]:
    """Reference greedy generation with transformers (+ PEFT), in float32.

    Matches vLLM's `LLM.generate(prompt_str, SamplingParams(temperature=0,
    max_tokens=max_tokens))`: each prompt is tokenised with the tokenizer's
    defaults (`add_special_tokens=True`, as vLLM does), run alone (no padding),
    and only the new token ids are returned, ending with the EOS id when
    generation stopped on it (vLLM's `token_ids` include it too).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, local_files_only=True
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
    )
    results: list[list[int]] = []
    with torch.inference_mode():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt")  # add_special_tokens=True, like vLLM
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                generation_config=config,
            )
            new = out[0, enc["input_ids"].shape[1] :].tolist()
            if eos in new:  # generate() stops there; be explicit about it anyway
                new = new[: new.index(eos) + 1]
            results.append(new)
    return results


# --------------------------------------------------------------------------- internals


def _build_tokenizer(vocab_size: int, max_position: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS)
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    # Fill up to exactly `vocab_size`, so every id the model can emit decodes.
    missing = vocab_size - backend.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small for the byte-level alphabet.")
    if missing:
        backend.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_position,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_random_llama(out_dir: Path, tokenizer, params: dict) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate"],
        num_hidden_layers=params["num_layers"],
        num_attention_heads=params["heads"],
        num_key_value_heads=params["kv_heads"],
        head_dim=params["head_dim"],
        max_position_embeddings=params["max_position"],
        initializer_range=params["initializer_range"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params["seed"])
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved["architectures"] = ["LlamaForCausalLM"]
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _save_random_lora(base_dir: Path, out_dir: Path, params: dict) -> None:
    import math

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, local_files_only=True
    )
    lora_config = LoraConfig(
        r=params["rank"],
        lora_alpha=params["alpha"],
        target_modules=list(params["target_modules"]),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora_config)
    generator = torch.Generator().manual_seed(params["seed"])
    scale = float(params["scale"])
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
            elif "lora_B" in name:
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub

    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = params["base_model_name"]
    if isinstance(adapter_config.get("target_modules"), list):  # PEFT stores a set: unordered
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def _fingerprint(base_dir: Path, marker: dict | None) -> str:
    """Identity of a base model folder: its tiny-build params, else its config and weights' size."""
    if marker is not None:
        return hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = base_dir / name
        if path.is_file():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


