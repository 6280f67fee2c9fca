"""LoRA adapter residency on one generation replica, and the routing report it gives.

An adapter in this replica's engine goes through:

    loaded ──(Serve evicts it)──> draining ──(its last request ends)──> unloaded
       ^                             │
       └────(loaded again first)─────┘

Serve's multiplexing decides *which* adapters stay (it keeps at most
`engine.max_loras` per replica and evicts the least recently used); this module
decides *when* an evicted one leaves the engine: once no request uses it, unless
it is loaded again meanwhile. `RoutingReport` is what the replica then tells every
router of its deployment (`hybridserve.generation.routing`) about its slots and
the requests in flight per adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridserve import observability as obs
from hybridserve.adapters import AdapterRecord
from hybridserve.generation.engine import AdapterRef, Engine
from hybridserve.generation.node_cache import local_copy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingReport:
    """What a generation replica reports to every router (Serve's
    `record_routing_stats`). Serve carries it as a plain dict: `to_wire` on the
    replica's side and `from_wire` on the router's are the only conversions."""

    #: When the report was taken (time.time()).
    at: float = 0.0
    #: Adapters one batch can hold (`engine.max_loras`); 0 = LoRA off (base pool).
    slots: int = 1
    #: Adapters loaded and not evicted, sorted.
    resident: tuple[str, ...] = ()
    #: Requests in flight per adapter not evicted ("" = no adapter).
    active: Mapping[str, int] = field(default_factory=dict)
    #: Requests in flight in all (including those on evicted, draining adapters).
    ongoing: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "slots": self.slots,
            "resident": list(self.resident),
            "active": dict(self.active),
            "ongoing": self.ongoing,
        }

    @classmethod
    def from_wire(cls, stats: Mapping[str, Any] | None) -> RoutingReport:
        """The report from Serve's dict; a replica that has not reported yet (an
        empty dict or None) reads as the defaults."""
        stats = stats or {}
        return cls(
            at=float(stats.get("at", 0.0)),
            slots=int(stats.get("slots", 1)),
            resident=tuple(stats.get("resident") or ()),
            active=dict(stats.get("active") or {}),
            ongoing=int(stats.get("ongoing", 0)),
        )


class _AdapterState:
    """One adapter in this replica's engine: the requests using it, and whether Serve
    has evicted it (it then unloads once they have ended)."""

    def __init__(self, ref: AdapterRef):
        self.ref = ref
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()
        #: Set when Serve evicted it; cleared when it is loaded again before unloading.
        self.evicted = False


class ResidentAdapter:
    """The multiplexed "model" Serve caches for one load of an adapter.

    Evicting it returns at once: Serve awaits `model.__del__` while it holds the
    replica's model-cache lock, so waiting there would stall every other adapter's
    load. `AdapterResidency` unloads the adapter from the engine once its last
    request has ended, unless it is loaded again first. A load returns a new object
    each time (Serve disarms the `__del__` of the object it evicted) over one shared
    state per adapter.
    """

    def __init__(self, state: _AdapterState, on_evict):
        self._state = state
        self._on_evict = on_evict
        # NOTE: an instance attribute, not a method: Serve awaits `model.__del__`
        # on LRU eviction, while the garbage collector only ever calls the
        # class's __del__ (which must not be a coroutine).
        self.__del__ = self._evict

    @property
    def ref(self) -> AdapterRef:
        return self._state.ref

    @property
    def users(self) -> int:
        return self._state.users

    @property
    def evicted(self) -> bool:
        return self._state.evicted

    def acquire(self) -> None:
        self._state.users += 1
        self._state.idle.clear()

    def release(self) -> None:
        self._state.users -= 1
        if self._state.users == 0:
            self._state.idle.set()

    async def _evict(self) -> None:
        self._on_evict(self._state)


class AdapterResidency:
    """The adapters loaded in one replica's engine, and the requests using them.

    Args:
        engine: the replica's engine (loads and unloads adapters).
        node_cache_dir: `adapters.node_cache_dir`; when set, the engine loads a
            node-local copy of each adapter instead of the shared registry's.
    """

    def __init__(self, engine: Engine, node_cache_dir: Path | None = None):
        self.engine = engine
        self.node_cache_dir = node_cache_dir
        #: Adapters unloaded after an eviction, since the replica started.
        self.evictions = 0
        #: adapter id -> the state of an adapter loaded in the engine (also while it
        #: drains after an eviction)
        self._residents: dict[str, _AdapterState] = {}
        #: adapter id -> the task that unloads it once its requests have ended
        self._unloads: dict[str, asyncio.Task] = {}
        #: serializes loading and unloading one adapter
        self._locks: dict[str, asyncio.Lock] = {}
        #: requests in flight that name no adapter
        self._base_users = 0

    async def load(self, record: AdapterRecord, ref: AdapterRef) -> ResidentAdapter:
        """Makes `record` (the engine's `ref` of it) resident, loading it into the
        engine unless it still is there (evicted and draining, or outside Serve,
        where this runs for every request)."""
        lock = self._locks.setdefault(ref.adapter_id, asyncio.Lock())
        async with lock:
            state = self._residents.get(ref.adapter_id)
            if state is not None and state.ref.int_id == ref.int_id:
                # Still in the engine: use it, and keep it.
                state.evicted = False
                return ResidentAdapter(state, self._evict)
            start = time.perf_counter()
            try:
                if self.node_cache_dir is not None:
                    local = await asyncio.to_thread(local_copy, record, self.node_cache_dir)
                    ref = replace(ref, path=str(local))
                await self.engine.load_adapter(ref)
            except BaseException:
                obs.adapter_loaded(ref.adapter_id, time.perf_counter() - start, ok=False)
                raise
            obs.adapter_loaded(ref.adapter_id, time.perf_counter() - start, ok=True)
            obs.set_resident(obs.replica_id(), ref.adapter_id, True)
            state = self._residents[ref.adapter_id] = _AdapterState(ref)
            return ResidentAdapter(state, self._evict)

    def acquire_base(self) -> None:
        """A request that names no adapter starts (counted for the routing report)."""
        self._base_users += 1

    def release_base(self) -> None:
        self._base_users -= 1

    def report(self, slots: int) -> RoutingReport:
        """The routing report, with `slots` adapter slots (0 in the base pool)."""
        active = {aid: st.users for aid, st in self._residents.items()
                  if st.users and not st.evicted}
        if self._base_users:
            active[""] = self._base_users
        return RoutingReport(
            at=time.time(),
            slots=slots,
            resident=tuple(sorted(aid for aid, st in self._residents.items()
                                  if not st.evicted)),
            active=active,
            ongoing=sum(active.values()) + sum(
                st.users for st in self._residents.values() if st.evicted),
        )

    def shutdown(self) -> None:
        """Cancels the pending unloads (the engine is shutting down)."""
        for task in list(self._unloads.values()):
            task.cancel()

    def _evict(self, state: _AdapterState) -> None:
        """Serve evicted the adapter: unload it once its requests have ended."""
        state.evicted = True
        adapter_id = state.ref.adapter_id
        if adapter_id not in self._unloads:
            self._unloads[adapter_id] = asyncio.create_task(self._unload_when_idle(state))

    async def _unload_when_idle(self, state: _AdapterState) -> None:
        adapter_id = state.ref.adapter_id
        try:
            # NOTE: no timeout: every request ends by its deadline
            # (serve.request_timeout_s), and unloading under a live request would
            # only make vLLM load it again from disk.
            await state.idle.wait()
            async with self._locks.setdefault(adapter_id, asyncio.Lock()):
                if not state.evicted or self._residents.get(adapter_id) is not state:
                    return  # loaded again while it drained
                del self._residents[adapter_id]
                await self.engine.unload_adapter(state.ref)
        except Exception:  # noqa: BLE001 - a background task: log, never raise into nothing
            logger.warning("unloading adapter %s failed", adapter_id, exc_info=True)
            return
        finally:
            if self._unloads.get(adapter_id) is asyncio.current_task():
                del self._unloads[adapter_id]
        self._evicted(adapter_id)

    def _evicted(self, adapter_id: str) -> None:
        self.evictions += 1
        obs.adapter_evicted(adapter_id)
        obs.set_resident(obs.replica_id(), adapter_id, False)
        logger.info("evicted adapter %s from replica %s", adapter_id, obs.replica_id())
