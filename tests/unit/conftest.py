"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from hybridserve.observability import metrics as m

from tests.unit.fakes import FakeMetric


@pytest.fixture
def fake(monkeypatch) -> dict[str, FakeMetric]:
    """Swaps the process metrics registry for one that records into FakeMetrics
    (by metric name)."""
    made: dict[str, FakeMetric] = {}

    def factory(spec):
        made[spec.name] = FakeMetric(spec)
        return made[spec.name]

    monkeypatch.setattr(m, "_REGISTRY", m.Registry(factory, refresh_gauges=False))
    return made
