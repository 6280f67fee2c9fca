"""Reranking: score (query, passage) pairs and order passages, best first."""
