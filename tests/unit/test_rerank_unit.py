"""Rerank logic and backends, without Serve: validation, batching, and the
cross-encoder backend against a real (tiny, random) HF classification model."""

from __future__ import annotations

import numpy as np
import pytest
from hybridserve.config import HybridServeConfig, RerankConfig
from hybridserve.errors import InvalidArgument
from hybridserve.rerank.backends import RerankBackend
from hybridserve.rerank.service import RerankInput, RerankService


class LengthBackend(RerankBackend):
    """Scores a pair by passage length; records every batch it is given."""

    name = "fake:length"

    def __init__(self):
        self.batches = []

    def score(self, pairs):
        self.batches.append(list(pairs))
        return np.array([float(len(p)) for _, p in pairs], dtype=np.float32)


def test_rerank_orders_best_first_and_splits_batches():
    backend = LengthBackend()
    svc = RerankService(RerankConfig(), backend)
    reqs = [RerankInput("q1", ("aa", "a", "aaa")), RerankInput("q2", ("b", "bbbb"), top_n=1)]
    out = svc.rerank_many(reqs)
    assert [(r.index, r.score) for r in out[0]] == [(2, 3.0), (0, 2.0), (1, 1.0)]
    assert [(r.index, r.score) for r in out[1]] == [(1, 4.0)]
    assert len(backend.batches) == 1 and len(backend.batches[0]) == 5  # one call for both


def test_rerank_validation():
    svc = RerankService(RerankConfig(max_passages=3), LengthBackend())
    for req in (RerankInput("", ("a",)), RerankInput("q", ()), RerankInput("q", ("a",) * 4),
                RerankInput("q", ("a", "b"), top_n=3), RerankInput("q", ("x" * 70000,))):
        with pytest.raises(InvalidArgument):
            svc.validate(req)


def test_cross_encoder_config_needs_a_model():
    with pytest.raises(ValueError, match="needs rerank.model"):
        HybridServeConfig(rerank={"backend": "cross-encoder"})


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A random 2-layer BERT sequence classifier with the shipped MiniLM tokenizer."""
    import torch
    from hybridserve.embedding import load_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-ce")
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=128,
    ))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_cross_encoder_backend_matches_transformers(tiny_cross_encoder):
    import torch
    from hybridserve.rerank.backends import CrossEncoderBackend
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    backend = CrossEncoderBackend(tiny_cross_encoder, batch_size=2, max_length=64)
    pairs = [("where is paris", "Paris is in France."), ("where is paris", "Cats sleep a lot."),
             ("tire pressure", "Road tires run at 80 to 100 psi." * 20)]
    got = backend.score(pairs)
    tok = AutoTokenizer.from_pretrained(tiny_cross_encoder)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    with torch.inference_mode():
        for (q, p), score in zip(pairs, got, strict=True):
            enc = tok(q, p, truncation="only_second", max_length=64, return_tensors="pt")
            assert score == pytest.approx(model(**enc).logits[0, -1].item(), abs=1e-4)
    assert backend.name == f"cross-encoder:{tiny_cross_encoder.name}"


def test_bi_encoder_backend_scores_related_text_higher():
    from hybridserve.rerank.backends import BiEncoderBackend

    backend = BiEncoderBackend(None)
    s = backend.score([("how do I water tomato plants", "Tomatoes need deep watering twice a week."),
                       ("how do I water tomato plants", "The central bank raised interest rates.")])
    assert s[0] > s[1] and backend.name == "bi-encoder:all-MiniLM-L6-v2"
