"""This generation replica's identity in Serve: its id and its rank."""

from __future__ import annotations

import os


def replica_id() -> str:
    """The Serve replica's unique id, or a process-local id outside Serve."""
    try:
        # Lazy: ray is heavy, and this also runs outside Serve (tests, tools).
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}"


def replica_rank() -> int | None:
    """The Serve replica's rank (0..N-1 in its deployment), or None outside Serve."""
    try:
        # Lazy: ray is heavy, and this also runs outside Serve (tests, tools).
        from ray import serve

        return serve.get_replica_context().rank.rank
    except Exception:
        return None
