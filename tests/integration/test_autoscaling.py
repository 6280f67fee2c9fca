"""Generation autoscales on local Ray: under bounded load 1 -> 2 replicas, and back to
1 afterwards, with no request failing on the way up or down (a replica that is
being removed finishes its streams first). The replica count over time is printed.
"""

from __future__ import annotations

import threading
import time

import pytest
from hybridserve.client import HybridServeClient

pytestmark = pytest.mark.integration

APP = "autoscale"
LONG_PROMPT = "once upon a time there was"
#: Bounds: no phase runs longer than this, and the load generators stop with it.
PHASE_S = 300
MAX_REQUESTS = 4000


def _running() -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments["GenerationService"]
    return dep.replica_states.get("RUNNING", 0)


class Load:
    """`n` concurrent streams in a loop, until stopped; bounded by MAX_REQUESTS."""

    def __init__(self, address: str):
        self.address = address
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = 0
        self.errors: list[str] = []
        self.replicas: set[str] = set()
        self.threads: list[threading.Thread] = []

    def _loop(self):
        with HybridServeClient(self.address, application=APP) as c:
            while not self.stop.is_set():
                with self.lock:
                    if self.done >= MAX_REQUESTS:
                        return
                try:
                    final = c.generate(LONG_PROMPT, max_tokens=300, temperature=0, timeout=120)[2]
                    with self.lock:
                        self.done += 1
                        self.replicas.add(final.replica_id)
                except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the test
                    with self.lock:
                        self.errors.append(repr(e)[:300])

    def start(self, n: int) -> Load:
        for _ in range(n):
            t = threading.Thread(target=self._loop, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)
        assert not any(t.is_alive() for t in self.threads), "a load stream hung"


def _wait(predicate, what: str, timeline: list, t0: float) -> None:
    """Polls the replica count each second (bounded), recording each change."""
    start = time.monotonic()
    while time.monotonic() - start < PHASE_S:
        n = _running()
        if not timeline or timeline[-1][1] != n:
            timeline.append((round(time.monotonic() - t0, 1), n))
        if predicate(n):
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; replicas over time: {timeline}")


def test_generation_scales_up_under_load_and_back_down(platform, room_for_two_engines):
    from hybridserve.app import build_generation_app
    from hybridserve.config import AutoscalingConfig
    from ray import serve

    cfg = platform.main.model_copy(deep=True)
    cfg.engine.enforce_eager = True  # a new replica starts in seconds, not minutes
    # The session's replicas hold every logical CPU of this 2-core machine.
    cfg.generation.cpus_per_replica = 0.01
    cfg.generation.autoscaling = AutoscalingConfig(
        min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=0,
        downscale_delay_s=5, look_back_period_s=12)
    serve.run(build_generation_app(cfg), name=APP, route_prefix=f"/{APP}")
    timeline: list[tuple[float, int]] = []
    t0 = time.monotonic()
    try:
        assert _running() == 1
        # Up: 12 streams against a target of 2 per replica.
        heavy = Load(platform.address).start(12)
        try:
            _wait(lambda n: n == 2, "a second replica", timeline, t0)
            # The new replica takes traffic too.
            deadline = time.monotonic() + PHASE_S
            while len(heavy.replicas) < 2 and time.monotonic() < deadline:
                time.sleep(1)
        finally:
            heavy.end()
        assert len(heavy.replicas) == 2, heavy.replicas
        # Down: one stream keeps running through the scale-down, and must not fail.
        light = Load(platform.address).start(1)
        try:
            _wait(lambda n: n == 1, "the scale-down to one replica", timeline, t0)
            time.sleep(3)  # requests go on after the removal
        finally:
            light.end()
        print(f"replicas over time (s, running): {timeline}; requests: heavy {heavy.done}, "
              f"light {light.done}")
        assert not heavy.errors and not light.errors, (heavy.errors + light.errors)[:5]
        assert [n for _, n in timeline] == [1, 2, 1], timeline
        assert light.done > 0
    finally:
        serve.delete(APP)
