"""Train a PEFT LoRA adapter on tokenised chats, on CPU, deterministically.

The loss is the next-token cross-entropy on assistant tokens only (see
`data.tokenize_example` for exactly which). With the same seed, examples, base
model, software versions and torch thread count, two runs write the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridserve.finetune.config import TrainConfig
from hybridserve.finetune.data import IGNORE, TokenizedExample


@dataclass(frozen=True)
class StepInfo:
    """One finished optimizer step, as reported to `train(on_step=...)`."""

    step: int
    steps: int
    loss: float
    #: Non-padding tokens in this step's batch (prompt and answer).
    tokens: int
    #: Seconds since training started (after loading), at the end of this step.
    elapsed: float


StepCallback = Callable[[StepInfo], object]


@dataclass(frozen=True)
class TrainStats:
    """What a training run did. `tokens` counts every non-padding token processed."""

    steps: int
    train_examples: int
    tokens: int
    label_tokens: int
    seconds: float
    #: Mean loss over the last (up to) 10 steps; None when no step ran.
    final_loss: float | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "train_examples": self.train_examples,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "final_loss": None if self.final_loss is None else round(self.final_loss, 6),
        }


def train(
    base_dir: Path,
    examples: list[TokenizedExample],
    train_cfg: TrainConfig,
    out_dir: Path,
    *,
    base_model_name: str,
    on_step: StepCallback | None = None,
    progress_bar: bool = False,
) -> TrainStats:
    """Trains a LoRA adapter for the model in `base_dir` and saves it into `out_dir`.

    Args:
        base_dir: Hugging Face model folder; loaded in float32.
        examples: the training split, tokenised.
        train_cfg: hyper-parameters; steps come from `train_cfg.total_steps`.
        out_dir: an existing, empty folder; receives adapter_config.json and
            adapter_model.safetensors (nothing else).
        base_model_name: written as `base_model_name_or_path`: the served name
            the registry checks the adapter against.
        on_step: called after each step with its StepInfo (step, loss, tokens, time).
        progress_bar: show a tqdm bar with the running loss on stderr.

    Returns:
        TrainStats, with tokens processed per second.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    if not examples:
        raise ValueError("no training examples")
    steps, batch_size = train_cfg.total_steps(len(examples)), train_cfg.batch_size
    tokens = label_tokens = 0
    recent: list[float] = []
    # NOTE: order-sensitive for determinism: seed, load, wrap (LoRA A draws from the
    # global generator), then the shuffling generator. The demo adapters rely on it
    # (scripts/demo.sh: same inputs, same bytes).
    with _ctrl_c_latch() as interrupted, torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        tokenizer, base = load_base(base_dir)
        model = get_peft_model(
            base,
            LoraConfig(
                r=train_cfg.rank,
                lora_alpha=train_cfg.alpha,
                target_modules=list(train_cfg.target_modules),
                layers_to_transform=(
                    list(train_cfg.layers_to_transform) if train_cfg.layers_to_transform else None
                ),
                lora_dropout=train_cfg.dropout,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(train_cfg.seed)
        pad_id = pad_token_id(tokenizer)
        order: list[int] = []
        model.train()
        started = time.monotonic()
        with tqdm(
            total=steps,
            desc="training",
            unit="step",
            disable=not progress_bar,
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar:
            for step in range(1, steps + 1):
                if interrupted():
                    raise KeyboardInterrupt
                if len(order) < batch_size:  # a fresh shuffled epoch
                    order += torch.randperm(len(examples), generator=generator).tolist()
                batch = [examples[i] for i in order[:batch_size]]
                del order[:batch_size]
                input_ids, labels, mask = collate(batch, pad_id)
                # Linear decay to min_lr_ratio of the peak: big early moves, a stable finish.
                lr = train_cfg.lr * (
                    1.0 - (1.0 - train_cfg.min_lr_ratio) * (step - 1) / max(steps - 1, 1)
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = answer_loss(model.get_base_model(), input_ids, labels, mask)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = loss.item()
                batch_tokens = int(mask.sum())
                tokens += batch_tokens
                label_tokens += int((labels[:, 1:] != IGNORE).sum())
                recent = (recent + [value])[-10:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
                bar.update(1)
                if on_step is not None:
                    on_step(StepInfo(step, steps, value, batch_tokens, time.monotonic() - started))
        seconds = time.monotonic() - started

    save_adapter(model, out_dir, base_model_name)
    return TrainStats(
        steps=steps,
        train_examples=len(examples),
        tokens=tokens,
        label_tokens=label_tokens,
        seconds=seconds,
        final_loss=sum(recent) / len(recent) if recent else None,
    )


@contextlib.contextmanager
def _ctrl_c_latch():
    """Yields a callable that says whether Ctrl-C was pressed while training.

    Python drops a KeyboardInterrupt that lands in a finalizer (a `__del__` run by
    the garbage collector: "Exception ignored in ..."), so one Ctrl-C while the model
    loads could be lost and the run go on. The handler raises as Python's own does
    and also latches, and the loop raises again at its next step. Only in the main
    thread, and only over Python's default handler (an application's own is kept).
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield lambda: False
        return
    pressed: list[int] = []

    def on_sigint(signum, frame):
        pressed.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def save_adapter(model, out_dir: Path, base_model_name: str) -> None:
    """Writes the PEFT folder with stable bytes: sorted JSON, no model card."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_name
    if isinstance(config.get("target_modules"), list):  # PEFT stores a set: unordered
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def answer_loss(model, input_ids, labels, mask, *, reduction: str = "mean"):
    """Next-token cross-entropy on labelled (assistant) positions only.

    Same value as the model's own loss, but for plain decoder + LM-head models
    the LM head (49k wide on SmolLM2) runs only where there is a label, which
    makes a training step noticeably cheaper on CPU. `model` is the transformers
    model (for PEFT: `peft_model.get_base_model()`, LoRA layers included).
    """
    import torch

    targets = labels[:, 1:]
    keep = targets != IGNORE
    decoder, head = _split_head(model)
    if decoder is not None:
        hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:  # models that post-process their logits: take them as the model gives them
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][keep]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction=reduction)


def _split_head(model):
    """(decoder, lm_head) when logits are just lm_head(hidden states), else (None, None)."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None or getattr(
        config, "logit_scale", None
    ) not in (None, 1, 1.0):
        return None, None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = model.get_output_embeddings() if decoder is not None else None
    if decoder is None or head is None or decoder is model:
        return None, None
    return decoder, head


def collate(batch: list[TokenizedExample], pad_id: int):
    """Right-padded (input_ids, labels, attention_mask) tensors."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
        mask[row, : len(ex.input_ids)] = 1
    return input_ids, labels, mask


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)


def load_base(base_dir: Path):
    """(tokenizer, model) from a local folder, the model in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, local_files_only=True
    )
    return tokenizer, model


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the pad token, else EOS (always masked out)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
