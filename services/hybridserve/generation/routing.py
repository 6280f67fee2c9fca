"""Adapter-affine routing: the adapter named in the request body picks the replica.

Serve's model multiplexing routes on the `multiplexed_model_id` request
metadata, which a gRPC client would have to send as a header in addition to
the `adapter` field. This router (it runs inside Serve's proxy) reads the
adapter from the request body and sets the multiplexed model id itself, so
any client (grpcurl, another language) gets affinity without extra headers,
and without an extra deployment hop.

It also closes a race in Serve's multiplexing: a replica reports the adapters
it holds to the controller, which broadcasts them to routers, 0.1-0.3 s after
a load. Until then a second request for the same adapter looks unplaced and
can land on (and load the adapter into) another replica: a burst for a new
adapter would load it everywhere. The router therefore remembers where it
last sent each adapter and prefers that replica while the controller's view
has no placement for it.

NOTE: this relies on Ray Serve 2.60 internals: gRPC proxy requests reach
the router as a pickled `gRPCRequest` in `args[0]`, and the pending-request
indices are built in `_add_pending_request_to_indices`. If either changes the
router falls back to Serve's behaviour (the header still works, and the
hybridserve client always sends it). tests/integration/test_generation_serve.py
proves affinity through the real proxy.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

logger = logging.getLogger(__name__)


def adapter_from_args(args) -> str:
    """The `adapter` field of a pickled gRPC request, or "" if there is none."""
    if not args or not isinstance(args[0], (bytes, bytearray)):
        return ""
    try:
        wrapped = pickle.loads(args[0])
    except Exception:  # not a request we understand: route as Serve would
        return ""
    proto = getattr(wrapped, "user_request_proto", None)
    adapter = getattr(proto, "adapter", "")
    return adapter if isinstance(adapter, str) else ""


#: How long a placement this router made is trusted without the controller
#: confirming it, and how many it remembers.
_HINT_TTL_S = 10.0
_MAX_HINTS = 4096


class AdapterRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's power-of-two-choices router, with the model id taken from the
    body and this router's own recent placements used until Serve's catch up."""

    @property
    def _placed(self) -> OrderedDict:
        """adapter id -> (replica id, monotonic time) of this router's last placement."""
        if "_placed_state" not in self.__dict__:
            self._placed_state = OrderedDict()
        return self._placed_state

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            self._placed[adapter] = (replica_id, time.monotonic())
            self._placed.move_to_end(adapter)
            while len(self._placed) > _MAX_HINTS:
                self._placed.popitem(last=False)

    def apply_multiplex_routing(self, pending_request=None):
        candidates = super().apply_multiplex_routing(pending_request)
        if pending_request is None:
            return candidates
        adapter = pending_request.metadata.multiplexed_model_id
        if self._multiplexed_model_id_to_replica_ids.get(adapter):
            return candidates  # Serve knows where it lives
        placed = self._placed.get(adapter)
        if placed is None:
            return candidates
        replica_id, at = placed
        ctx = pending_request.routing_context
        fresh = time.monotonic() - at < _HINT_TTL_S
        # Only within Serve's own matching window, so a busy replica cannot
        # hold the request forever: after it Serve's fallbacks apply.
        matching = time.time() - ctx.multiplexed_start_matching_time < self._multiplexed_matching_timeout
        if fresh and matching and replica_id in self._replica_id_set:
            return {replica_id}
        return candidates

    def _add_pending_request_to_indices(self, pending_request) -> None:
        metadata = pending_request.metadata
        if not metadata.multiplexed_model_id and getattr(metadata, "is_grpc_request", False):
            adapter = adapter_from_args(pending_request.args)
            if adapter:
                # Before indexing, so FIFO matching by model id sees it too.
                metadata.multiplexed_model_id = adapter
        super()._add_pending_request_to_indices(pending_request)
