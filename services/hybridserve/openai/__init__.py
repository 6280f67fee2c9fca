"""The OpenAI-compatible HTTP API (the `openai` Serve app): OpenAI's request and response
shapes over the gateway's domain code (`hybridserve.rag.gateway`), so keys, grants,
quotas, prompts and citations are the gRPC API's own. See docs/openai.md."""
