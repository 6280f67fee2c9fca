"""Slot-aware adapter routing, on Serve's public request-router API.

A generation replica batches at most `engine.max_loras` distinct adapters. A
request for an adapter past those slots waits inside vLLM, where routing cannot
see it, and it slows every other request there (the engine swaps adapters in
and out of its slots step by step). The router keeps each replica's working set
within its slots:

- an adapter already on a replica goes there (affinity); when it is hot (its
  requests fill its replicas past `spread_at` each), replicas with a free slot
  come first, so it spreads;
- a cold adapter goes to the replica with the fewest free slots that still has
  one (best fit: cold adapters pack together and whole replicas stay free for
  hot ones), else to one whose resident adapter is idle (evicting it costs no
  request anything);
- when every slot of every replica is busy, the request waits in the router, up
  to `max_slot_wait_s`, where Serve counts it as queued (the autoscaler sees it),
  and only then goes to the least loaded replica;
- requests with no adapter prefer the base pool's replicas (LoRA off), and
  adapter requests never go there.

What a replica holds is shared knowledge: each replica reports its slots, its
role, its resident adapters and the requests in flight per adapter (a
`RoutingReport`, through `record_routing_stats`), and Serve sends those reports and the replicas'
multiplexed model ids to every router (each proxy and each gateway replica). A
router adds only what it routed itself that the reports may not show yet: its
requests in flight since a replica's last report, and where it placed each
adapter until a report taken `_HINT_GRACE_S` after that placement arrives (the
load itself takes a moment). So a burst for a new adapter through one router
loads it on one replica, and the next request for it finds it there.

Built on `ray.serve.request_router` (RequestRouter, PendingRequest,
RunningReplica) and `RequestRouterConfig`. What the public API did not allow:

- reading the adapter of a gRPC request: the proxy passes the request pickled in
  Serve's private `gRPCRequest` (`adapter_from_args`). The `multiplexed_model_id`
  header of a gRPC client is ignored: it is read before the key is checked.
- stopping the backoff loop from spinning: `routing_context.should_backoff` is
  set on every choice (a public dataclass field, but not documented).

The placement logic (`rank_replicas`) is a pure function, unit-tested on its own
(tests/unit/test_routing.py); tests/integration proves it through the real proxy.
"""

from __future__ import annotations

import logging
import pickle
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from hybridserve.generation.residency import RoutingReport

logger = logging.getLogger(__name__)

#: Defaults of the router's kwargs (RequestRouterConfig.request_router_kwargs).
DEFAULT_SPREAD_AT = 8
DEFAULT_MAX_SLOT_WAIT_S = 2.0
#: In-flight requests a router remembers (the oldest are forgotten past it).
_MAX_ROUTED = 10_000
#: A router trusts its own placement of an adapter until the replica reports from at
#: least this long after it (by then the load has finished and shows in the report).
_HINT_GRACE_S = 2.0
#: Placements a router remembers.
_MAX_PLACED = 4096


def adapter_from_args(args) -> str:
    """The `adapter` field of a pickled gRPC request, or "" if there is none."""
    if not args or not isinstance(args[0], (bytes, bytearray)):
        return ""
    try:
        wrapped = pickle.loads(args[0])
    except Exception:  # not a request we understand: no adapter
        return ""
    proto = getattr(wrapped, "user_request_proto", None)
    adapter = getattr(proto, "adapter", "")
    return adapter if isinstance(adapter, str) else ""


@dataclass(frozen=True)
class ReplicaView:
    """What routing knows of one replica."""

    replica_id: str
    #: Adapters in its working set (Serve's multiplexed model ids plus this
    #: router's recent placements).
    adapters: frozenset[str] = frozenset()
    #: Requests in flight per adapter ("" = no adapter).
    active: Mapping[str, int] = field(default_factory=dict)
    #: Adapters one batch can hold (`engine.max_loras`); 0 = LoRA off (base pool).
    slots: int = 1
    #: Requests in flight in all.
    ongoing: int = 0

    @property
    def base_only(self) -> bool:
        return self.slots == 0

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - len(self.adapters))

    def idle_adapters(self) -> list[str]:
        return [a for a in self.adapters if not self.active.get(a)]


def rank_replicas(adapter: str, replicas: Iterable[ReplicaView], *, spread_at: int,
                  waited_s: float = 0.0, max_wait_s: float = DEFAULT_MAX_SLOT_WAIT_S
                  ) -> list[list[str]]:
    """Replica ids in ranks of preference for a request (first rank first; Serve picks
    the least loaded replica with room within a rank). An empty list means: wait."""
    replicas = list(replicas)
    if not adapter:
        base = [r for r in replicas if r.base_only]
        lora = [r for r in replicas if not r.base_only]
        return [_ids(rank) for rank in (base, lora) if rank]
    lora = [r for r in replicas if not r.base_only]
    holders = [r for r in lora if adapter in r.adapters]
    free = sorted((r for r in lora if adapter not in r.adapters and r.free_slots),
                  key=lambda r: (r.free_slots, r.ongoing))
    # Best fit: the replicas with the fewest free slots first, each count its own rank.
    free_ranks: list[list[ReplicaView]] = []
    for r in free:
        if free_ranks and free_ranks[-1][0].free_slots == r.free_slots:
            free_ranks[-1].append(r)
        else:
            free_ranks.append([r])
    evictable = [r for r in lora if adapter not in r.adapters and not r.free_slots
                 and r.idle_adapters()]
    hot = bool(holders) and all(r.active.get(adapter, 0) >= spread_at for r in holders)
    ranks = ([*free_ranks, holders] if hot else [holders, *free_ranks]) + [evictable]
    out = [_ids(rank) for rank in ranks if rank]
    if waited_s >= max_wait_s:
        # Every slot stayed busy: the least loaded replica takes it (and queues it).
        rest = sorted((r for r in lora if r not in holders and r not in free
                       and r not in evictable), key=lambda r: r.ongoing)
        if rest:
            out.append(_ids(rest))
    return out


