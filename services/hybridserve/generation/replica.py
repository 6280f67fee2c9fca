"""This generation replica's rank in Serve (its id: `hybridserve.observability.replica_id`)."""

from __future__ import annotations


def replica_rank() -> int | None:
    """The Serve replica's rank (0..N-1 in its deployment), or None outside Serve."""
    try:
        # Lazy: ray is heavy, and this also runs outside Serve (tests, tools).
        from ray import serve

        return serve.get_replica_context().rank.rank
    except Exception:
        return None
