from hybridserve.v1 import common_pb2 as _common_pb2
from hybridserve.v1 import generation_pb2 as _generation_pb2
from hybridserve.v1 import retrieval_pb2 as _retrieval_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrievalOptions(_message.Message):
    __slots__ = ("top_k", "alpha", "filters", "rerank", "top_n", "min_score")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    alpha: float
    filters: _containers.RepeatedCompositeFieldContainer[_retrieval_pb2.Filter]
    rerank: bool
    top_n: int
    min_score: float
    def __init__(self, top_k: _Optional[int] = ..., alpha: _Optional[float] = ..., filters: _Optional[_Iterable[_Union[_retrieval_pb2.Filter, _Mapping]]] = ..., rerank: bool = ..., top_n: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("question", "messages", "tenant", "adapter", "retrieval", "sampling", "json_schema", "client_request_id", "base_model", "include_prompt", "prompt_only")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ONLY_FIELD_NUMBER: _ClassVar[int]
    question: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    tenant: str
    adapter: str
    retrieval: RetrievalOptions
    sampling: _generation_pb2.SamplingParams
    json_schema: str
    client_request_id: str
    base_model: bool
    include_prompt: bool
    prompt_only: bool
    def __init__(self, question: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., tenant: _Optional[str] = ..., adapter: _Optional[str] = ..., retrieval: _Optional[_Union[RetrievalOptions, _Mapping]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., json_schema: _Optional[str] = ..., client_request_id: _Optional[str] = ..., base_model: bool = ..., include_prompt: bool = ..., prompt_only: bool = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("number", "chunk_id", "doc_id", "chunk_index", "title", "source", "snippet", "score", "retrieval_score", "keyword_score", "vector_score", "rerank_score", "metadata", "text")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_SCORE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_SCORE_FIELD_NUMBER: _ClassVar[int]
    RERANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    number: int
    chunk_id: str
    doc_id: str
    chunk_index: int
    title: str
    source: str
    snippet: str
    score: float
    retrieval_score: float
    keyword_score: float
    vector_score: float
    rerank_score: float
    metadata: _containers.ScalarMap[str, str]
    text: str
    def __init__(self, number: _Optional[int] = ..., chunk_id: _Optional[str] = ..., doc_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., title: _Optional[str] = ..., source: _Optional[str] = ..., snippet: _Optional[str] = ..., score: _Optional[float] = ..., retrieval_score: _Optional[float] = ..., keyword_score: _Optional[float] = ..., vector_score: _Optional[float] = ..., rerank_score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., text: _Optional[str] = ...) -> None: ...

class Sources(_message.Message):
    __slots__ = ("citations",)
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    def __init__(self, citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("auth_ms", "quota_ms", "embed_ms", "retrieve_ms", "rerank_ms", "prompt_ms", "queue_ms", "first_token_ms", "total_ms")
    AUTH_MS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_MS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    auth_ms: float
    quota_ms: float
    embed_ms: float
    retrieve_ms: float
    rerank_ms: float
    prompt_ms: float
    queue_ms: float
    first_token_ms: float
    total_ms: float
    def __init__(self, auth_ms: _Optional[float] = ..., quota_ms: _Optional[float] = ..., embed_ms: _Optional[float] = ..., retrieve_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ..., prompt_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class AskFinal(_message.Message):
    __slots__ = ("finish_reason", "usage", "adapter", "replica_id", "cited", "invalid_citations", "timings", "request_id", "client_request_id", "tenant", "passage_token_budget", "passage_tokens", "prompt_token_ids")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CITED_FIELD_NUMBER: _ClassVar[int]
    INVALID_CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    adapter: str
    replica_id: str
    cited: _containers.RepeatedScalarFieldContainer[int]
    invalid_citations: _containers.RepeatedScalarFieldContainer[int]
    timings: StageTimings
    request_id: str
    client_request_id: str
    tenant: str
    passage_token_budget: int
    passage_tokens: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., adapter: _Optional[str] = ..., replica_id: _Optional[str] = ..., cited: _Optional[_Iterable[int]] = ..., invalid_citations: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., request_id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., passage_token_budget: _Optional[int] = ..., passage_tokens: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("sources", "delta", "final")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    sources: Sources
    delta: _generation_pb2.TokenDelta
    final: AskFinal
    def __init__(self, sources: _Optional[_Union[Sources, _Mapping]] = ..., delta: _Optional[_Union[_generation_pb2.TokenDelta, _Mapping]] = ..., final: _Optional[_Union[AskFinal, _Mapping]] = ...) -> None: ...
