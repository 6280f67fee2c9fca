"""The router reads the adapter from a gRPC request exactly as Serve's proxy sends it."""

import pickle

from hybridserve.generation.routing import adapter_from_args
from hybridserve.v1 import generation_pb2
from ray.serve._private.common import gRPCRequest


def test_adapter_from_pickled_grpc_request():
    req = generation_pb2.GenerateRequest(prompt="hi", adapter="tone@v1")
    args = (pickle.dumps(gRPCRequest(user_request_proto=req)),)
    assert adapter_from_args(args) == "tone@v1"


def test_no_adapter_or_foreign_payloads_route_like_serve():
    base = generation_pb2.GenerateRequest(prompt="hi")
    assert adapter_from_args((pickle.dumps(gRPCRequest(user_request_proto=base)),)) == ""
    other = generation_pb2.ListAdaptersRequest()
    assert adapter_from_args((pickle.dumps(gRPCRequest(user_request_proto=other)),)) == ""
    assert adapter_from_args((b"not a pickle",)) == ""
    assert adapter_from_args(()) == ""
    assert adapter_from_args(("a plain string arg",)) == ""


# -- slot-aware placement (rank_replicas) ---------------------------------------------

import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
from hybridserve.generation.routing import ReplicaView, SlotAwareRouter, rank_replicas  # noqa: E402


def _v(rid, adapters=(), active=None, slots=2, ongoing=None):
    active = dict(active or {})
    return ReplicaView(rid, frozenset(adapters), active, slots,
                       sum(active.values()) if ongoing is None else ongoing)


def test_an_adapter_goes_where_it_is_resident():
    replicas = [_v("r1", ["a"], {"a": 1}), _v("r2", [])]
    assert rank_replicas("a", replicas, spread_at=8)[0] == ["r1"]


def test_a_cold_adapter_packs_onto_the_fullest_replica_that_has_a_free_slot():
    replicas = [_v("empty", []), _v("one", ["x"], {"x": 1}), _v("full", ["y", "z"])]
    ranks = rank_replicas("new", replicas, spread_at=8)
    # Best fit: one free slot before two; the full replica only if it has an idle adapter.
    assert ranks[:2] == [["one"], ["empty"]]
    assert ranks[2] == ["full"]  # y and z are idle: evicting one costs no request


def test_a_hot_adapter_spreads_to_a_free_slot():
    hot = [_v("r1", ["a"], {"a": 8}), _v("r2", ["b"], {"b": 1})]
    assert rank_replicas("a", hot, spread_at=8)[0] == ["r2"]
    warm = [_v("r1", ["a"], {"a": 7}), _v("r2", ["b"], {"b": 1})]
    assert rank_replicas("a", warm, spread_at=8)[0] == ["r1"]


def test_busy_slots_make_the_request_wait_then_fall_back_to_the_least_loaded():
    busy = [_v("r1", ["a", "b"], {"a": 3, "b": 1}), _v("r2", ["c", "d"], {"c": 1, "d": 1})]
    assert rank_replicas("new", busy, spread_at=8, waited_s=0.1, max_wait_s=2) == []
    assert rank_replicas("new", busy, spread_at=8, waited_s=2.5, max_wait_s=2) == [["r2", "r1"]]


def test_the_base_pool_takes_base_requests_and_never_adapter_requests():
    replicas = [_v("base", slots=0), _v("lora", ["a"])]
    assert rank_replicas("", replicas, spread_at=8) == [["base"], ["lora"]]
    assert all("base" not in rank for rank in rank_replicas("a", replicas, spread_at=8))
    assert all("base" not in rank for rank in rank_replicas("b", replicas, spread_at=8,
                                                            waited_s=10))
    # Without a base pool, base requests go anywhere.
    assert rank_replicas("", [_v("r1"), _v("r2")], spread_at=8) == [["r1", "r2"]]


def _replica(rid, models=(), stats=None):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid),
                           multiplexed_model_ids=set(models), routing_stats=stats or {})


def _pending(adapter="", rid="req"):
    return SimpleNamespace(
        args=(), created_at=time.time(),
        metadata=SimpleNamespace(multiplexed_model_id=adapter, is_grpc_request=False,
                                 internal_request_id=rid),
        routing_context=SimpleNamespace(should_backoff=False))


@pytest.fixture
def router():
    r = SlotAwareRouter.__new__(SlotAwareRouter)  # the routing logic only; no Serve state
    r.initialize_state(spread_at=8, max_slot_wait_s=2.0)
    return r


async def test_a_burst_through_one_router_sticks_to_its_first_placement(router):
    """Before any replica reports the new adapter, this router's own placements
    count: the burst lands on one replica."""
    reported = {"at": time.time(), "slots": 1, "active": {}}
    replicas = [_replica("r1", stats=dict(reported)), _replica("r2", stats=dict(reported))]
    chosen = set()
    for i in range(6):
        pending = _pending("new@v1", f"q{i}")
        first_rank = (await router.choose_replicas(replicas, pending))[0]
        target = first_rank[0]
        router.on_request_routed(pending, target.replica_id, None)
        chosen.add(target.replica_id.unique_id)
        assert pending.routing_context.should_backoff
    assert len(chosen) == 1


