"""`hybridserve up` refuses a taken port before starting anything."""

import socket

import pytest

from hybridserve.config import HybridServeConfig
from hybridserve.errors import FailedPrecondition
from hybridserve.platform import check_ports_free


def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = HybridServeConfig(data_dir=tmp_path, serve={"grpc_port": port})
        with pytest.raises(FailedPrecondition) as e:
            check_ports_free(cfg)
    assert f"gRPC port {port}" in e.value.message and "--port" in e.value.message


def test_free_ports_pass(tmp_path):
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    # Every port explicit: a platform elsewhere on this machine (the integration
    # tests' own) may hold a default one.
    cfg = HybridServeConfig(data_dir=tmp_path, serve={"grpc_port": ports[0], "http_port": ports[1]},
                            observability={"metrics_export_port": ports[2]})
    check_ports_free(cfg)


def test_the_cluster_environment_is_set_only_while_ray_starts(monkeypatch):
    from hybridserve.platform import cluster_environment

    monkeypatch.delenv("HS_TEST_A", raising=False)
    monkeypatch.setenv("HS_TEST_B", "callers")
    with cluster_environment({"HS_TEST_A": "0", "HS_TEST_B": "ours"}):
        import os

        assert os.environ["HS_TEST_A"] == "0"  # what ray.init's processes inherit
        assert os.environ["HS_TEST_B"] == "callers"  # the caller's own setting wins
    assert "HS_TEST_A" not in os.environ  # later subprocesses of this one do not get it
    assert os.environ["HS_TEST_B"] == "callers"
