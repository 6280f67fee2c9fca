"""The engine-load sampler: a generation replica's queue (waiting, running, batch
capacity) reported to the engine-load gauges while the replica runs."""

from __future__ import annotations

import asyncio
import logging

from hybridserve import observability as obs
from hybridserve.generation.engine import Engine

logger = logging.getLogger(__name__)


class EngineLoadSampler:
    """Samples `engine.stats()` into the gauges every `interval_s` once started.

    Args:
        engine: the replica's engine.
        capacity: the requests one batch can hold (`engine.max_num_seqs`).
        interval_s: time between samples (`observability.engine_stats_interval_s`).
    """

    def __init__(self, engine: Engine, *, capacity: int, interval_s: float):
        self.engine = engine
        self.capacity = capacity
        self.interval_s = interval_s
        #: The sampling loop while it runs, else None.
        self.task: asyncio.Task | None = None

    def sample(self) -> None:
        """Reports the engine's queue (waiting, running, batch size) to the gauges."""
        stats = self.engine.stats()
        obs.set_engine_load(
            obs.replica_id(),
            waiting=stats.waiting_requests,
            running=stats.running_requests,
            capacity=self.capacity,
        )

    def start(self) -> None:
        """Starts the sampling loop (on the running event loop)."""
        if self.task is None:
            self.task = asyncio.create_task(self._sample_forever())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _sample_forever(self) -> None:
        while True:  # cancelled by stop()
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a metrics sample must never end the loop
                logger.warning("sampling the engine load failed", exc_info=True)
            await asyncio.sleep(self.interval_s)