async def test_reports_from_the_replicas_are_the_shared_view(router):
    # Another router's requests show in the replicas' reports: this router, which
    # routed nothing, still sees r1 holding `a` with its slot busy.
    now = time.time()
    replicas = [_replica("r1", ["a"], {"at": now, "slots": 1, "active": {"a": 3}}),
                _replica("r2", [], {"at": now, "slots": 1, "active": {}})]
    ranks = await router.choose_replicas(replicas, _pending("b@v1"))
    assert [r.replica_id.unique_id for r in ranks[0]] == ["r2"]
    views = {v.replica_id: v for v in router.views(replicas)}
    assert views["r1"].active == {"a": 3} and views["r1"].free_slots == 0
    # Completed requests leave this router's own view.
    pending = _pending("b@v1", "done")
    router.on_request_routed(pending, replicas[1].replica_id, None)
    assert router.views(replicas)[1].active == {"b@v1": 1}
    router.on_request_completed(replicas[1].replica_id, "done")
    assert router.views(replicas)[1].active == {}


async def test_ties_are_shuffled_so_idle_replicas_share_the_load(router):
    """Serve takes the first of equally short queues: each rank comes shuffled."""
    replicas = [_replica("r1", stats={"slots": 2}), _replica("r2", stats={"slots": 2})]
    firsts = set()
    for _ in range(64):
        ranks = await router.choose_replicas(replicas, _pending(""))
        assert len(ranks) == 1 and len(ranks[0]) == 2
        firsts.add(ranks[0][0].replica_id.unique_id)
    assert firsts == {"r1", "r2"}


async def test_a_placement_outlives_its_request_until_a_later_report(router):
    """The next request for an adapter finds it where it was loaded, although that
    replica's report does not show it yet; a report taken well after the placement
    is then the truth."""
    t = time.time()
    replicas = [_replica("r1", stats={"at": t - 0.5, "slots": 1}),
                _replica("r2", stats={"at": t - 0.5, "slots": 1})]
    pending = _pending("a@v1", "first")
    router.on_request_routed(pending, replicas[0].replica_id, None)
    router.on_request_completed(replicas[0].replica_id, "first")
    for _ in range(10):
        ranks = await router.choose_replicas(replicas, _pending("a@v1"))
        assert [r.replica_id.unique_id for r in ranks[0]] == ["r1"]
    # r1 reports it resident: still there. A report long after, without it: gone.
    replicas[0].routing_stats = {"at": t + 0.1, "slots": 1, "resident": ["a@v1"]}
    assert "a@v1" in router.views(replicas)[0].adapters
    replicas[0].routing_stats = {"at": t + 5, "slots": 1, "resident": []}
    assert "a@v1" not in router.views(replicas)[0].adapters


async def test_a_burst_routed_all_at_once_goes_to_one_replica(router):
    """Requests for a new adapter all being routed before any has reached a replica
    (no on_request_routed yet) still pick one replica first."""
    reported = {"at": time.time(), "slots": 1}
    replicas = [_replica("r1", stats=dict(reported)), _replica("r2", stats=dict(reported))]
    firsts = set()
    for i in range(8):
        ranks = await router.choose_replicas(replicas, _pending("new@v1", f"q{i}"))
        assert len(ranks[0]) == 1
        firsts.add(ranks[0][0].replica_id.unique_id)
    assert len(firsts) == 1


def test_a_grpc_client_routes_by_its_body_never_by_its_header():
    """The `multiplexed_model_id` header is read before the key is checked: a client
    with no key could otherwise place (and evict) adapters. The body's adapter is the
    one the replica loads, after authorizing it."""
    body = generation_pb2.GenerateRequest(prompt="hi", adapter="mine@v1")
    pending = SimpleNamespace(
        args=(pickle.dumps(gRPCRequest(user_request_proto=body)),),
        metadata=SimpleNamespace(multiplexed_model_id="victim@v1", is_grpc_request=True))
    assert SlotAwareRouter.adapter_of(pending) == "mine@v1"
    pending.args = (pickle.dumps(gRPCRequest(user_request_proto=generation_pb2.GenerateRequest(
        prompt="hi"))),)
    assert SlotAwareRouter.adapter_of(pending) == ""
    # A handle call (the gateway, after authorizing) keeps its id.
    handle_call = SimpleNamespace(args=(), metadata=SimpleNamespace(
        multiplexed_model_id="tone@v1", is_grpc_request=False))
    assert SlotAwareRouter.adapter_of(handle_call) == "tone@v1"
