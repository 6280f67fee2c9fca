"""Reads a file or folder into documents for `hybridserve ingest`.

Formats: .txt and .md (title: the first Markdown heading, else the file name),
.html/.htm (title: <title>; text: the visible text), .jsonl (one document a
line: {"id", "text", optional "title", "source", "metadata"}). A file's
document id is its path relative to the ingested folder, so re-ingesting the
same folder replaces the same documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from hybridserve.errors import InvalidArgument
from hybridserve.retrieval.documents import Document

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl")


@dataclass(frozen=True)
class SourceFile:
    path: Path
    #: Prefix of document ids: the path relative to the ingested root.
    rel: str


def find_files(root: Path) -> list[SourceFile]:
    """The ingestible files under `root` (or `root` itself), sorted, hidden ones skipped."""
    root = root.expanduser()
    if not root.exists():
        raise InvalidArgument(f"{root} does not exist")
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise InvalidArgument(f"{root}: unsupported file type; use one of {', '.join(SUFFIXES)}")
        return [SourceFile(root, root.name)]
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in SUFFIXES:
            files.append(SourceFile(p, rel.as_posix()))
    return files


class _Text(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "head"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section",
              "article", "pre", "blockquote", "table", "ul", "ol"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP and self._skip:
            self._skip -= 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(title, visible text) of an HTML document."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return parser.title.strip(), text.strip()


def _markdown_title(text: str) -> str:
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            return m.group(1)
    return ""


def read_documents(f: SourceFile) -> Iterator[Document]:
    """The documents in one file. Raises InvalidArgument naming FILE:LINE for bad input."""
    try:
        raw = f.path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{f.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = f.path.suffix.lower()
    source = str(f.path)
    if suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{f.path}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InvalidArgument(f"{where}: malformed JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InvalidArgument(f'{where}: expected an object with a string "text"')
            doc_id = obj.get("id")
            if not isinstance(doc_id, str | int) or doc_id == "":
                raise InvalidArgument(f'{where}: expected a non-empty "id" (string)')
            meta = obj.get("metadata") or {}
            if not isinstance(meta, dict):
                raise InvalidArgument(f'{where}: "metadata" must be an object')
            yield Document(
                id=str(doc_id),
                text=obj["text"],
                title=str(obj.get("title") or ""),
                source=str(obj.get("source") or f"{source}#L{n}"),
                metadata={str(k): str(v) for k, v in meta.items()},
            )
        return
    if suffix in (".html", ".htm"):
        title, text = html_to_text(raw)
    else:
        text = raw
        title = _markdown_title(raw) if suffix in (".md", ".markdown") else ""
    yield Document(id=f.rel, text=text, title=title or f.path.stem, source=source,
                   metadata={"format": suffix.lstrip(".")})
