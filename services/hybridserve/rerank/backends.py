"""Rerank backends: one protocol, chosen by `rerank.backend`.

- `bi-encoder` (default): cosine similarity between the query's and each
  passage's embedding from a sentence-transformers model. With no model set
  it uses the shipped all-MiniLM-L6-v2, so it works offline out of the box.
  It re-scores whole passages with the dense model only, which undoes the
  keyword half of a hybrid ranking; a real cross-encoder is better (see
  README "Reranking").
- `cross-encoder`: any local Hugging Face sequence-classification model that
  reads query and passage together (ms-marco MiniLM cross-encoders, BGE
  rerankers, ...). The score is the logit of the relevant class.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hybridserve.config import RerankConfig
from hybridserve.embedding import SentenceTransformerEmbedder
from hybridserve.errors import FailedPrecondition


class RerankBackend(abc.ABC):
    #: "<backend>:<model>", reported in every response.
    name: str

    @abc.abstractmethod
    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """One float per (query, passage) pair; higher is more relevant."""


class BiEncoderBackend(RerankBackend):
    def __init__(self, model_dir: Path | None, *, batch_size: int = 32, threads: int = 0):
        self.embedder = SentenceTransformerEmbedder(model_dir, batch_size=batch_size, threads=threads)
        self.name = f"bi-encoder:{self.embedder.name}"

    def score(self, pairs):
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        # Embed each distinct text once (a batch usually shares one query).
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        vectors = self.embedder.embed(texts)
        index = {t: i for i, t in enumerate(texts)}
        q = vectors[[index[a] for a, _ in pairs]]
        p = vectors[[index[b] for _, b in pairs]]
        return np.einsum("ij,ij->i", q, p).astype(np.float32)


class CrossEncoderBackend(RerankBackend):
    def __init__(
        self, model_dir: Path, *, batch_size: int = 32, max_length: int = 512, threads: int = 0
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(model_dir).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise FailedPrecondition(
                f"rerank.model {folder} has no config.json; point it at a local Hugging Face "
                "sequence-classification model"
            )
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length))
        self.name = f"cross-encoder:{folder.name}"

    def score(self, pairs):
        out = []
        for i in range(0, len(pairs), self.batch_size):
            part = pairs[i : i + self.batch_size]
            enc = self.tokenizer(
                [q for q, _ in part],
                [p for _, p in part],
                padding=True,
                truncation="only_second",
                max_length=self.max_length,
                return_tensors="pt",
            )
            with self.torch.inference_mode():
                logits = self.model(**enc).logits
            # One logit: a relevance score. Two or more: the last class is "relevant".
            out.append(logits[:, -1].float().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def build_backend(cfg: RerankConfig, embedding_model: Path | None = None) -> RerankBackend:
    """The configured backend (the bi-encoder falls back to retrieval's embedding model)."""
    if cfg.backend == "cross-encoder":
        assert cfg.model is not None  # the config validator guarantees it
        return CrossEncoderBackend(
            cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length, threads=cfg.torch_threads
        )
    return BiEncoderBackend(
        cfg.model or embedding_model, batch_size=cfg.batch_size, threads=cfg.torch_threads
    )
