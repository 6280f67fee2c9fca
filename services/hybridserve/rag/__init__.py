"""The RAG gateway: retrieval, rerank and generation composed into one Ask call."""
