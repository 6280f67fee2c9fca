"""The topology is declared once (`hybridserve.topology`) and everything reads it: the
generated stubs, the servicers, the deployments, the serve config and the chart agree."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

from hybridserve import topology
from hybridserve.config import HybridServeConfig

ROOT = Path(__file__).resolve().parents[2]


def test_topology_imports_the_standard_library_only():
    # The SDK imports it, and `pip install hybridserve` has no server side.
    code = ("import sys; before = set(sys.modules); import hybridserve.topology; "
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert "hybridserve.topology" in loaded
    foreign = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names
               and m not in ("hybridserve", "hybridserve.topology")]
    assert foreign == []


def test_every_declared_service_and_servicer_function_exists():
    for fn in topology.GRPC_SERVICER_FUNCTIONS:
        module, _, attr = fn.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), fn
    for app in topology.APPS:
        assert set(app.calls) <= {a.name for a in topology.APPS}, app.name
    # Every app but the HTTP API serves a gRPC service; the HTTP API is no gRPC app.
    assert [a for a in topology.APPS if a.is_http] == [topology.OPENAI]
    assert topology.OPENAI.service == "" and not any("openai" in f for f in
                                                       topology.GRPC_SERVICER_FUNCTIONS)
    for app in topology.GRPC_APPS:
        grpc_module = importlib.import_module(f"hybridserve.v1.{app.proto}_pb2")
        assert grpc_module.DESCRIPTOR.services_by_name[app.service_name].full_name == app.service
        assert set(app.calls) <= {a.name for a in topology.APPS}, app.name
    names = [a.name for a in topology.APPS]
    assert len(set(names)) == len(names)
    assert topology.GRPC_SERVICER_FUNCTIONS[0] == topology.PROXY_PATCH_FUNCTION


def test_servicers_serve_the_declared_services():
    from hybridserve.generation.servicer import GenerationServicer
    from hybridserve.rag.servicer import RagServicer
    from hybridserve.rerank.servicer import RerankServicer
    from hybridserve.retrieval.servicer import RetrievalServicer
    from hybridserve.tenancy.servicer import AdminServicer

    servicers = {topology.GENERATION: GenerationServicer, topology.RETRIEVAL: RetrievalServicer,
                 topology.RERANK: RerankServicer, topology.ADMIN: AdminServicer,
                 topology.RAG: RagServicer}
    assert set(servicers) == set(topology.GRPC_APPS)
    for app, servicer in servicers.items():
        assert servicer.grpc_service == app.service, app.name


def test_deployments_and_builders_are_named_by_the_topology():
    from hybridserve import app

    cfg = HybridServeConfig()
    built = {topology.GENERATION: app.generation_deployment(cfg),
             topology.RETRIEVAL: app.retrieval_deployment(cfg),
             topology.RERANK: app.rerank_deployment(cfg),
             topology.ADMIN: app.admin_deployment(cfg),
             topology.RAG: app.rag_deployment(cfg),
             topology.OPENAI: app.openai_deployment(cfg)}
    assert set(built) == set(topology.APPS)
    for declared, deployment in built.items():
        assert deployment.name == declared.ingress, declared.name
        module, attr = declared.builder.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), declared.builder
    assert app.embedder_deployment(cfg).name == topology.EMBEDDER_DEPLOYMENT
    assert topology.RETRIEVAL.deployments == ("RetrievalService", topology.EMBEDDER_DEPLOYMENT)
    assert app.grpc_options(cfg).grpc_servicer_functions == list(topology.GRPC_SERVICER_FUNCTIONS)


def test_config_accepts_the_optional_apps_and_deploys_the_control_plane_first():
    from hybridserve.serve_config import app_names, serve_config

    assert HybridServeConfig().serve.apps == topology.OPTIONAL_APPS == (
        "generation", "retrieval", "rerank", "rag", "openai")
    assert topology.ALWAYS_APPS == ("admin",)
    cfg = HybridServeConfig.model_validate({"serve": {"apps": ["rag", "generation"]}})
    assert app_names(cfg) == ["admin", "rag", "generation"]
    doc = serve_config(cfg)
    assert [a["import_path"] for a in doc["applications"]] == [
        "hybridserve.app:admin_app", "hybridserve.app:rag_app", "hybridserve.app:generation_app"]
    assert [a["route_prefix"] for a in doc["applications"]] == ["/admin", "/rag", "/generation"]
    # The HTTP API sits where OpenAI's clients look: base URL http://host:port/v1.
    both = serve_config(HybridServeConfig.model_validate({"serve": {"apps": ["openai"]}}))
    assert [a["route_prefix"] for a in both["applications"]] == ["/admin", "/v1"]
    assert topology.OPENAI.route_prefix("openai-smol") == "/openai-smol/v1"
    # Only its ingress is reached through Serve's HTTP proxy (serve_patches.http_routes_only).
    assert topology.HTTP_INGRESSES == ("OpenAIIngress",)
    assert doc["grpc_options"]["grpc_servicer_functions"] == [
        "hybridserve.serve_patches.add_to_proxy",
        "hybridserve.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server",
        "hybridserve.v1.retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server",
        "hybridserve.v1.rerank_pb2_grpc.add_RerankServiceServicer_to_server",
        "hybridserve.v1.admin_pb2_grpc.add_AdminServiceServicer_to_server",
        "hybridserve.v1.rag_pb2_grpc.add_RagServiceServicer_to_server",
        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    ]


def test_the_chart_lists_the_declared_servicer_functions():
    # Helm cannot read Python: the chart's serveConfigV2 keeps its own copy
    # (tests/integration/test_k8s.py compares the whole rendered file).
    helpers = (ROOT / "helm" / "hybridserve" / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'"grpc_servicer_functions" \(list(.*?)\)\)', helpers, re.S).group(1)
    assert tuple(re.findall(r'"([^"]+)"', block)) == topology.GRPC_SERVICER_FUNCTIONS
    assert f'prepend (required "config.serve.apps is required" $serve.apps) ' \
           f'"{topology.ADMIN.name}"' in helpers


def test_the_sdk_sends_the_declared_metadata():
    from hybridserve.client import HybridServeClient

    c = HybridServeClient.__new__(HybridServeClient)
    c.api_key = "hst_x"
    assert c._md(topology.RAG.name, timeout=1.5) == [
        (topology.APPLICATION_HEADER, "rag"), (topology.AUTHORIZATION_HEADER, "Bearer hst_x"),
        (topology.TIMEOUT_HEADER, "1500")]
    assert (topology.APPLICATION_HEADER, topology.AUTHORIZATION_HEADER, topology.TIMEOUT_HEADER) \
        == ("application", "authorization", "hybridserve-timeout-ms")
