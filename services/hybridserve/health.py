"""grpc.health.v1 `Watch`, bounded, for every servicer that answers health.

Under Serve an open stream holds one of its replica's `max_ongoing_requests`, so a
Watch that never ends takes a request slot for good: a few health watchers
would then starve real traffic. The stream ends after `serve.health_watch_s`
with OK, and the gRPC health client watches again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

#: How often a health Watch re-checks the status.
_WATCH_POLL_S = 2.0


async def watch_health(check, service: str, duration_s: float,
                       poll_s: float = _WATCH_POLL_S) -> AsyncIterator[int]:
    """grpc.health.v1 Watch, bounded: yields `await check(service)` now and whenever it
    changes, for `duration_s`, then returns."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s
    last = None
    while True:
        status = await check(service)
        if status != last:
            yield status
            last = status
        left = end - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(poll_s, left))
