"""Retrieval quality on the shipped fixture corpus, through gRPC and a real Weaviate.

Thresholds (measured figures are in README.md and benchmarks/README.md):
- recall@5 of hybrid search (alpha 0.5) >= 0.9: every question has exactly one
  relevant article among 24 on distinct topics, and questions are paraphrases,
  so a working embedder plus BM25 should miss at most 2 of 24. Keyword-only
  search is reported, not asserted: paraphrases are where it is expected to fail.
- reranking the top 10 must not lower mean nDCG@10 against the retrieval order.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
from hybridserve.client import HybridServeClient

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "knowledge"
RECALL_AT_5_MIN = 0.9


def _load():
    corpus = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines()]
    return corpus, questions


def ndcg(ranked_doc_ids: list[str], relevant: set[str], k: int = 10) -> float:
    """Binary-relevance nDCG@k; a document counts once (its best-ranked chunk)."""
    seen, dcg = set(), 0.0
    for rank, doc in enumerate(ranked_doc_ids[:k], 1):
        if doc in relevant and doc not in seen:
            dcg += 1 / math.log2(rank + 1)
        seen.add(doc)
    ideal = sum(1 / math.log2(r + 1) for r in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


@pytest.fixture(scope="module")
def kb(platform):
    corpus, questions = _load()
    tenant = f"kb-{uuid.uuid4().hex[:8]}"
    with HybridServeClient(platform.address) as c:
        c.create_tenant(tenant)
        reply = c.upsert(tenant, corpus)
        assert not reply.failures and reply.documents_ok == len(corpus)
        yield c, tenant, questions


def test_recall_at_5(kb):
    client, tenant, questions = kb
    recall = {}
    for alpha in (0.0, 0.5, 1.0):
        found = 0
        for q in questions:
            hits = client.search(tenant, q["question"], top_k=5, alpha=alpha)
            found += bool({h.doc_id for h in hits} & set(q["relevant"]))
        recall[alpha] = found / len(questions)
    print(f"recall@5 keyword={recall[0.0]:.3f} hybrid={recall[0.5]:.3f} vector={recall[1.0]:.3f}")
    assert recall[0.5] >= RECALL_AT_5_MIN, recall
    assert recall[1.0] >= RECALL_AT_5_MIN, recall


def test_rerank_does_not_lower_ndcg(kb):
    client, tenant, questions = kb
    before, after = [], []
    for q in questions:
        hits = client.search(tenant, q["question"], top_k=10, alpha=0.5)
        relevant = set(q["relevant"])
        before.append(ndcg([h.doc_id for h in hits], relevant))
        reply = client.rerank(q["question"], [h.text for h in hits])
        assert sorted(r.index for r in reply.results) == list(range(len(hits)))
        after.append(ndcg([hits[r.index].doc_id for r in reply.results], relevant))
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    print(f"nDCG@10 retrieval={mean_before:.3f} reranked={mean_after:.3f} ({reply.model})")
    assert mean_after >= mean_before - 1e-9
