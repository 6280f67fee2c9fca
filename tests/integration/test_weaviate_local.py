"""`hybridserve up`'s own weaviate-server: started on loopback with its data under
<data_dir>/weaviate, stopped on shutdown; clear errors when it cannot start."""

from __future__ import annotations

import socket

import pytest
from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition
from hybridserve.platform import start_weaviate

pytestmark = pytest.mark.integration


def _free_port(limit: int = 55000) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < limit:
            return port


def test_local_server_persists_under_the_data_dir(tmp_path):
    cfg = HybridServeConfig(data_dir=tmp_path / "data",
                            weaviate={"http_port": _free_port(), "grpc_port": _free_port()})
    server = start_weaviate(cfg, progress=lambda m: None)
    try:
        assert server is not None and server.running()
        with socket.create_connection(("127.0.0.1", cfg.weaviate.http_port), timeout=5):
            pass
        with pytest.raises(FailedPrecondition, match="in use"):
            start_weaviate(cfg, progress=lambda m: None)  # a second one on the same ports
    finally:
        server.stop()
    assert not server.running()
    assert (cfg.data_dir / "weaviate").is_dir() and any((cfg.data_dir / "weaviate").iterdir())


def test_external_url_starts_nothing(tmp_path):
    cfg = HybridServeConfig(data_dir=tmp_path, weaviate={"url": "http://127.0.0.1:1"})
    assert start_weaviate(cfg, progress=lambda m: None) is None


def test_missing_binary_says_how_to_get_it(tmp_path):
    cfg = HybridServeConfig(data_dir=tmp_path, weaviate={"binary": str(tmp_path / "nope")})
    with pytest.raises(FailedPrecondition) as e:
        start_weaviate(cfg, progress=lambda m: None)
    for hint in ("scripts/install.sh", "go install github.com/weaviate/weaviate", "weaviate.url"):
        assert hint in e.value.message
