"""What tests and benchmarks read of one generation replica, through a Serve handle
only (never on the gRPC API): its counters, and how it answers a credential.

`ReplicaIntrospection` is mixed into `GenerationServicer`, so that the deployment
Serve builds from it has these methods, while the servicer's own body stays the
GenerationService.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict

import psutil

from hybridserve import observability as obs
from hybridserve.errors import HybridServeError
from hybridserve.generation.residency import AdapterResidency
from hybridserve.generation.service import GenerationService
from hybridserve.tenancy.auth import Tenancy

#: client_request_id -> request id pairs a replica remembers for `stats()`.
_RECENT_IDS = 256


class RecentRequestIds:
    """client_request_id -> the server's request id, for the last requests that
    sent one (at most `size`)."""

    def __init__(self, size: int = _RECENT_IDS):
        self.size = size
        self._ids: OrderedDict[str, str] = OrderedDict()

    def remember(self, client_request_id: str, request_id: str) -> None:
        self._ids[client_request_id] = request_id
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def as_dict(self) -> dict[str, str]:
        return dict(self._ids)


def _rss_bytes() -> int:
    """Resident memory of this replica and its children (vLLM's engine process)."""
    total = 0
    me = psutil.Process()
    for proc in (me, *me.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return total


class ReplicaIntrospection:
    """Serve-handle-only methods of a generation replica (see the module docstring).
    The class it is mixed into sets these attributes."""

    service: GenerationService
    tenancy: Tenancy
    residency: AdapterResidency
    base_only: bool
    #: Adapters made resident ahead of their requests (`prefetch_adapter`).
    prefetches: int
    recent_ids: RecentRequestIds

    async def check_credentials(self, token: str, admit: bool = False) -> dict:
        """Authenticates `token` on this replica, and with `admit` takes one request
        of its quota (tests of the revocation bound and of shared quotas across
        replicas)."""
        try:
            p = await self.tenancy.authenticate_token(token)
            if admit:
                async with self.tenancy.admit(p):
                    pass
            return {"replica_id": obs.replica_id(), "code": "OK", "tenant": p.tenant_id}
        except HybridServeError as e:
            return {"replica_id": obs.replica_id(), "code": e.code, "reason": e.reason,
                    "retry_after": e.retry_after}

    async def stats(self, reset_peak: bool = False) -> dict:
        """This replica's id, engine counters, resident adapters, evictions, and the
        server request ids of the last requests that sent a client_request_id.
        `reset_peak` starts a new window for `engine_running_max` after reading."""
        engine = self.service.engine
        out = {
            "replica_id": obs.replica_id(),
            "base_only": self.base_only,
            "evictions": self.residency.evictions,
            "prefetches": self.prefetches,
            "request_ids": self.recent_ids.as_dict(),
            **asdict(engine.stats()),
        }
        out["rss_bytes"] = _rss_bytes()
        if reset_peak and hasattr(engine, "reset_running_peak"):
            engine.reset_running_peak()
        return out
