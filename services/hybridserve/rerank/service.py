"""Rerank domain logic: validation, then one backend call per batch of requests.

`rerank_many` takes several callers' requests at once (Serve's `@serve.batch`
hands it a list), scores all their pairs in one backend call and splits the
scores back, so concurrent callers share forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hybridserve.config import RerankConfig
from hybridserve.errors import InvalidArgument
from hybridserve.rerank.backends import RerankBackend

MAX_QUERY_CHARS = 4096
MAX_PASSAGE_CHARS = 64 * 1024


@dataclass(frozen=True)
class RerankInput:
    query: str
    passages: tuple[str, ...]
    top_n: int = 0


@dataclass(frozen=True)
class Ranked:
    index: int
    score: float


class RerankService:
    def __init__(self, config: RerankConfig, backend: RerankBackend):
        self.cfg = config
        self.backend = backend

    def validate(self, req: RerankInput) -> RerankInput:
        if not req.query.strip():
            raise InvalidArgument("query is empty")
        if len(req.query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"query is longer than {MAX_QUERY_CHARS} characters")
        if not req.passages:
            raise InvalidArgument("no passages: send at least one")
        if len(req.passages) > self.cfg.max_passages:
            raise InvalidArgument(
                f"{len(req.passages)} passages; the limit is {self.cfg.max_passages} "
                "(rerank.max_passages)"
            )
        for i, p in enumerate(req.passages):
            if len(p) > MAX_PASSAGE_CHARS:
                raise InvalidArgument(f"passage {i} is longer than {MAX_PASSAGE_CHARS} characters")
        if req.top_n > len(req.passages):
            raise InvalidArgument(
                f"top_n ({req.top_n}) is larger than the number of passages ({len(req.passages)})"
            )
        return req

    def rerank_many(self, reqs: Sequence[RerankInput]) -> list[list[Ranked]]:
        """Scores every request's pairs in one backend call; each result best first."""
        pairs = [(r.query, p) for r in reqs for p in r.passages]
        scores = self.backend.score(pairs) if pairs else []
        out, at = [], 0
        for r in reqs:
            mine = [float(s) for s in scores[at : at + len(r.passages)]]
            at += len(r.passages)
            # NaN sorts last; ties keep the caller's order (stable sort).
            order = sorted(
                range(len(mine)),
                key=lambda i: -mine[i] if not math.isnan(mine[i]) else math.inf,
            )
            if r.top_n:
                order = order[: r.top_n]
            out.append([Ranked(i, mine[i]) for i in order])
        return out
