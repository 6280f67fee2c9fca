"""How the rerank stage orders passages: the retrieval score fused with the rerank
score, not replaced by it.

    fused = retrieval_score + weight * rerank_score

A dense reranker (the default bi-encoder) is confident when its scores differ a lot
(a paraphrased question: the relevant passage scores 0.2-0.5 above the rest) and
blind when they are near-tied (product sheets that differ only in a model number,
"Kestrel-5" vs "Kestrel-6": cosines within 0.03). Weighted by `weight` (5), a
confident reranker reorders, and near-ties are settled by hybrid search, whose
keyword half matched the model number. On the shipped fixtures: recall@1 after
rerank is 1.00 on both the near-duplicate products (hybrid alone 1.00, rerank
alone 0.85) and the paraphrased articles (hybrid alone 0.71, rerank alone 1.00),
for any weight from 3 to 20 (tests/integration/test_retrieval_quality.py).
"""

from __future__ import annotations

from collections.abc import Sequence


def fuse(retrieval_scores: Sequence[float], rerank_scores: Sequence[float],
         weight: float) -> list[float]:
    """The fused score of each candidate (same order as given)."""
    return [float(r) + weight * float(s) for r, s in zip(retrieval_scores, rerank_scores, strict=True)]


def order(retrieval_scores: Sequence[float], rerank_scores: Sequence[float],
          weight: float) -> list[int]:
    """Candidate indices, best first; ties keep the retrieval order."""
    fused = fuse(retrieval_scores, rerank_scores, weight)
    return sorted(range(len(fused)), key=lambda i: -fused[i])
