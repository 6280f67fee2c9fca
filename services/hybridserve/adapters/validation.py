"""Adapter validation: is a folder in the store a LoRA adapter this server can serve?

Checks the folder's path (inside the store, clear of the registry), its files (regular
files, within the size limit, no symlink leaving the store) and its `adapter_config.json`
(LoRA, its rank and target modules within the engine's limits, trained on the served base
model, nothing vLLM refuses at load time). Every refusal is an InvalidArgument that says
what to change. Transport-free: raises `hybridserve.errors`.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from hybridserve.adapters.files import too_big
from hybridserve.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def resolve_source(path: str | Path, *, store_dir: Path, registry_dir: Path) -> Path:
    """Resolves `path` to a folder inside the store, following symlinks."""
    if not isinstance(path, (str, PurePath)) or not str(path):
        raise InvalidArgument("adapter path is empty: give the folder's path relative to the adapter store")
    raw = Path(path).expanduser()
    if ".." in raw.parts:
        raise InvalidArgument(
            f"adapter path {str(path)!r} contains '..'; give the folder's path relative to "
            f"the adapter store {store_dir} without '..'"
        )
    candidate = raw if raw.is_absolute() else store_dir / raw
    try:
        source = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise InvalidArgument(
            f"adapter path {str(path)!r} does not exist; copy the adapter folder into the "
            f"adapter store {store_dir} and register it by its path relative to the store"
        ) from None
    except (OSError, RuntimeError, ValueError) as exc:  # loops, permissions, NUL bytes
        raise InvalidArgument(f"adapter path {str(path)!r} cannot be resolved: {exc}") from exc
    if not source.is_relative_to(store_dir):
        raise InvalidArgument(
            f"adapter path {str(path)!r} resolves outside the adapter store {store_dir}; "
            "copy the adapter folder into the store and register it by its path relative "
            "to the store"
        )
    if source == store_dir:
        raise InvalidArgument(
            f"adapter path {str(path)!r} is the adapter store itself; put each adapter in "
            "its own folder inside the store"
        )
    if source.is_relative_to(registry_dir) or registry_dir.is_relative_to(source):
        raise InvalidArgument(
            f"adapter path {str(path)!r} overlaps the registry {registry_dir}; register "
            "the original folder from the adapter store, not a snapshot"
        )
    if not source.is_dir():
        raise InvalidArgument(
            f"adapter path {str(path)!r} is not a directory; give the adapter folder "
            f"(the one holding {CONFIG_FILE})"
        )
    return source


def scan_source(source: Path, *, store_dir: Path, max_size_bytes: int) -> dict[str, str]:
    """Lists the folder's files, checking their total size: relative POSIX path
    -> the path the copy opens, relative to the store (for a file symlink, the
    file it resolves to now).

    File symlinks are followed only if they stay in the store; directory
    symlinks and special files are refused, so the copy is finite and safe.
    """
    files: dict[str, str] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        here = Path(dirpath)
        for entry in sorted(dirnames + filenames):
            path = here / entry
            rel = path.relative_to(source).as_posix()
            opened = path
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise InvalidArgument(
                        f"adapter file {rel!r} is a broken symlink; replace it with the file"
                    ) from None
                if not target.is_relative_to(store_dir):
                    raise InvalidArgument(
                        f"adapter file {rel!r} is a symlink that resolves outside the adapter "
                        f"store {store_dir}; copy the file into the adapter folder instead"
                    )
                if target.is_dir():
                    raise InvalidArgument(
                        f"adapter entry {rel!r} is a symlink to a directory; replace it with "
                        "a real directory"
                    )
                opened = target
            st = path.stat()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(
                    f"adapter entry {rel!r} is not a regular file; remove it from the folder"
                )
            files[rel] = opened.relative_to(store_dir).as_posix()
            total += st.st_size
    if total > max_size_bytes:
        raise too_big(max_size_bytes, total)
    return files


def validate_config(
    folder: Path,
    source: Path,
    *,
    store_dir: Path,
    base_model_names: set[str],
    max_rank: int,
    supported_target_modules: frozenset[str],
) -> dict[str, Any]:
    """Checks adapter_config.json and the weights; returns rank, modules, base."""
    where = source.relative_to(store_dir).as_posix()
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidArgument(
            f"adapter folder {where!r} has no {CONFIG_FILE}; it must be a PEFT LoRA "
            "adapter folder as written by `model.save_pretrained(...)`"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{CONFIG_FILE} in {where!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{CONFIG_FILE} in {where!r} must be a JSON object")

    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise InvalidArgument(
            f"{CONFIG_FILE} in {where!r} has peft_type {peft_type!r}; only LoRA adapters "
            "(peft_type LORA) can be served"
        )

    rank = check_rank(config, where, max_rank)
    target_modules = check_target_modules(
        config.get("target_modules"), where, supported_target_modules
    )

    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InvalidArgument(
            f"{CONFIG_FILE} in {where!r} does not name its base model "
            f"(base_model_name_or_path); set it to the served model "
            f"{describe(base_model_names)}"
        )
    if not is_served_base(base, base_model_names):
        raise InvalidArgument(
            f"adapter {where!r} was trained for base model {base!r}, but this server serves "
            f"{describe(base_model_names)}; train it on the served base model"
        )

    # vLLM refuses these at load time; refusing them here gives the reason up front.
    if config.get("modules_to_save"):
        raise InvalidArgument(
            f"adapter {where!r} sets modules_to_save {config['modules_to_save']!r}; vLLM "
            "cannot serve adapters that replace whole modules — retrain without modules_to_save"
        )
    if config.get("use_dora"):
        raise InvalidArgument(
            f"adapter {where!r} is a DoRA adapter (use_dora: true); vLLM cannot serve DoRA "
            "— retrain with use_dora=False"
        )
    if config.get("bias", "none") not in (None, "none"):
        raise InvalidArgument(
            f"adapter {where!r} trains biases (bias: {config['bias']!r}); vLLM serves only "
            "bias='none' adapters — retrain with bias='none'"
        )

    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise InvalidArgument(
            f"adapter folder {where!r} has no weights: expected {' or '.join(WEIGHT_FILES)}"
        )
    return {"rank": rank, "target_modules": target_modules, "base_model": base}


def check_rank(config: dict[str, Any], where: str, max_rank: int) -> int:
    """Returns the largest rank, counting per-module overrides in `rank_pattern`."""
    ranks = {"r": config.get("r")}
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise InvalidArgument(f"{CONFIG_FILE} in {where!r}: rank_pattern must be an object")
    ranks.update({f"rank_pattern[{k!r}]": v for k, v in pattern.items()})
    for label, value in ranks.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(
                f"{CONFIG_FILE} in {where!r}: {label} must be an integer >= 1, got {value!r}"
            )
        if value > max_rank:
            raise InvalidArgument(
                f"adapter {where!r} has LoRA rank {label}={value}, above the engine's "
                f"max_lora_rank {max_rank}; retrain with r <= {max_rank} or raise "
                "engine.max_lora_rank"
            )
    return max(ranks.values())


def check_target_modules(
    value: Any, where: str, supported_target_modules: frozenset[str]
) -> tuple[str, ...]:
    """Returns the sorted target modules, refusing patterns and modules the engine cannot serve."""
    supported = ", ".join(sorted(supported_target_modules))
    if isinstance(value, str):
        # PEFT treats a string as a regex over module paths; the engine needs names.
        if value not in supported_target_modules:
            raise InvalidArgument(
                f"adapter {where!r} sets target_modules to the pattern {value!r}; list the "
                f"module names explicitly, from the supported ones: {supported}"
            )
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise InvalidArgument(
            f"{CONFIG_FILE} in {where!r}: target_modules must be a non-empty list of module "
            f"names, from the supported ones: {supported}"
        )
    unsupported = sorted(set(value) - supported_target_modules)
    if unsupported:
        raise InvalidArgument(
            f"adapter {where!r} targets unsupported modules {unsupported}; the engine "
            f"supports: {supported}"
        )
    return tuple(sorted(set(value)))


def is_served_base(candidate: str, base_model_names: set[str]) -> bool:
    """Exact name, same resolved path, or same last path component (any case)."""
    cand_path = Path(candidate).expanduser()
    for served in base_model_names:
        served_path = Path(served).expanduser()
        if candidate == served or (
            cand_path.name and cand_path.name.lower() == served_path.name.lower()
        ):
            return True
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            if cand_path.resolve() == served_path.resolve():
                return True
    return False


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The record's metadata as a plain dict; refuses anything but strings to strings."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidArgument("adapter metadata must map strings to strings")
    return dict(metadata)


def describe(names: set[str]) -> str:
    """The served base model's names, for a message."""
    return " or ".join(repr(n) for n in sorted(names)) or "(no base model configured)"
