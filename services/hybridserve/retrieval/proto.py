"""RetrievalService protobuf <-> the retrieval domain types.

Shared by the servicers that speak the retrieval messages (`retrieval.servicer`, and the
RAG servicer for a question's filters), so no servicer imports another.
"""

from __future__ import annotations

from hybridserve.retrieval.documents import FieldFilter, Hit, UpsertResult
from hybridserve.v1 import retrieval_pb2

_OPS = {
    retrieval_pb2.FILTER_OP_EQUAL: "equal",
    retrieval_pb2.FILTER_OP_NOT_EQUAL: "not_equal",
    retrieval_pb2.FILTER_OP_ANY_OF: "any_of",
}


def filters_from_proto(filters) -> list[FieldFilter]:
    # An unset op becomes "" and fails validation with a message naming the filter.
    return [FieldFilter(f.field, _OPS.get(f.op, ""), tuple(f.values)) for f in filters]


def hit_to_proto(h: Hit) -> retrieval_pb2.Hit:
    msg = retrieval_pb2.Hit(
        chunk_id=h.chunk_id,
        doc_id=h.doc_id,
        chunk_index=h.chunk_index,
        text=h.text,
        title=h.title,
        source=h.source,
        metadata=dict(h.metadata),
        score=h.score,
        ingested_at=h.ingested_at,
    )
    if h.keyword_score is not None:
        msg.keyword_score = h.keyword_score
    if h.vector_score is not None:
        msg.vector_score = h.vector_score
    return msg


def upsert_to_proto(r: UpsertResult) -> retrieval_pb2.UpsertResponse:
    return retrieval_pb2.UpsertResponse(
        chunks_written=r.chunks_written,
        chunks_removed=r.chunks_removed,
        documents_unchanged=r.documents_unchanged,
        documents_ok=r.documents_ok,
        failures=[
            retrieval_pb2.ChunkFailure(
                doc_id=f.doc_id, chunk_index=f.chunk_index, chunk_id=f.chunk_id, message=f.message
            )
            for f in r.failures
        ],
    )
