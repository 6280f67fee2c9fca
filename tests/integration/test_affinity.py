"""Adapter affinity and LRU eviction across 2 real replicas (1 adapter each)."""

from __future__ import annotations

import pytest
from hybridserve.client import HybridServeClient

from .conftest import AFFINITY_APP, replica_stats

pytestmark = pytest.mark.integration


def _replica(client, adapter_id: str) -> str:
    _, _, final = client.generate("hello there", adapter=adapter_id, max_tokens=4, temperature=0)
    assert final.adapter == adapter_id
    return final.replica_id


def test_requests_stick_to_the_replica_holding_the_adapter_and_lru_evicts(platform):
    a, b, c = platform.ids["alpha"], platform.ids["beta"], platform.ids["gamma"]
    with HybridServeClient(platform.address, application=AFFINITY_APP) as client:
        ra = _replica(client, a)
        # Affinity: every later request for A lands where A lives.
        assert {_replica(client, a) for _ in range(8)} == {ra}
        # B goes to the replica with no adapter: the other one.
        rb = _replica(client, b)
        assert rb != ra
        for _ in range(4):
            assert _replica(client, a) == ra
            assert _replica(client, b) == rb

        # Each replica reports exactly the adapter it serves.
        sa, sb = replica_stats(AFFINITY_APP, a, ra), replica_stats(AFFINITY_APP, b, rb)
        assert sa["resident_adapters"] == [a]
        assert sb["resident_adapters"] == [b]
        evictions_before = {ra: sa["evictions"], rb: sb["evictions"]}

        # C must evict A or B, whichever replica it lands on (1 adapter each).
        rc = _replica(client, c)
        assert rc in (ra, rb)
        sc = replica_stats(AFFINITY_APP, c, rc)
        assert sc["resident_adapters"] == [c]
        assert sc["evictions"] == evictions_before[rc] + 1
        # C now sticks to its replica too.
        assert {_replica(client, c) for _ in range(4)} == {rc}
