"""`finetune`: data -> LoRA adapter -> held-out evaluation -> immutable registry version.

Works on the files of the adapter store and registry directly (no running
platform needed); a running platform sees the new adapter at once, since the
registry is shared through those files.

Layout in the adapter store:

    <store>/.finetune-tmp-<random>/   while training and evaluating; always removed
    <store>/<name>-<hash12>/          the trained adapter, kept as the registered source

NOTE: nothing is visible in the store or registry until the adapter has been
evaluated and accepted. An interrupt (Ctrl-C) or error before then leaves
nothing behind; after that, the registry's own publish is atomic, and the
`<name>-<hash12>` folder is removed again if registering fails.

`train_to_folder` (`hybridserve finetune --output DIR`) is the other way out:
it trains on every example and saves the adapter into a folder of the caller's
choice, with no evaluation and no registering, and reuses that folder when its
marker records the same inputs. scripts/demo.sh builds its adapters this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hybridserve.adapters import AdapterRecord, AdapterRegistry, content_sha256
from hybridserve.buildcache import building, read_json
from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition, HybridServeError, InvalidArgument
from hybridserve.finetune import data as data_mod
# NOTE: train and evaluate are called through their modules, so a test can replace them.
from hybridserve.finetune import evaluate as evaluate_mod
from hybridserve.finetune import raft as raft_mod
from hybridserve.finetune import trainer as trainer_mod
from hybridserve.finetune.config import TrainConfig
from hybridserve.finetune.evaluate import EvalResult
from hybridserve.finetune.trainer import TrainStats, load_tokenizer
from hybridserve.models import MARKER_FILENAME, model_dir_for, prepare_default_model
from hybridserve.rag.prompt import PromptBuilder
from hybridserve.scoring import Question, QuestionFileError, load_questions

#: Prefix of the temporary training folders inside the adapter store.
TMP_PREFIX = ".finetune-tmp-"
_NAME_RULE = "[a-z0-9][a-z0-9._-]{0,50}"  # the registry's rule, leaving room for "-<hash12>"
_HASH_LEN = 12
#: Written last into a `train_to_folder` output: the inputs it was trained from.
OUTPUT_MARKER = ".hybridserve-finetune.json"
#: Bump when training changes in a way the recorded inputs do not capture.
_OUTPUT_FORMAT = 1


class AdapterNotBetter(FailedPrecondition):
    """The adapter beat the base model on neither held-out loss nor the task metric."""

    def __init__(self, message: str, eval_result: EvalResult, train_stats: TrainStats):
        super().__init__(message)
        self.eval = eval_result
        self.train = train_stats


@dataclass(frozen=True)
class FinetuneResult:
    """A registered fine-tuned adapter and how it was made."""

    record: AdapterRecord
    #: False when the identical adapter was already registered under this name.
    created: bool
    #: The adapter's folder in the store (`<store>/<name>-<hash12>`).
    adapter_dir: Path
    eval: EvalResult
    train: TrainStats
    train_examples: int
    held_out_examples: int
    #: Registered with force although it did not beat the base model.
    forced: bool


@dataclass(frozen=True)
class TrainedFolder:
    """An adapter trained into a folder by `train_to_folder`."""

    #: The folder holding adapter_config.json, the weights and OUTPUT_MARKER.
    path: Path
    #: True when the folder already held this build and nothing was trained.
    reused: bool
    #: How training went; None when reused.
    train: TrainStats | None


def finetune(
    cfg: HybridServeConfig,
    data_path: str | Path,
    name: str,
    train_cfg: TrainConfig | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], object] = print,
    progress_bar: bool = False,
) -> FinetuneResult:
    """Trains a LoRA adapter on `data_path`, evaluates it, and registers it as `name@<hash12>`.

    The base model is `cfg.model.path`, or the default model (prepared offline
    if needed). The version is the first 12 hex digits of the adapter's content
    hash, so the same data, config and seed give the same id. The record's
    metadata holds JSON strings: `training_config`, `eval`, `training`, and the
    `dataset_sha256` of the data file.

    Args:
        cfg: platform config (adapter store, registry, base model, engine limits).
        data_path: JSONL file, see `hybridserve.finetune.data`.
        name: adapter name, `[a-z0-9][a-z0-9._-]{0,50}`.
        train_cfg: hyper-parameters; default `TrainConfig()`.
        force: register even if the adapter does not beat the base model.
        progress: receives one-line status messages.
        progress_bar: show a tqdm bar with the loss while training.

    Raises:
        InvalidArgument: bad name, data (each problem names its line) or config.
        AdapterNotBetter (a FailedPrecondition): neither held-out loss nor task
            metric improved and `force` is False; nothing is registered.
    """
    train_cfg = train_cfg or TrainConfig()
    _check_request(cfg, name, train_cfg)
    dataset = data_mod.load_examples(data_path)
    base_dir = _base_model_dir(cfg, progress)

    tokenizer = trainer_mod.load_tokenizer(base_dir)
    tokenized = data_mod.tokenize_examples(
        tokenizer, dataset.examples, max_seq_len=train_cfg.max_seq_len, source=dataset.path
    )
    by_line = {ex.line: ex for ex in tokenized}
    train_split, held_split = data_mod.split_examples(dataset.examples, train_cfg.held_out_fraction)
    train_set = [by_line[ex.line] for ex in train_split]
    held_set = [by_line[ex.line] for ex in held_split]
    steps = train_cfg.total_steps(len(train_set))
    progress(
        f"{len(dataset.examples)} examples in {dataset.path}: {len(train_set)} to train on, "
        f"{len(held_set)} held out; base model {base_dir}"
    )

    return _train_evaluate_register(
        cfg, base_dir, name, train_cfg, train_set, steps,
        evaluate=lambda staged: evaluate_mod.evaluate(base_dir, staged, held_set, train_cfg),
        metadata={"dataset_sha256": dataset.sha256}, held_out=len(held_set), force=force,
        progress=progress, progress_bar=progress_bar,
    )


def _train_evaluate_register(
    cfg: HybridServeConfig,
    base_dir: Path,
    name: str,
    train_cfg: TrainConfig,
    train_set: list,
    steps: int,
    *,
    evaluate: Callable[[Path], EvalResult],
    metadata: dict[str, str],
    held_out: int,
    force: bool,
    progress: Callable[[str], object],
    progress_bar: bool,
) -> FinetuneResult:
    """Trains into a temporary folder of the store, evaluates, and registers if accepted."""
    registry = AdapterRegistry.from_config(cfg, base_dir)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=registry.store_dir))
    try:
        staged = tmp / "adapter"
        staged.mkdir()
        progress(f"Training a rank-{train_cfg.rank} LoRA adapter for {steps} steps ...")
        stats = trainer_mod.train(
            base_dir,
            train_set,
            train_cfg,
            staged,
            base_model_name=cfg.model.name,
            progress_bar=progress_bar,
        )
        progress(
            f"Trained in {stats.seconds:.1f}s ({stats.tokens_per_second:.0f} tokens/s). "
            f"Evaluating on {min(held_out, train_cfg.eval_max_examples)} held-out examples ..."
        )
        result = evaluate(staged)
        if not result.beats_base and not force:
            raise AdapterNotBetter(
                f"the adapter does not beat the base model on the held-out split: held-out loss "
                f"{result.adapter_loss:.4f} (base {result.base_loss:.4f}), "
                f"{result.metric.replace('_', ' ')} rate {result.adapter_metric:.3f} "
                f"(base {result.base_metric:.3f})"
                + (" (accepted on the rate alone)" if result.require_metric else "")
                + "; nothing was registered. Train longer, with "
                "a higher learning rate or more data, or pass --force to register it anyway",
                result,
                stats,
            )

        files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
        digest = content_sha256(staged, files)
        final = registry.store_dir / f"{name}-{digest[:_HASH_LEN]}"
        metadata = {
            "training_config": json.dumps(
                {**train_cfg.model_dump(mode="json"), "total_steps": steps}, sort_keys=True
            ),
            "eval": json.dumps(
                {
                    **result.to_dict(),
                    "beats_base": result.beats_base,
                    "train_examples": len(train_set),
                    "held_out_examples": held_out,
                },
                sort_keys=True,
            ),
            "training": json.dumps(stats.to_dict(), sort_keys=True),
            **metadata,
            "forced": json.dumps(not result.beats_base),
        }
        reused = _same_adapter(final, files, digest)  # from an earlier identical run
        try:
            if not reused:
                _place(staged, final, files)
            record, created = registry.register(
                name, final, version=digest[:_HASH_LEN], metadata=metadata
            )
        except BaseException:
            # Interrupted or refused: keep the folder only if the registry published it anyway
            # (an interrupt after the record was written), so the store matches the registry.
            if not reused and not _registered(registry, f"{name}@{digest[:_HASH_LEN]}", digest):
                shutil.rmtree(final, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    progress(f"Registered {record.id}" + ("" if created else " (already registered, same content)"))
    return FinetuneResult(
        record=record,
        created=created,
        adapter_dir=final,
        eval=result,
        train=stats,
        train_examples=len(train_set),
        held_out_examples=held_out,
        forced=not result.beats_base,
    )


@dataclass(frozen=True)
class RagFinetuneResult:
    """A registered retrieval-aware adapter, how its data was built, and the split."""

    #: The adapter as registered (a reused one too).
    record: AdapterRecord
    #: How it was trained now; None when an earlier identical recipe was reused.
    result: FinetuneResult | None
    build: raft_mod.BuildReport | None
    #: The held-out questions and documents (never trained on, as gold or distractor).
    held_out: list[Question]
    held_out_docs: list[str]


def finetune_rag(
    cfg: HybridServeConfig,
    questions_path: str | Path,
    name: str,
    source: raft_mod.PromptSource,
    train_cfg: TrainConfig | None = None,
    *,
    tenant: str = "",
    system_prompt: str = "",
    p_gold: float = 0.8,
    max_tokens: int = 96,
    force: bool = False,
    held_out_path: str | Path | None = None,
    reuse: bool = False,
    progress: Callable[[str], object] = print,
    progress_bar: bool = False,
) -> RagFinetuneResult:
    """Retrieval-aware fine-tuning (`hybridserve finetune --rag`): RAFT chats built from the
    tenant's own retrieval and Ask's own prompts (`hybridserve.finetune.raft`), trained,
    evaluated on held-out questions in the arm the adapter serves in (answers from the
    prompts Ask builds; accepted when its containment beats the base model's), and
    registered as `name@<hash12>`.

    Args:
        cfg: the served platform's config (model, rag.instructions, rag.no_context_message).
        questions_path: the question file (`hybridserve.scoring.load_questions`).
        source: the tenant's served retrieval (Ask with prompt_only).
        tenant: the tenant's id (part of the recipe `reuse` compares).
        system_prompt: the tenant's system prompt, as Ask puts it in the prompt.
        p_gold: share of answerable training questions whose gold passage is shown.
        max_tokens: the answer budget the prompts are built for (Ask's max_tokens).
        held_out_path: if set, the held-out questions are written there (JSONL, the
            question file's format) for `hybridserve eval`.
        reuse: return the adapter of this name already registered from the same
            recipe (tenant, question file, options, system prompt, the rag, retrieval
            and rerank settings of `cfg`, base model), without asking or training
            anything; one registered with force only when `force` is given. The tenant's
            documents are not part of the recipe: after changing them, do not reuse.

    `train_cfg.held_out_fraction` is the share of gold *documents* held out;
    `max_seq_len` plays no part (a prompt is bounded by the context window).
    """
    train_cfg = train_cfg or TrainConfig()
    _check_request(cfg, name, train_cfg)
    if not 0 <= p_gold <= 1:
        raise InvalidArgument(f"p_gold must be between 0 and 1, got {p_gold}")
    try:
        questions = load_questions(questions_path)
    except QuestionFileError as exc:
        raise InvalidArgument(str(exc)) from None
    base_dir = _base_model_dir(cfg, progress)
    train_q, held_q, held_docs = raft_mod.split_by_document(
        questions.questions, train_cfg.held_out_fraction, train_cfg.seed)
    progress(
        f"{len(questions.questions)} questions in {questions.path}: {len(train_q)} to train on, "
        f"{len(held_q)} held out with their {len(held_docs)} documents; base model {base_dir}"
    )
    def write_held_out() -> None:  # last: an interrupted or refused run writes nothing
        if held_out_path is not None:
            _write_questions(Path(held_out_path), held_q)
            progress(f"held-out questions written to {held_out_path} (for `hybridserve eval`)")

    refusal = cfg.rag.no_context_message
    recipe = hashlib.sha256(json.dumps({
        "format": _OUTPUT_FORMAT, "tenant": tenant, "questions": questions.sha256,
        "p_gold": p_gold, "served": {k: getattr(cfg, k).model_dump(mode="json")
                                     for k in ("rag", "retrieval", "rerank")},
        "max_tokens": max_tokens, "system_prompt": system_prompt,
        "instructions": cfg.rag.instructions, "refusal": refusal,
        "max_model_len": cfg.model.max_model_len, "base_model": _base_fingerprint(base_dir),
        "training_config": train_cfg.model_dump(mode="json"),
    }, sort_keys=True).encode()).hexdigest()
    if reuse:
        registry = AdapterRegistry.from_config(cfg, base_dir)
        same = [r for r in registry.list() if r.name == name and r.metadata.get("recipe") == recipe
                and (force or r.metadata.get("forced") != "true")]
        if same:
            progress(f"{same[-1].id} was trained from the same recipe; reusing it (--reuse)")
            write_held_out()
            return RagFinetuneResult(same[-1], None, None, held_q, held_docs)
    builder = PromptBuilder.for_model(base_dir, cfg)
    common = dict(system_prompt=system_prompt, refusal=refusal, max_tokens=max_tokens,
                  p_gold=p_gold, seed=train_cfg.seed)
    with tqdm(total=len(train_q) + 2 * len(held_q), desc="passages", unit="question",
              disable=not progress_bar, file=sys.stderr) as bar:
        tick = lambda done, total: bar.update(1)  # noqa: E731
        examples, report = raft_mod.build_examples(
            train_q, source, builder, exclude_docs=held_docs, progress=tick, **common)
        held_examples, _ = raft_mod.build_examples(held_q, source, builder, progress=tick, **common)
        held_prompts = []
        for q in held_q:  # the arm it serves in: Ask's own prompt, Ask's order
            asked = source.prompt(q.question)
            raft_mod.check_same_prompt(q, asked, builder, system_prompt, max_tokens)
            held_prompts.append((q, list(asked.token_ids)))
            bar.update(1)
    if not examples:
        raise FailedPrecondition(
            "no training example could be built: " + "; ".join(
                f"{qid}: {why}" for qid, why in list(report.skipped.items())[:5]))
    progress(
        f"{report.examples} training chats ({report.gold} with the gold passage, {report.no_gold} "
        f"with it removed, {report.unanswerable} unanswerable); {len(report.skipped)} questions "
        "skipped" + "".join(f"\n  {qid}: {why}" for qid, why in list(report.skipped.items())[:10])
    )
    tokenizer = trainer_mod.load_tokenizer(base_dir)
    train_set = [raft_mod.tokenize(ex, tokenizer) for ex in examples]
    held_set = [raft_mod.tokenize(ex, tokenizer) for ex in held_examples]
    steps = train_cfg.total_steps(len(train_set))
    raft_meta = {
        "p_gold": p_gold, "max_tokens": max_tokens, "held_out_docs": held_docs,
        "examples": {"gold": report.gold, "no_gold": report.no_gold,
                     "unanswerable": report.unanswerable, "skipped": len(report.skipped)},
    }
    result = _train_evaluate_register(
        cfg, base_dir, name, train_cfg, train_set, steps,
        evaluate=lambda staged: evaluate_mod.evaluate_rag(
            base_dir, staged, held_prompts, held_set, train_cfg, refusal=refusal,
            max_new_tokens=max_tokens),
        metadata={"dataset_sha256": questions.sha256, "recipe": recipe,
                  "raft": json.dumps(raft_meta, sort_keys=True)},
        held_out=len(held_q), force=force, progress=progress, progress_bar=progress_bar,
    )
    write_held_out()
    return RagFinetuneResult(result.record, result, report, held_q, held_docs)


def _write_questions(path: Path, questions: list[Question]) -> None:
    """Writes `questions` as a question file, atomically."""
    lines = [json.dumps({"id": q.id, "question": q.question, "answers": list(q.answers),
                         "gold_docs": list(q.gold_docs)}, ensure_ascii=False) for q in questions]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_to_folder(
    cfg: HybridServeConfig,
    data_path: str | Path,
    name: str,
    out_dir: str | Path,
    train_cfg: TrainConfig | None = None,
    *,
    progress: Callable[[str], object] = print,
    progress_bar: bool = False,
) -> TrainedFolder:
    """Trains a LoRA adapter on every example of `data_path` and saves it into `out_dir`.

    Unlike `finetune`, nothing is held out, evaluated or registered: register
    the folder later (`hybridserve adapters register`), from inside the adapter
    store. The base model is the one `finetune` uses.

    The result is cached: `out_dir` is reused as is, without loading the model,
    when its OUTPUT_MARKER records the same inputs (the adapter name, the data
    file's sha256, the base model's identity and served name, and the whole
    training config). Anything else is trained into a temporary folder next to
    `out_dir` and swapped into place with the marker written last, so an
    interrupted build leaves `out_dir` as it was; concurrent builds of one
    folder wait for each other (`hybridserve.buildcache`).

    Args:
        cfg: platform config (base model, engine limits, cache dir).
        data_path: JSONL file, see `hybridserve.finetune.data`.
        name: adapter name, `[a-z0-9][a-z0-9._-]{0,50}` (as `finetune`).
        out_dir: the adapter folder to write: new, empty, or one this function
            wrote before (replaced if stale). Any other existing path is refused.
        train_cfg: hyper-parameters; default `TrainConfig()`. Its evaluation
            options (held-out share, task metric) play no part.
        progress: receives one-line status messages.
        progress_bar: show a tqdm bar with the loss while training.

    Raises:
        InvalidArgument: bad name, data (each problem names its line) or config,
            or an `out_dir` this function did not write.
    """
    train_cfg = train_cfg or TrainConfig()
    _check_request(cfg, name, train_cfg)
    out_dir = Path(out_dir)
    # A stale folder is replaced whole, so only one this function wrote (it has the
    # marker) or an empty one may be: never a folder of the user's that --output
    # happened to name.
    if out_dir.exists() and not (out_dir / OUTPUT_MARKER).is_file() and (
        not out_dir.is_dir() or any(out_dir.iterdir())
    ):
        raise InvalidArgument(
            f"output {str(out_dir)!r} exists and was not written by `hybridserve finetune "
            f"--output` (no {OUTPUT_MARKER}); name a new or empty folder"
        )
    dataset = data_mod.load_examples(data_path)
    base_dir = _base_model_dir(cfg, progress)
    params = {
        "format": _OUTPUT_FORMAT,
        "name": name,
        "base_model": _base_fingerprint(base_dir),
        "base_model_name": cfg.model.name,
        "dataset_sha256": dataset.sha256,
        "training_config": train_cfg.model_dump(mode="json"),
    }
    stats: TrainStats | None = None
    if read_json(out_dir / OUTPUT_MARKER) != params:
        with building(out_dir, OUTPUT_MARKER, params) as tmp:
            if tmp is not None:  # else another process built it while this one waited
                tokenizer = load_tokenizer(base_dir)
                examples = data_mod.tokenize_examples(
                    tokenizer,
                    dataset.examples,
                    max_seq_len=train_cfg.max_seq_len,
                    source=dataset.path,
                )
                progress(
                    f"{len(examples)} examples in {dataset.path}, all trained on (nothing is "
                    f"held out or evaluated); base model {base_dir}"
                )
                progress(
                    f"Training the {name!r} LoRA adapter "
                    f"({train_cfg.total_steps(len(examples))} steps on CPU) ..."
                )
                stats = trainer_mod.train(
                    base_dir,
                    examples,
                    train_cfg,
                    tmp,
                    base_model_name=cfg.model.name,
                    progress_bar=progress_bar,
                )
                progress(
                    f"Trained {name!r} in {stats.seconds:.1f}s "
                    f"({stats.tokens_per_second:.0f} tokens/s)."
                )
    if stats is None:
        progress(f"{out_dir} already holds {name!r} built from the same inputs; not retraining")
    return TrainedFolder(path=out_dir, reused=stats is None, train=stats)


def _base_fingerprint(base_dir: Path) -> str:
    """Identity of a base model folder, for the cache marker of `train_to_folder`.

    A prepared default model: its prepare marker. Any other folder: its
    config.json and the names and sizes of its weight files.
    """
    prepared = base_dir / MARKER_FILENAME
    if prepared.is_file():
        return hashlib.sha256(prepared.read_bytes()).hexdigest()[:16]
    digest = hashlib.sha256((base_dir / "config.json").read_bytes())
    for path in sorted(base_dir.iterdir()):
        if path.suffix in (".safetensors", ".bin") and path.is_file():
            digest.update(f"\0{path.name}\0{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _check_request(cfg: HybridServeConfig, name: str, train_cfg: TrainConfig) -> None:
    """Refuses, before any work, what the registry would refuse after training."""
    if not isinstance(name, str) or not re.fullmatch(_NAME_RULE, name):
        raise InvalidArgument(f"invalid adapter name {name!r}: it must match {_NAME_RULE}")
    if train_cfg.rank > cfg.engine.max_lora_rank:
        raise InvalidArgument(
            f"LoRA rank {train_cfg.rank} is above the engine's max_lora_rank "
            f"{cfg.engine.max_lora_rank}; lower --rank or raise engine.max_lora_rank"
        )
    unsupported = sorted(set(train_cfg.target_modules) - set(cfg.adapters.supported_target_modules))
    if unsupported:
        raise InvalidArgument(
            f"target modules {unsupported} cannot be served; the engine supports: "
            f"{', '.join(cfg.adapters.supported_target_modules)}"
        )


def _base_model_dir(cfg: HybridServeConfig, progress: Callable[[str], object]) -> Path:
    """`model.path`, or the default model, prepared offline on first use."""
    if cfg.model.path is None:
        return prepare_default_model(cfg.cache_dir, dtype=cfg.model.dtype, progress=progress)
    base_dir = model_dir_for(cfg)
    if not (base_dir / "config.json").is_file():
        raise FailedPrecondition(
            f"model.path {str(base_dir)!r} is not a Hugging Face model folder (no config.json)"
        )
    return base_dir


def _registered(registry, adapter_id: str, digest: str) -> bool:
    try:
        return registry.get(adapter_id).content_sha256 == digest
    except HybridServeError:
        return False


def _same_adapter(folder: Path, files: list[str], digest: str) -> bool:
    """True when `folder` holds exactly the adapter files hashing to `digest`."""
    if not folder.is_dir():
        return False
    existing = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return existing == files and content_sha256(folder, existing) == digest


def _place(staged: Path, final: Path, files: list[str]) -> None:
    """Moves `staged` to `final`, replacing a stale folder of that name."""
    if final.exists():
        shutil.rmtree(final)  # named after a hash it no longer has: not a usable source
    os.chmod(staged, 0o755)  # readable by replicas running as other users
    for rel in files:
        os.chmod(staged / rel, 0o644)
    os.replace(staged, final)
