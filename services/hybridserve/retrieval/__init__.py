"""The knowledge path: documents -> chunks -> embeddings -> Weaviate -> hybrid search."""