def _ids(rank: Iterable[ReplicaView]) -> list[str]:
    return [r.replica_id for r in rank]


@dataclass
class _Routed:
    replica_id: str
    adapter: str
    at: float


class SlotAwareRouter(RequestRouter):
    """See the module docstring. Kwargs (`request_router_kwargs`): spread_at,
    max_slot_wait_s."""

    def initialize_state(self, spread_at: int = DEFAULT_SPREAD_AT,
                         max_slot_wait_s: float = DEFAULT_MAX_SLOT_WAIT_S, **_):
        self.spread_at = spread_at
        self.max_slot_wait_s = max_slot_wait_s
        #: internal request id -> what this router routed and is still in flight
        self._routed: dict[str, _Routed] = {}
        #: (replica id, adapter) -> when this router last placed the adapter there
        self._placed: dict[tuple[str, str], float] = {}

    def _state(self) -> dict[str, _Routed]:
        # initialize_state runs only with kwargs configured; default it here.
        if "_routed" not in self.__dict__:
            self.initialize_state()
        return self._routed

    @staticmethod
    def adapter_of(pending_request: PendingRequest | None) -> str:
        if pending_request is None:
            return ""
        if getattr(pending_request.metadata, "is_grpc_request", False):
            # NOTE: a gRPC client's request goes by its body, never by the
            # `multiplexed_model_id` header: the header is read before any key is
            # checked, so trusting it would let anyone place adapters on replicas
            # (and push others' adapters out of their slots). The body's adapter is
            # the one the replica loads, and only after authorizing it.
            return adapter_from_args(pending_request.args)
        # A Serve handle call: the gateway set the id itself, after authorizing.
        return pending_request.metadata.multiplexed_model_id or ""

    def views(self, replicas: Iterable[RunningReplica]) -> list[ReplicaView]:
        """Each replica's last report, plus what this router routed there since."""
        routed = self._state()
        out = []
        for r in replicas:
            report = RoutingReport.from_wire(r.routing_stats)
            rid = r.replica_id.unique_id
            reported_at = report.at
            active = dict(report.active)
            adapters = (set(r.multiplexed_model_ids) | set(report.resident)
                        | {a for a in active if a})
            ongoing = report.ongoing
            for (where, adapter), at in self._placed.items():
                if where == rid and at + _HINT_GRACE_S > reported_at:
                    adapters.add(adapter)
            for item in routed.values():
                if item.replica_id == rid and item.at > reported_at:
                    active[item.adapter] = active.get(item.adapter, 0) + 1
                    ongoing += 1
                    if item.adapter:
                        adapters.add(item.adapter)
            out.append(ReplicaView(rid, frozenset(adapters), active, report.slots, ongoing))
        return out

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        adapter = self.adapter_of(pending_request)
        if pending_request is not None:
            # Ours are complete ranks each time: back off between attempts.
            pending_request.routing_context.should_backoff = True
        waited = time.time() - pending_request.created_at if pending_request else 0.0
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        views = self.views(candidate_replicas)
        ranks = rank_replicas(adapter, views, spread_at=self.spread_at, waited_s=waited,
                              max_wait_s=self.max_slot_wait_s)
        if adapter and ranks and not any(adapter in v.adapters for v in views):
            # A new adapter: one replica first, and remembered now. Requests for it
            # being routed at the same moment (a burst) then see it placed there,
            # instead of each picking its own replica before any has been routed.
            first = ranks[0]
            least = min(v.ongoing for v in views if v.replica_id in first)
            chosen = random.choice([v.replica_id for v in views
                                    if v.replica_id in first and v.ongoing == least])
            ranks = [[chosen], [i for i in first if i != chosen], *ranks[1:]]
            self._remember(chosen, adapter, time.time())
        out = []
        for rank in (r for r in ranks if r):
            # Serve takes the shortest queue within a rank and the first on a tie:
            # shuffled, ties (idle replicas) spread the load.
            chosen = [by_id[i] for i in rank]
            random.shuffle(chosen)
            out.append(chosen)
        return out

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        routed = self._state()
        internal = pending_request.metadata.internal_request_id
        adapter, now = self.adapter_of(pending_request), time.time()
        routed[internal] = _Routed(replica_id.unique_id, adapter, now)
        while len(routed) > _MAX_ROUTED:  # completions lost (a dead replica): forget the oldest
            routed.pop(next(iter(routed)))
        if adapter:
            self._remember(replica_id.unique_id, adapter, now)

    def _remember(self, replica: str, adapter: str, at: float) -> None:
        self._state()  # initialized
        placed = self._placed
        placed.pop((replica, adapter), None)
        placed[(replica, adapter)] = at
        while len(placed) > _MAX_PLACED:
            placed.pop(next(iter(placed)))

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self._state().pop(internal_request_id, None)


#: The router's earlier name: deployments recorded under it (a running cluster being
#: upgraded) still resolve.
AdapterRouter = SlotAwareRouter
