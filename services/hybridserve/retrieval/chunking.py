"""Cuts text into overlapping windows of tokens of the embedding model's tokenizer.

Each chunk is a slice of the original text (cut at token boundaries through
the tokenizer's offset mapping), so citations quote the document verbatim.
"""

from __future__ import annotations

from typing import Any


def chunk_spans(tokenizer: Any, text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans (start, end) of token windows of `size` sharing `overlap` tokens."""
    return [(a, b) for a, b, _ in chunk_windows(tokenizer, text, size, overlap)]


def chunk_windows(tokenizer: Any, text: str, size: int,
                  overlap: int) -> list[tuple[int, int, int]]:
    """(start, end, tokens) of each chunk: its character span and its token count.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (it must return offsets).
        text: the document text.
        size: tokens per chunk (without special tokens).
        overlap: tokens shared by consecutive chunks; < size.
    """
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [(a, b) for a, b in enc["offset_mapping"] if b > a]
    if not offsets:
        stripped = text.strip()
        if not stripped:
            return []
        start = text.index(stripped)
        return [(start, start + len(stripped), 1)]
    spans = []
    step = size - overlap
    start = 0
    while True:
        end = min(start + size, len(offsets))
        spans.append((offsets[start][0], offsets[end - 1][1], end - start))
        if end >= len(offsets):
            break
        start += step
    return spans


def chunk_text(tokenizer: Any, text: str, size: int, overlap: int) -> list[str]:
    """The chunk texts of `text` (see `chunk_spans`)."""
    return [text[a:b] for a, b in chunk_spans(tokenizer, text, size, overlap)]


def chunk_text_counted(tokenizer: Any, text: str, size: int,
                       overlap: int) -> tuple[list[str], int]:
    """The chunk texts of `text` and the tokens they hold in all (what embedding them
    costs: overlapping tokens count once per chunk, and a chunk counts at least one
    token per 4 characters)."""
    windows = chunk_windows(tokenizer, text, size, overlap)
    # NOTE: at least a token per 4 characters: text the tokenizer turns into no
    # tokens (zero-width characters) still costs the embedder its characters.
    return ([text[a:b] for a, b, _ in windows],
            sum(max(n, -(-(b - a) // 4)) for a, b, n in windows))
