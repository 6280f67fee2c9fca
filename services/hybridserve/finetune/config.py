"""The typed training config of `hybridserve finetune`. Every field documents itself."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybridserve.errors import InvalidArgument

#: Attention projections of Llama-style models: what vLLM serves for every such model.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Epochs trained when neither `steps` nor `epochs` is set.
DEFAULT_EPOCHS = 3


class TrainConfig(BaseModel):
    """How to train and evaluate one LoRA adapter. Defaults suit SmolLM2-135M on CPU."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)

    rank: int = Field(8, ge=1, description="LoRA rank `r`; must be <= engine.max_lora_rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input while training.")
    target_modules: tuple[str, ...] = Field(
        DEFAULT_TARGET_MODULES,
        min_length=1,
        description="Module names the LoRA adapts; each must be one the engine serves "
        "(adapters.supported_target_modules).",
    )
    layers_to_transform: tuple[int, ...] | None = Field(
        None,
        description="Indices of the decoder layers to adapt. Unset: all layers. Adapting only "
        "the upper layers trains faster (the backward pass stops there).",
    )
    lr: float = Field(
        2e-3,
        ge=0,
        description="Peak learning rate of AdamW (no weight decay). It decays linearly to "
        "`min_lr_ratio` of the peak by the last step.",
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Learning rate at the last step, as a share of `lr`."
    )
    steps: int | None = Field(
        None,
        ge=0,
        description="Optimizer steps. Set this or `epochs`, not both. 0 trains nothing "
        "(the adapter equals the base model).",
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description=f"Passes over the training split; steps = ceil(epochs * examples / "
        f"batch_size). Set this or `steps`, not both. Neither: {DEFAULT_EPOCHS} epochs.",
    )
    batch_size: int = Field(4, ge=1, description="Examples per optimizer step.")
    max_seq_len: int = Field(
        512,
        ge=8,
        description="Longest example accepted, in tokens of the rendered chat; longer "
        "examples are refused (never truncated) with their line number.",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seeds the LoRA init, the shuffling and dropout: the same seed, data, base "
        "model and software give the same adapter bytes on CPU.",
    )
    held_out_fraction: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Share of examples held out for evaluation, chosen by a hash of each "
        "example's content (so the split is stable); at least one is held out.",
    )
    eval_max_examples: int = Field(
        64, ge=1, description="Held-out examples evaluated at most (loss and task metric)."
    )
    eval_max_new_tokens: int = Field(
        64, ge=1, description="Tokens generated at most per held-out prompt for the task metric."
    )
    format_regex: str | None = Field(
        None,
        description="Task metric: the share of greedy held-out answers whose stripped text "
        "fully matches this Python regex. Unset: the exact-match rate against the "
        "reference answers.",
    )

    @field_validator("target_modules", mode="after")
    @classmethod
    def _sorted_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not all(isinstance(m, str) and m for m in value):
            raise ValueError("target_modules must be non-empty module names")
        return tuple(sorted(set(value)))

    @field_validator("layers_to_transform", mode="after")
    @classmethod
    def _layers(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value or any(i < 0 for i in value):
            raise ValueError("layers_to_transform must list layer indices >= 0 (or be unset)")
        return tuple(sorted(set(value)))

    @field_validator("format_regex", mode="after")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(
                    f"format_regex {value!r} is not a valid Python regex: {exc}"
                ) from None
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set steps or epochs, not both")
        return self

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """Builds a config from keyword options, skipping None; raises InvalidArgument."""
        try:
            return cls(**{k: v for k, v in options.items() if v is not None})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidArgument(f"invalid training config: {problems}") from None

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps for a training split of `n_train` examples."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS
        return max(1, math.ceil(epochs * n_train / self.batch_size))
