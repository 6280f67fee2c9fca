"""Adapter-affine routing: the adapter named in the request body picks the replica.

Serve's model multiplexing routes on the `multiplexed_model_id` request
metadata, which a gRPC client would have to send as a header in addition to
the `adapter` field. This router (it runs inside Serve's proxy) reads the
adapter from the request body and sets the multiplexed model id itself, so
any client (grpcurl, another language) gets affinity without extra headers,
and without an extra deployment hop.

NOTE: this relies on two Ray Serve 2.60 internals: gRPC proxy requests reach
the router as a pickled `gRPCRequest` in `args[0]`, and the pending-request
indices are built in `_add_pending_request_to_indices`. If either changes the
router falls back to Serve's behaviour (the header still works, and the
hybridserve client always sends it). tests/integration/test_generation_serve.py
proves affinity through the real proxy.
"""

from __future__ import annotations

import logging
import pickle

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


class AdapterRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's power-of-two-choices router, with the model id taken from the body."""

    def _add_pending_request_to_indices(self, pending_request) -> None:
        metadata = pending_request.metadata
        if not metadata.multiplexed_model_id and getattr(metadata, "is_grpc_request", False):
            adapter = adapter_from_args(pending_request.args)
            if adapter:
                # Before indexing, so FIFO matching by model id sees it too.
                metadata.multiplexed_model_id = adapter
        super()._add_pending_request_to_indices(pending_request)
