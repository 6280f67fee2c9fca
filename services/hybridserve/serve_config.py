"""The Ray Serve config (`serveConfigV2`) of a cluster, from the typed config.

`hybridserve up` builds its apps in-process from a `HybridServeConfig`; on a
cluster, KubeRay's RayService hands Serve a config file instead. Both go
through the same builders in `hybridserve.app`: each application's
`import_path` names a builder that receives the typed config as its `args`.
`hybridserve serve-config -c hybridserve.yaml` prints this file, and the Helm
chart renders the same one from its `config` value (a test compares them).

Only the settings the config file sets travel in `args` (the platform's own
defaults fill in the rest where it runs), so the printed file is stable across
releases that only change a default.
"""

from __future__ import annotations

import copy
from typing import Any

from hybridserve import topology
from hybridserve.config import HybridServeConfig

def app_names(config: HybridServeConfig) -> list[str]:
    """The Serve applications a config deploys, in deployment order (the control
    plane always runs, first)."""
    return [*topology.ALWAYS_APPS, *config.serve.apps]


def serve_config(config: HybridServeConfig) -> dict[str, Any]:
    """The Serve config file (schema `ray.serve.schema.ServeDeploySchema`)."""
    given = config.model_dump(mode="json", exclude_unset=True)
    return {
        # A proxy on every node, so that a client may reach any node.
        "proxy_location": "EveryNode",
        "http_options": {"host": config.serve.grpc_host, "port": config.serve.http_port,
                         "request_timeout_s": config.serve.request_timeout_s},
        "grpc_options": {
            "port": config.serve.grpc_port,
            "grpc_servicer_functions": list(topology.GRPC_SERVICER_FUNCTIONS),
            "request_timeout_s": config.serve.request_timeout_s,
        },
        "applications": [
            {
                "name": name,
                # NOTE: Serve's gRPC proxy routes only to apps with a route prefix.
                "route_prefix": topology.app_named(name).route_prefix(),
                "import_path": topology.app_named(name).builder,
                "args": {"config": copy.deepcopy(given)},
            }
            for name in app_names(config)
        ],
    }


def render(config: HybridServeConfig) -> str:
    import yaml

    return yaml.safe_dump(serve_config(config), sort_keys=False)
