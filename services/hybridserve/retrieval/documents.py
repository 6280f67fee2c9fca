"""Transport-free types of the knowledge path and their validation.

Documents are cut into chunks; a chunk's id is derived from (tenant, document
id, chunk index), so writing the same document again overwrites the same
objects and never duplicates them.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hybridserve.errors import InvalidArgument

#: Weaviate's tenant-name alphabet, minus a leading '-' or '_'.
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: Metadata keys that can be filtered on (they become `key=value` index terms).
METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_DOC_ID_CHARS = 512
MAX_FIELD_CHARS = 2048
MAX_METADATA_PAIRS = 64
MAX_METADATA_VALUE_CHARS = 1024
MAX_FILTERS = 16
MAX_FILTER_VALUES = 100
MAX_QUERY_CHARS = 4096

#: Fixed namespace of chunk ids. NOTE: changing it changes every chunk id, so
#: re-ingesting would duplicate every stored document.
CHUNK_NAMESPACE = uuid.UUID("5f0d6a5e-3c55-4d39-9a8f-2f9b8a9f1c11")

FILTER_FIELDS = ("doc_id", "source", "title")
FilterOp = Literal["equal", "not_equal", "any_of"]


def validate_tenant(tenant: str) -> str:
    if not tenant:
        raise InvalidArgument("tenant is required")
    if not TENANT_RE.match(tenant):
        raise InvalidArgument(
            f"invalid tenant name {tenant[:80]!r}: use 1-64 characters from A-Z a-z 0-9 _ -, "
            "starting with a letter or digit"
        )
    return tenant


def chunk_id(tenant: str, doc_id: str, index: int) -> str:
    """The stable id of a chunk: a UUID5 of (tenant, doc id, chunk index)."""
    return str(uuid.uuid5(CHUNK_NAMESPACE, json.dumps([tenant, doc_id, index])))


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""
    source: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def content_sha256(self) -> str:
        """Hash of everything that ends up in the stored chunks."""
        blob = json.dumps(
            [self.text, self.title, self.source, sorted(self.metadata.items())], ensure_ascii=False
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def validate_documents(
    docs: Sequence[Document], *, max_documents: int, max_document_bytes: int
) -> None:
    """Checks a whole Upsert batch up front, so a bad one writes nothing.

    Raises:
        InvalidArgument: naming the first offending document and the limit.
    """
    if not docs:
        raise InvalidArgument("no documents: send at least one")
    if len(docs) > max_documents:
        raise InvalidArgument(
            f"{len(docs)} documents in one request; the limit is {max_documents} "
            "(retrieval.max_documents_per_request): split the batch"
        )
    seen: set[str] = set()
    for i, d in enumerate(docs):
        where = f"document {i}" + (f" ({d.id[:80]!r})" if d.id else "")
        if not d.id:
            raise InvalidArgument(f"{where}: id is required")
        if len(d.id) > MAX_DOC_ID_CHARS:
            raise InvalidArgument(f"{where}: id is longer than {MAX_DOC_ID_CHARS} characters")
        if d.id in seen:
            raise InvalidArgument(f"{where}: duplicate id in this request")
        seen.add(d.id)
        if not d.text.strip():
            raise InvalidArgument(f"{where}: text is empty")
        size = len(d.text.encode())
        if size > max_document_bytes:
            raise InvalidArgument(
                f"{where}: text is {size} bytes; the limit is {max_document_bytes} bytes "
                "(retrieval.max_document_bytes): split the document"
            )
        for name in ("title", "source"):
            if len(getattr(d, name)) > MAX_FIELD_CHARS:
                raise InvalidArgument(f"{where}: {name} is longer than {MAX_FIELD_CHARS} characters")
        if len(d.metadata) > MAX_METADATA_PAIRS:
            raise InvalidArgument(f"{where}: more than {MAX_METADATA_PAIRS} metadata pairs")
        for key, value in d.metadata.items():
            if not METADATA_KEY_RE.match(key):
                raise InvalidArgument(
                    f"{where}: metadata key {key[:80]!r} is invalid: use 1-64 characters "
                    "from A-Z a-z 0-9 _ . : -"
                )
            if len(value) > MAX_METADATA_VALUE_CHARS:
                raise InvalidArgument(
                    f"{where}: metadata {key!r} is longer than {MAX_METADATA_VALUE_CHARS} characters"
                )


@dataclass(frozen=True)
class FieldFilter:
    """One condition: `field` is doc_id, source, title or metadata.<key>."""

    field: str
    op: FilterOp
    values: tuple[str, ...]

    @property
    def metadata_key(self) -> str | None:
        return self.field.removeprefix("metadata.") if self.field.startswith("metadata.") else None


def validate_filters(filters: Sequence[FieldFilter]) -> None:
    """Raises InvalidArgument (with a BadRequest field violation) for a bad filter."""

    def bad(i: int, message: str, what: str) -> InvalidArgument:
        return InvalidArgument(message, field_violations=[(f"filters[{i}]", what)])

    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"{len(filters)} filters; the limit is {MAX_FILTERS}",
                              field_violations=[("filters", f"at most {MAX_FILTERS}")])
    for i, f in enumerate(filters):
        where = f"filter {i} ({f.field[:80]!r})"
        key = f.metadata_key
        if key is not None:
            if not METADATA_KEY_RE.match(key):
                raise bad(i, f"{where}: invalid metadata key {key[:80]!r}", "invalid metadata key")
        elif f.field not in FILTER_FIELDS:
            raise bad(
                i, f"{where}: unknown field; use one of {', '.join(FILTER_FIELDS)} or metadata.<key>",
                f"field must be one of {', '.join(FILTER_FIELDS)} or metadata.<key>",
            )
        if f.op not in ("equal", "not_equal", "any_of"):
            raise bad(i, f"{where}: set op to EQUAL, NOT_EQUAL or ANY_OF", "op is unset")
        if f.op == "any_of":
            if not 1 <= len(f.values) <= MAX_FILTER_VALUES:
                raise bad(i, f"{where}: ANY_OF takes 1-{MAX_FILTER_VALUES} values",
                          f"1-{MAX_FILTER_VALUES} values")
        elif len(f.values) != 1:
            raise bad(i, f"{where}: {f.op.upper()} takes exactly one value", "exactly one value")

def metadata_terms(metadata: Mapping[str, str]) -> list[str]:
    """The filterable index terms of a chunk's metadata: `key=value` strings."""
    return [f"{k}={v}" for k, v in sorted(metadata.items())]


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a document."""

    tenant: str
    doc_id: str
    index: int
    text: str
    title: str
    source: str
    metadata: Mapping[str, str]
    #: Content hash of the whole document version this chunk came from.
    doc_sha256: str
    #: Chunks the document version has in all.
    doc_chunks: int

    @property
    def id(self) -> str:
        return chunk_id(self.tenant, self.doc_id, self.index)


@dataclass(frozen=True)
class SearchQuery:
    tenant: str
    query: str
    top_k: int
    alpha: float
    filters: tuple[FieldFilter, ...] = ()


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    chunk_index: int
    text: str
    title: str
    source: str
    metadata: Mapping[str, str]
    score: float
    keyword_score: float | None = None
    vector_score: float | None = None
    ingested_at: str = ""


@dataclass(frozen=True)
class RetrievalResult:
    """A search's hits and where its time went (what the RAG gateway gets back)."""

    hits: list[Hit]
    embed_s: float = 0.0
    retrieve_s: float = 0.0


@dataclass(frozen=True)
class ChunkFailure:
    doc_id: str
    chunk_index: int
    chunk_id: str
    message: str


@dataclass
class UpsertResult:
    chunks_written: int = 0
    chunks_removed: int = 0
    documents_unchanged: int = 0
    documents_ok: int = 0
    failures: list[ChunkFailure] = field(default_factory=list)
    #: Tokens of the chunks sent to the embedder (what the Upsert is charged).
    embedded_tokens: int = 0
