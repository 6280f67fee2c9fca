"""The Helm chart and the LoRAAdapter controller against a real kube-apiserver.

etcd and kube-apiserver v1.37.2 run on loopback (testkit/kube.py),
with KubeRay's RayService CRD, the Prometheus Operator's CRDs and our LoRAAdapter
CRD installed, so the API server validates every object the chart renders,
custom resources included. The real `helm` binary lints, renders, installs,
upgrades and uninstalls every `ci/` scenario. The controller runs as its own
process against that API server and the session's real platform (Serve, vLLM,
the tenancy store). Nothing else of Kubernetes runs, so no Pod ever starts; a
small stand-in for the Job controller runs the tenants hook Job's own command
against the platform and reports the Job complete, as a kubelet would.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from testkit.kube import KubeTestCluster, missing_tools, missing_tools_hint

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "hybridserve"
SCENARIOS = sorted(p.stem.removesuffix("-values") for p in (CHART / "ci").glob("*-values.yaml"))
ADMIN_KEY = "hsa_ci0000000001_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
GROUP, VERSION, PLURAL = "hybridserve.dev", "v1alpha1", "loraadapters"


def _crd_files() -> list[Path]:
    """KubeRay's and the Prometheus Operator's CRDs: the reference copies in
    ../shared when present, else the ones scripts/install_k8s.sh fetched."""
    from testkit.kube import tool

    for base in (ROOT.parent / "shared", tool("helm").parent.parent / "crds"):
        files = [base / "kuberay" / "ray.io_rayservices.yaml"] + [
            base / "prometheus-operator" / f"monitoring.coreos.com_{k}.yaml"
            for k in ("podmonitors", "servicemonitors", "prometheusrules")]
        if all(f.is_file() for f in files):
            return files
    pytest.fail("the KubeRay and Prometheus Operator CRDs are missing: run scripts/install_k8s.sh")


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    if missing_tools():
        pytest.fail(missing_tools_hint())
    # NOTE: no watch cache: watches are served by etcd itself, so compacting etcd
    # makes an old resourceVersion 410 Gone at once (the cache would hide it).
    cluster = KubeTestCluster(tmp_path_factory.mktemp("kube"), watch_cache=False).start()
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    ext = client.ApiextensionsV1Api(api)
    for path in [CHART / "crds" / "loraadapters.hybridserve.dev.yaml", *_crd_files()]:
        body = yaml.safe_load(path.read_text())
        ext.create_custom_resource_definition(body)
    deadline = time.monotonic() + 60
    for path in [CHART / "crds" / "loraadapters.hybridserve.dev.yaml", *_crd_files()]:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        while True:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            assert time.monotonic() < deadline, f"CRD {name} never established"
            time.sleep(0.2)
    cluster.api = api
    yield cluster
    cluster.stop()


def _values(scenario: str) -> Path:
    return CHART / "ci" / f"{scenario}-values.yaml"


def _render(kube, scenario: str, *extra: str, release: str = "hs") -> list[dict]:
    out = kube.helm("template", release, str(CHART), "-n", "test", "-f", str(_values(scenario)),
                    *extra)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _find(docs: list[dict], kind: str, name_part: str = "") -> list[dict]:
    return [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]


# -- helm: lint, render, schema ----------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict_and_template(kube, scenario):
    lint = kube.helm("lint", "--strict", str(CHART), "-f", str(_values(scenario)), check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 chart(s) failed" in lint.stdout
    docs = _render(kube, scenario)
    assert len(_find(docs, "RayService")) == 1
    for d in docs:  # the standard labels on everything
        labels = d["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == "hs", d["metadata"]["name"]
        assert labels.get("helm.sh/chart", "").startswith("hybridserve-"), d["metadata"]["name"]


def test_the_scenarios_cover_what_users_run():
    assert set(SCENARIOS) >= {"minimal-cpu", "gpu-autoscaling", "external-services",
                              "monitoring", "tenants"}


BAD_VALUES = [
    (["--set", "config.serve.grpc_port=70000"], "maximum"),
    (["--set", "config.serve.apps={generation,search}"], "/config/serve/apps/1"),
    (["--set", "config.no_such_setting=1"], "no_such_setting"),
    (["--set", "config.engine.max_loras=0"], "max_loras"),
    (["--set", "ray.cpuWorkers.minReplicas=-1"], "minReplicas"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "admin.key=not-a-key"], "admin"),
    (["--set", "storage.size=20GB"], "size"),
    (["--set", "unknownTopLevel=1"], "unknownTopLevel"),
    (["--set", "ray.terminationGracePeriodSeconds=5"], "terminationGracePeriodSeconds"),
]


@pytest.mark.parametrize("extra,needle", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_schema_rejects_bad_values(kube, extra, needle):
    out = kube.helm("template", "hs", str(CHART), "-f", str(_values("minimal-cpu")), *extra,
                    check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert needle in out.stderr


def test_required_values_say_what_to_set(kube):
    out = kube.helm("template", "hs", str(CHART), check=False)
    assert out.returncode != 0 and "admin.existingSecret" in out.stderr
    assert "hybridserve admin generate-key" in out.stderr
    out = kube.helm("template", "hs", str(CHART), "--set", "admin.existingSecret=a",
                    "--set", "postgresql.enabled=false", check=False)
    assert out.returncode != 0 and "postgresql.externalSecret" in out.stderr
    out = kube.helm("template", "hs", str(CHART), "--set", "admin.existingSecret=a",
                    "--set", "weaviate.enabled=false", check=False)
    assert out.returncode != 0 and "weaviate.externalUrl" in out.stderr


def _merge(base: dict, over: dict) -> dict:
    """Helm's values merge: maps merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_renders_what_serve_config_prints(kube, scenario, tmp_path):
    """The RayService's serveConfigV2 equals `hybridserve serve-config` for the same config."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    values = _merge(defaults, yaml.safe_load(_values(scenario).read_text()) or {})
    config = dict(values["config"])
    # What the chart manages, derived here independently of the templates.
    if values["weaviate"]["enabled"]:
        config.setdefault("weaviate", {})
        config["weaviate"] = {"url": "http://hs-hybridserve-weaviate:8080", **config["weaviate"]}
    else:
        config["weaviate"] = {**config.get("weaviate", {}), "url": values["weaviate"]["externalUrl"]}
    # The control plane runs on the head, the one Ray pod with the admin key. (Redis's
    # URL is no part of it: it reaches the pods from a Secret.)
    config["serve"] = {"admin_resources": {"hybridserve_admin": 0.01}, **config["serve"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    printed = subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", "--config", str(tmp_path / "config.yaml"),
         "serve-config"], capture_output=True, text=True, check=True).stdout
    rayservice = _find(_render(kube, scenario), "RayService")[0]
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == yaml.safe_load(printed)


@pytest.mark.parametrize("serve_set", [{}, {"proxy_grpc_transport": False,
                                          "user_code_on_replica_loop": False,
                                          "router_on_caller_loop": False}])
def test_ray_pods_get_the_serve_environment_the_config_sets(kube, serve_set):
    """Serve reads its transport settings from the environment of every Ray pod: the
    chart sets what `serve.ray_env()` gives `hybridserve up`."""
    from hybridserve.config import HybridServeConfig

    extra = [a for k, v in serve_set.items() for a in ("--set", f"config.serve.{k}={str(v).lower()}")]
    rayservice = _find(_render(kube, "minimal-cpu", *extra), "RayService")[0]
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    want = HybridServeConfig.model_validate({"serve": serve_set}).serve.ray_env()
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in want} == want, container["name"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_head_pod_reaches_the_adapter_store_and_registry(kube, scenario):
    """Adapters are registered by the control plane (AdminService), which runs on the
    head (serve.admin_resources): the head mounts the shared volume that holds the
    adapter store and the registry, where the generation workers read them."""
    from hybridserve.config import HybridServeConfig

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    values = _merge(defaults, yaml.safe_load(_values(scenario).read_text()) or {})
    cfg = HybridServeConfig.model_validate({k: v for k, v in values["config"].items()
                                            if k in ("data_dir", "adapters")})
    cluster = _find(_render(kube, scenario), "RayService")[0]["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["name"] == "ray"
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        spec = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {Path(m["mountPath"]): m["name"] for m in spec["containers"][0]["volumeMounts"]}
        for folder in (cfg.adapter_store, cfg.registry_dir):
            owner = next((n for at, n in mounts.items() if folder.is_relative_to(at)), None)
            assert owner in claims, (group.get("groupName", "head"), folder, mounts)
        assert claims == {"shared": claims["shared"]}, claims  # one volume everywhere


def test_gpu_group_requests_gpus_and_autoscales(kube):
    docs = _render(kube, "gpu-autoscaling")
    spec = _find(docs, "RayService")[0]["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert gpu["rayStartParams"]["num-gpus"] == "2"
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert container["image"].endswith("-gpu")
    serve = yaml.safe_load(spec["serveConfigV2"])
    args = serve["applications"][1]["args"]["config"]
    assert args["generation"]["autoscaling"]["max_replicas"] == 4
    # Serve builds that into the deployment's autoscaling_config.
    from hybridserve.app import generation_app

    app = generation_app(serve["applications"][1]["args"])
    assert app._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4
    # Replicas ask for the GPUs the group offers: that places them there and scales it.
    # Tensor parallel over 2: the replica's placement group holds a bundle for itself
    # and one GPU per vLLM worker, packed on one pod.
    deployment = app._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment._replica_config.placement_group_bundles[1:] == [{"GPU": 1}, {"GPU": 1}]
    assert deployment._replica_config.placement_group_strategy == "STRICT_PACK"


def test_dashboards_and_rules_in_the_chart_are_deploys(kube):
    docs = _render(kube, "monitoring")
    dashboards = {}
    for cm in _find(docs, "ConfigMap"):
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1":
            dashboards.update(cm["data"])
    shipped = {p.name: p.read_text() for p in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")}
    assert dashboards == shipped and len(shipped) >= 4
    rule = _find(docs, "PrometheusRule")[0]
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "hybridserve.yml").read_text())
    names = {a.get("alert") for g in rule["spec"]["groups"] for a in g["rules"]}
    assert "HybridServeAdapterReconcileFailing" in names
    monitors = {m["metadata"]["name"] for m in _find(docs, "PodMonitor")}
    assert monitors == {"hs-hybridserve-ray", "hs-hybridserve-controller"}


# -- hardening: credentials, pod security, the admin key, network policies -----------------

#: Values that carry every kind of credential the chart handles.
CREDENTIALS = ["--set", f"admin.key={ADMIN_KEY}",
               "--set", "redis.enabled=false",
               "--set", "redis.externalUrl=rediss://:redis-Secret-42@quota.example.internal:6380/0",
               "--set", "networkPolicy.enabled=false"]


def _secret_values(docs: list[dict]) -> set[str]:
    out = set()
    for d in _find(docs, "Secret"):
        out |= {str(v) for v in (d.get("stringData") or {}).values()}
        out |= {base64.b64decode(v).decode() for v in (d.get("data") or {}).values()}
    return {v for v in out if len(v) >= 8}


@pytest.mark.parametrize("extra", [[], CREDENTIALS], ids=["defaults", "external-redis"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_credential_in_the_serve_config(kube, scenario, extra):
    """The RayService (and so its serveConfigV2) is readable by whoever may read the
    namespace's custom resources: no key, password or URL with credentials in it."""
    docs = _render(kube, scenario, *extra)
    serve_config = _find(docs, "RayService")[0]["spec"]["serveConfigV2"]
    secrets = _secret_values(docs) | {ADMIN_KEY, "redis-Secret-42"}
    if scenario != "external-services":  # there, every credential is the user's own Secret
        assert _secret_values(docs)
    for value in secrets:
        assert value not in serve_config, f"a Secret's value is in serveConfigV2: {value[:6]}..."
    assert not re.search(r"[a-z]+://[^/\s]*@", serve_config), "a URL with credentials"
    # The Ray pods get them from the Secrets instead.
    ray = _find(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    env = {e["name"]: e for e in ray["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in env["HYBRIDSERVE_DATABASE_URL"]["valueFrom"]
    if "redis.enabled=false" not in extra and "external" not in scenario:
        assert env["HYBRIDSERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "hs-hybridserve-redis"
        assert env["HYBRIDSERVE_WEAVIATE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == \
            "hs-hybridserve-weaviate"


@pytest.mark.parametrize("setting,needle", [
    ("config.weaviate.api_key=abc", "weaviate.existingSecret"),
    ("config.tenancy.database_url=postgresql://u:p@db/x", "postgresql.externalSecret"),
    ("config.tenancy.redis_url=redis://:pw@r:6379/0", "redis.existingSecret"),
])
def test_credentials_in_the_config_are_refused(kube, setting, needle):
    out = kube.helm("template", "hs", str(CHART), "-f", str(_values("minimal-cpu")), "--set",
                    setting, check=False)
    assert out.returncode != 0 and needle in out.stderr, out.stderr


def _pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod template the chart renders, by a readable name."""
    out = {}
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out[name] = d["spec"]["template"]["spec"]
        elif d["kind"] == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            out[f"{name}/head"] = cluster["headGroupSpec"]["template"]["spec"]
            for g in cluster.get("workerGroupSpecs", []):
                out[f"{name}/{g['groupName']}"] = g["template"]["spec"]
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_and_container_runs_restricted(kube, scenario):
    """runAsNonRoot, no privilege escalation, every capability dropped, RuntimeDefault
    seccomp and a read-only root filesystem, on every pod and container (KubeRay's
    autoscaler sidecar included); writable paths are emptyDirs."""
    docs = _render(kube, scenario, "--set", "tenants.enabled=true", "--set",
                   "controller.enabled=true", "--set", "ray.autoscaling=true",
                   "--set-json", 'tenants.file={"tenants": [{"id": "a"}]}')
    pods = _pod_specs(docs)
    assert len(pods) >= (4 if scenario == "external-services" else 7), sorted(pods)
    for name, pod in pods.items():
        sc = pod.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, name
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for c in pod["containers"] + pod.get("initContainers", []):
            csc = c.get("securityContext") or {}
            assert csc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
            assert csc.get("readOnlyRootFilesystem") is True, (name, c["name"])
            assert csc.get("runAsNonRoot") is True, (name, c["name"])
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts or c["name"] == "redis", (name, c["name"])
    autoscaler = _find(docs, "RayService")[0]["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
    assert autoscaler["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_admin_key_is_only_where_it_is_used(kube, scenario):
    """Only the head pod holds the admin key, and only the head offers the Ray resource
    that the control plane's replica asks for (so it runs there, and nowhere else)."""
    from hybridserve.app import admin_app, generation_app

    docs = _render(kube, scenario, "--set", "tenants.enabled=true",
                   "--set-json", 'tenants.file={"tenants": [{"id": "a"}]}')
    admin_secret = "hs-hybridserve-admin" if scenario == "minimal-cpu" else "hybridserve-admin"

    def holds_key(pod):
        return any((e.get("valueFrom") or {}).get("secretKeyRef", {}).get("name") == admin_secret
                   for c in pod["containers"] for e in c.get("env", []))

    holders = {name for name, pod in _pod_specs(docs).items() if holds_key(pod)}
    assert holders == ({"RayService/hs-hybridserve/head", "Job/hs-hybridserve-tenants"}
                       | ({"Deployment/hs-hybridserve-controller"}
                          if scenario != "minimal-cpu" else set())), holders
    spec = _find(docs, "RayService")[0]["spec"]
    cluster = spec["rayClusterConfig"]
    offered = {"head": cluster["headGroupSpec"]["rayStartParams"].get("resources", "")}
    offered |= {g["groupName"]: g["rayStartParams"].get("resources", "")
                for g in cluster["workerGroupSpecs"]}
    assert "hybridserve_admin" in yaml.safe_load(yaml.safe_load(offered.pop("head")))
    assert not any("hybridserve_admin" in v for v in offered.values()), offered
    apps = {a["name"]: a for a in yaml.safe_load(spec["serveConfigV2"])["applications"]}
    admin = admin_app(apps["admin"]["args"])._bound_deployment
    assert admin.ray_actor_options["resources"] == {"hybridserve_admin": 0.01}
    assert admin.ray_actor_options["num_cpus"] == 0  # fits on the head (numCpus 0)
    other = generation_app(apps["generation"]["args"])._bound_deployment
    assert "hybridserve_admin" not in (other.ray_actor_options.get("resources") or {})


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _egress_allowed(policies: list[dict], src: dict, dst: dict | None, port: int,
                    namespace_labels: dict | None = None) -> bool:
    """NetworkPolicy egress semantics (matchLabels, ports, ipBlock): may a pod with labels
    `src` reach a pod with labels `dst` in the release's namespace (None: an address
    outside the cluster) on `port`? Pods no Egress policy selects are unrestricted."""
    chosen = [p for p in policies if "Egress" in p["spec"].get("policyTypes", [])
              and _selects(p["spec"]["podSelector"], src)]
    if not chosen:
        return True
    for p in chosen:
        for rule in p["spec"].get("egress") or []:
            ports = [x["port"] for x in rule.get("ports") or []]
            if ports and port not in ports:
                continue
            peers = rule.get("to")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    if dst is None:
                        return True
                    continue
                if "namespaceSelector" in peer:
                    if namespace_labels is None or not _selects(peer["namespaceSelector"],
                                                                namespace_labels):
                        continue
                elif dst is None:
                    continue
                if dst is not None and _selects(peer.get("podSelector") or {}, dst):
                    return True
    return False


def test_egress_is_denied_but_for_what_each_pod_uses(kube):
    """Default-deny egress for every pod of the release, then exactly what each one uses:
    a pod that is taken over cannot reach the stores it has no business with, nor the
    world."""
    docs = _render(kube, "monitoring", "--set", "tenants.enabled=true", "--set-json",
                   'tenants.file={"tenants": [{"id": "a"}]}')
    policies = _find(docs, "NetworkPolicy")
    pods = {name: {**pod_labels, **extra} for name, pod_labels, extra in [
        (n, t["metadata"]["labels"], {})
        for n, t in [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"])
                     for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]]}
    ray = _find(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    pods["head"] = {**ray["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
    pods["worker"] = {**ray["workerGroupSpecs"][0]["template"]["metadata"]["labels"],
                      "ray.io/node-type": "worker"}
    by = {name.split("-")[-1] if "/" in name else name: labels for name, labels in pods.items()}
    assert set(by) >= {"head", "worker", "weaviate", "postgresql", "redis", "controller", "tenants"}
    dns = {"kubernetes.io/metadata.name": "kube-system"}
    kube_dns = {"k8s-app": "kube-dns"}
    allowed = {
        ("worker", "postgresql", 5432), ("worker", "redis", 6379), ("worker", "weaviate", 8080),
        ("worker", "weaviate", 50051), ("worker", "head", 6379), ("head", "worker", 10002),
        ("head", "postgresql", 5432), ("controller", "worker", 9000), ("tenants", "head", 9000),
    }
    denied = {
        ("controller", "postgresql", 5432), ("controller", "redis", 6379),
        ("controller", "head", 8265), ("tenants", "postgresql", 5432),
        ("tenants", "weaviate", 8080), ("weaviate", "postgresql", 5432),
        ("weaviate", "head", 9000), ("redis", "postgresql", 5432), ("postgresql", "head", 6379),
    }
    for src, dst, port in allowed:
        assert _egress_allowed(policies, by[src], by[dst], port), (src, dst, port)
    for src, dst, port in denied:
        assert not _egress_allowed(policies, by[src], by[dst], port), (src, dst, port)
    for name, labels in by.items():
        # Every pod resolves names, and none reaches the world...
        assert _egress_allowed(policies, labels, kube_dns, 53, dns), name
        assert not _egress_allowed(policies, labels, None, 80), name
        # ...but the two that talk to the Kubernetes API.
        assert _egress_allowed(policies, labels, None, 443) == (name in ("controller", "head")), name
    # Ingress: the stores take connections from the Ray pods only.
    for store, port in (("postgresql", 5432), ("redis", 6379), ("weaviate", 8080)):
        pol = next(p for p in policies if p["metadata"]["name"] == f"hs-hybridserve-{store}")
        peers = [peer for rule in pol["spec"]["ingress"] for peer in rule["from"]]
        assert all(_selects(peer["podSelector"], by["worker"]) for peer in peers)
        assert not any(_selects(peer["podSelector"], by["controller"]) for peer in peers)


def test_ray_requires_its_token_and_mtls_is_a_switch(kube):
    spec = _find(_render(kube, "minimal-cpu"), "RayService")[0]["spec"]["rayClusterConfig"]
    assert spec["authOptions"] == {"mode": "token"}
    assert "tlsOptions" not in spec
    spec = _find(_render(kube, "minimal-cpu", "--set", "ray.tokenAuth=false", "--set",
                         "ray.mtls=true"), "RayService")[0]["spec"]["rayClusterConfig"]
    assert "authOptions" not in spec and spec["tlsOptions"] == {"enabled": True}


def test_the_controller_gets_the_tenants_each_namespace_may_grant_to(kube):
    """controller.namespaceTenants becomes the controller's --namespace-tenants, which its
    own parser reads back; by default no namespace may grant to any tenant."""
    from hybridserve.controller.main import build_parser
    from hybridserve.controller.reconcile import parse_namespace_tenants

    def allowed(*extra):
        docs = _render(kube, "monitoring", *extra)
        command = _find(docs, "Deployment", "controller")[0]["spec"]["template"]["spec"][
            "containers"][0]["command"]
        return parse_namespace_tenants(build_parser().parse_args(command[1:]).namespace_tenants)

    assert allowed() == {}
    assert allowed("--set-json", 'controller.namespaceTenants={"test": ["acme", "globex"], '
                   '"ml": ["initech"]}') == {"test": {"acme", "globex"}, "ml": {"initech"}}
    out = kube.helm("template", "hs", str(CHART), "-f", str(_values("monitoring")), "--set-json",
                    'controller.namespaceTenants={"test": ["not a tenant"]}', check=False)
    assert out.returncode != 0 and "namespaceTenants" in out.stderr


def _rendered_secret(docs, name: str) -> dict[str, str]:
    found = [d for d in _find(docs, "Secret") if d["metadata"]["name"] == name]
    return {k: str(v) for k, v in found[0]["stringData"].items()} if found else {}


def _resolved_env(docs, container: dict) -> dict[str, str]:
    """A container's environment as the kubelet would set it from the rendered Secrets."""
    env = {}
    for e in container.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = _rendered_secret(docs, ref["name"])[ref["key"]]
        else:
            env[e["name"]] = str(e["value"])
    return env


def test_the_charts_weaviate_refuses_anonymous_access(kube, tmp_path):
    """The chart's Weaviate settings on a real weaviate-server: a request without the key
    is refused (401); the platform's store, given the key through the environment the Ray
    pods get, works."""
    import asyncio
    import urllib.error

    from hybridserve.config import HybridServeConfig
    from hybridserve.retrieval.store import WeaviateStore
    from hybridserve.retrieval.weaviate_server import WeaviateServer

    docs = _render(kube, "minimal-cpu")
    sts = _find(docs, "StatefulSet", "weaviate")[0]["spec"]["template"]["spec"]["containers"][0]
    # The chart's settings; the paths and ports are the test's own.
    env = {k: v for k, v in _resolved_env(docs, sts).items()
           if k not in ("PERSISTENCE_DATA_PATH", "CLUSTER_HOSTNAME", "GRPC_PORT")}
    from testkit.kube import _free_port

    # NOTE: weaviate-server derives ports from the HTTP port (+10000 to +10004).
    http = next(p for p in iter(_free_port, None) if p < 50000)
    grpc_port = _free_port()
    server = WeaviateServer(binary=HybridServeConfig().weaviate_binary, data_dir=tmp_path / "w",
                            http_port=http, grpc_port=grpc_port, extra_env=env)
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.url}/v1/schema", timeout=10)
        assert refused.value.code == 401
        key = _rendered_secret(docs, "hs-hybridserve-weaviate")["api-key"]
        assert env["AUTHENTICATION_APIKEY_ALLOWED_KEYS"] == key
        request = urllib.request.Request(f"{server.url}/v1/schema",
                                         headers={"Authorization": f"Bearer {key}"})
        assert urllib.request.urlopen(request, timeout=10).status == 200
        ray = _find(docs, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        name = next(e["name"] for e in ray["template"]["spec"]["containers"][0]["env"]
                    if e["name"].endswith("WEAVIATE_API_KEY"))
        os.environ[name] = key
        try:
            config = HybridServeConfig.model_validate(
                {"weaviate": {"url": server.url, "grpc_port": grpc_port}})
            store = WeaviateStore(config)

            async def use():
                try:
                    await store.create_tenant("acme")
                finally:
                    await store.close()

            asyncio.run(use())
        finally:
            del os.environ[name]
    finally:
        server.stop()


def test_the_charts_redis_requires_its_password(kube, tmp_path):
    """The chart's Redis config on a real redis-server: a client without the password
    is refused; the platform, given the URL through the environment the Ray pods get,
    authenticates."""
    import redis

    from hybridserve.config import HybridServeConfig
    from testkit.kube import _free_port

    docs = _render(kube, "minimal-cpu")
    container = _find(docs, "Deployment", "redis")[0]["spec"]["template"]["spec"]["containers"][0]
    secret = _rendered_secret(docs, "hs-hybridserve-redis")
    args = list(container["args"])
    if args and args[0].endswith(".conf"):  # the config file, from the Secret's volume
        (tmp_path / "redis.conf").write_text(secret["redis.conf"])
        args[0] = str(tmp_path / "redis.conf")
    port = _free_port()
    proc = subprocess.Popen(["redis-server", *args, "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait("redis-server", lambda: subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0, 30)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()
        ray = _find(docs, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        env = next(e for e in ray["template"]["spec"]["containers"][0]["env"]
                   if e["name"] == "HYBRIDSERVE_REDIS_URL")
        assert env["valueFrom"]["secretKeyRef"] == {"name": "hs-hybridserve-redis", "key": "url"}
        url = secret["url"].replace("hs-hybridserve-redis:6379", f"127.0.0.1:{port}")
        os.environ["HYBRIDSERVE_REDIS_URL"] = url
        try:
            resolved = HybridServeConfig().tenancy_redis_url
        finally:
            del os.environ["HYBRIDSERVE_REDIS_URL"]
        assert resolved == url
        assert redis.Redis.from_url(resolved).ping() is True
    finally:
        proc.terminate()
        proc.wait(10)


# -- helm install / upgrade / uninstall against the API server ----------------------------


def _get(kube, obj: dict, namespace: str):
    """The object as the API server has it (None when absent)."""
    from kubernetes import dynamic
    from kubernetes.dynamic.exceptions import NotFoundError

    dyn = dynamic.DynamicClient(kube.api)
    res = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    try:
        return res.get(name=obj["metadata"]["name"],
                       namespace=namespace if res.namespaced else None)
    except NotFoundError:
        return None


def _secret(kube, namespace: str, name: str, data: dict[str, str]) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(kube.api)
    try:
        core.create_namespace({"metadata": {"name": namespace}})
    except ApiException as e:
        if e.status != 409:
            raise
    try:
        core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": data})
    except ApiException as e:
        if e.status != 409:
            raise


class JobStandIn:
    """Plays the Job controller and kubelet for the chart's hook Jobs: runs the
    container's own command here (its Secret env resolved, its ConfigMap volume
    written to a folder, the in-cluster Service address mapped to the local
    platform), then records the outcome in the Job's status, which Helm waits on."""

    def __init__(self, kube, namespace: str, platform_address: str):
        self.kube, self.namespace, self.address = kube, namespace, platform_address
        self.ran: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _loop(self):
        from kubernetes import client

        batch = client.BatchV1Api(self.kube.api)
        done = set()
        while not self._stop.is_set():
            for job in batch.list_namespaced_job(self.namespace).items:
                if job.metadata.uid in done:
                    continue
                done.add(job.metadata.uid)
                self._run(batch, job)
            time.sleep(0.3)

    def _run(self, batch, job):
        from kubernetes import client

        core = client.CoreV1Api(self.kube.api)
        spec = job.spec.template.spec
        container = spec.containers[0]
        env = dict(os.environ)
        for e in container.env or []:
            if e.value_from and e.value_from.secret_key_ref:
                ref = e.value_from.secret_key_ref
                secret = core.read_namespaced_secret(ref.name, self.namespace)
                env[e.name] = base64.b64decode(secret.data[ref.key]).decode()
            else:
                env[e.name] = e.value or ""
        folder = Path(tempfile.mkdtemp())
        mounts = {}
        for m in container.volume_mounts or []:
            vol = next(v for v in spec.volumes if v.name == m.name)
            if vol.empty_dir is not None:  # scratch space (the read-only root's /tmp)
                continue
            cm = core.read_namespaced_config_map(vol.config_map.name, self.namespace)
            for key, text in (cm.data or {}).items():
                (folder / m.name).mkdir(exist_ok=True)
                (folder / m.name / key).write_text(text)
            mounts[m.mount_path] = str(folder / m.name)
        argv = []
        for arg in container.command:
            for mount, local in mounts.items():
                arg = arg.replace(mount, local)
            argv.append(re.sub(r"^[a-z0-9-]+-grpc:\d+$", self.address, arg))
        argv[0] = str(Path(sys.executable).parent / argv[0])
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        self.ran.append((job.metadata.name, out.returncode, out.stdout + out.stderr))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if out.returncode == 0:
            conditions = [
                {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods",
                 "lastProbeTime": now, "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods",
                 "lastProbeTime": now, "lastTransitionTime": now}]
            status = {"startTime": now, "completionTime": now, "succeeded": 1, "active": 0,
                      "ready": 0, "terminating": 0, "conditions": conditions,
                      "uncountedTerminatedPods": {}}
        else:
            conditions = [
                {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit",
                 "lastProbeTime": now, "lastTransitionTime": now},
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit",
                 "lastProbeTime": now, "lastTransitionTime": now}]
            status = {"startTime": now, "failed": 1, "active": 0, "ready": 0, "terminating": 0,
                      "conditions": conditions, "uncountedTerminatedPods": {}}
        batch.patch_namespaced_job_status(job.metadata.name, self.namespace, {"status": status})


def _manifest(kube, release: str, namespace: str) -> list[dict]:
    out = kube.helm("get", "manifest", release, "-n", namespace)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_install_upgrade_uninstall(kube, platform, scenario):
    ns = f"hs-{scenario}"
    _secret(kube, ns, "hybridserve-admin", {"admin-key": platform.admin_key})
    _secret(kube, ns, "hybridserve-database", {"url": "postgresql://u:p@db.example.internal/hs"})
    _secret(kube, ns, "hybridserve-redis", {"url": "rediss://:p@quota-redis.example.internal:6380/0"})
    _secret(kube, ns, "hybridserve-weaviate", {"api-key": "k" * 40})
    with JobStandIn(kube, ns, platform.address) as jobs:
        out = kube.helm("install", "hs", str(CHART), "-n", ns, "-f", str(_values(scenario)),
                        "--timeout", "120s", check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        rendered = _manifest(kube, "hs", ns)
        assert len(rendered) >= 8
        for obj in rendered:  # every object passed the API server's validation and is there
            assert _get(kube, obj, ns) is not None, f"{obj['kind']}/{obj['metadata']['name']}"
        # KubeRay's CRD kept Ray's token authentication (an older one would prune it).
        rayservice = next(o for o in rendered if o["kind"] == "RayService")
        assert _get(kube, rayservice, ns).spec.rayClusterConfig.authOptions.mode == "token"
        if scenario == "tenants":
            assert [(name, rc) for name, rc, _ in jobs.ran] == [("hs-hybridserve-tenants", 0)], jobs.ran
            from hybridserve.client import HybridServeClient

            with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
                initech = admin.get_tenant("initech")
                assert initech.display_name == "Initech" and initech.allow_base
                assert admin.get_tenant("hooli").system_prompt.startswith("You answer")
        # An upgrade with changed values changes the objects in place.
        out = kube.helm("upgrade", "hs", str(CHART), "-n", ns, "-f", str(_values(scenario)),
                        "--set", "ray.cpuWorkers.maxReplicas=7", "--set", "controller.enabled=true",
                        "--timeout", "120s", check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        rayservice = next(o for o in _manifest(kube, "hs", ns) if o["kind"] == "RayService")
        live = _get(kube, rayservice, ns)
        assert live.spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas == 7
        assert _get(kube, {"apiVersion": "apps/v1", "kind": "Deployment",
                           "metadata": {"name": "hs-hybridserve-controller"}}, ns) is not None
        if scenario == "tenants":
            assert [rc for _, rc, _ in jobs.ran] == [0, 0], jobs.ran  # the hook ran again
        upgraded = _manifest(kube, "hs", ns)
    out = kube.helm("uninstall", "hs", "-n", ns, "--timeout", "60s", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    kept = set()
    for obj in upgraded:
        live = _get(kube, obj, ns)
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep":
            kept.add(key)
            continue
        assert live is None, f"{key} survived the uninstall"
    # Only the shared volume (adapters are not deleted by an uninstall), when the chart made it.
    assert kept == ({"PersistentVolumeClaim/hs-hybridserve-shared"}
                    if scenario != "external-services" else set())


# -- the controller ------------------------------------------------------------------------


class ControllerProcess:
    def __init__(self, kube, platform, namespace: str, log: Path, *extra: str):
        self.kube, self.platform, self.namespace, self.log = kube, platform, namespace, log
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self):
        from testkit.kube import _free_port

        self.port = _free_port()
        env = dict(os.environ, HYBRIDSERVE_API_KEY=self.platform.admin_key)
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "hybridserve-controller"),
             "--platform", self.platform.address, "--namespace", self.namespace,
             "--kubeconfig", str(self.kube.kubeconfig), "--metrics-port", str(self.port),
             "--metrics-host", "127.0.0.1", "--backoff-max", "2", "--retry-max", "5",
             # The operator's list: this namespace may grant to the test tenant only.
             "--namespace-tenants", f"{self.namespace}=k8s-tenant", *self.extra],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.metrics()
                return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                time.sleep(0.2)
        raise AssertionError("the controller did not start")

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self):
        self.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def lora(kube, platform):
    """A namespace, a tenant with a key, and adapter folders for the controller tests (in
    the namespace's folder of the adapter store); and another party's adapter, registered
    by hand and granted to its own tenant."""
    from kubernetes import client

    from hybridserve.client import HybridServeClient
    from testkit.tiny import build_lora_adapter

    from .conftest import TINY_MODEL_NAME

    ns = "skills"
    client.CoreV1Api(kube.api).create_namespace({"metadata": {"name": ns}})
    folders = {}
    for i, name in enumerate(("k8s-formal-v1", "k8s-formal-v2", "k8s-a", "k8s-b", "k8s-c", "k8s-d",
                              "k8s-late", "k8s-outage")):
        build_lora_adapter(platform.assets.base_dir, platform.assets.store / ns / name,
                           seed=700 + i, rank=8, base_model_name=TINY_MODEL_NAME)
        folders[name] = name  # spec.source: relative to <store>/<namespace>/
    build_lora_adapter(platform.assets.base_dir, platform.assets.store / "victims" / "secret-skill",
                       seed=799, rank=8, base_model_name=TINY_MODEL_NAME)
    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        admin.create_tenant("k8s-tenant", display_name="GitOps tenant")
        key = admin.create_key("k8s-tenant", name="k8s-test").secret
        admin.create_tenant("k8s-victim", display_name="Another tenant")
        victim = admin.register_adapter("victim-skill", "victims/secret-skill").adapter
        admin.grant_adapter("k8s-victim", victim.id, make_default=True)
    folders["victim"] = (victim.id, victim.content_sha256)
    return ns, key, folders


def _objects(kube):
    from kubernetes import client

    return client.CustomObjectsApi(kube.api)


def _create(kube, ns, name, spec):
    return _objects(kube).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAAdapter",
                                     "metadata": {"name": name}, "spec": spec})


def _read(kube, ns, name):
    from kubernetes.client.exceptions import ApiException

    try:
        return _objects(kube).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _wait(what, fn, timeout=90.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _delete(kube, ns, *names):
    """Deletes resources and waits for the finalizer (the controller must be running)."""
    for n in names:
        _objects(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n)
    for n in names:
        _wait(f"{n} deleted", lambda n=n: _read(kube, ns, n) is None, timeout=60)


def _condition(obj):
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == "Ready":
            return c
    return {}


def _ready(kube, ns, name, generation=1, timeout=90.0):
    def check():
        obj = _read(kube, ns, name)
        cond = _condition(obj)
        if cond.get("status") == "True" and obj["status"].get("observedGeneration") == generation:
            return obj
        return None

    return _wait(f"{name} Ready (generation {generation})", check, timeout)


def _registered(platform) -> set[str]:
    from hybridserve.client import HybridServeClient

    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        return {a.id for a in admin.list_adapters()}


def _registrations(platform, adapter_id: str) -> int:
    """How many RegisterAdapter calls made `adapter_id` new (the audit log's account)."""
    from hybridserve.client import HybridServeClient

    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        return sum(1 for e in admin.audit(limit=500)
                   if e.action == "RegisterAdapter" and e.detail == f"{adapter_id} (new)")


def test_controller_lifecycle(kube, platform, lora, tmp_path):
    """Create -> Ready and usable by the granted tenant; a spec change -> a new version;
    a bad source -> Failed with a reason; delete -> the finalizer unregisters."""
    from hybridserve.client import HybridServeClient
    from hybridserve.exceptions import PermissionDeniedError

    ns, tenant_key, folders = lora
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log").start()
    try:
        t0 = time.monotonic()
        _create(kube, ns, "support-formal",
                {"source": folders["k8s-formal-v1"], "tenants": ["k8s-tenant"], "default": True})
        obj = _ready(kube, ns, "support-formal")
        print(f"\ncreate -> Ready: {time.monotonic() - t0:.2f} s")
        v1 = obj["status"]["adapterId"]
        assert v1.startswith("support-formal@") and obj["status"]["grantedTenants"] == ["k8s-tenant"]
        assert "hybridserve.dev/unregister-adapter" in obj["metadata"]["finalizers"]
        with HybridServeClient(platform.address, api_key=tenant_key) as tenant:
            assert [a.id for a in tenant.list_adapters()] == [v1]
            _, ids, final = tenant.generate("Hello", adapter=v1, max_tokens=4, temperature=0)
            assert final.adapter == v1 and len(ids) == 4
        with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
            assert admin.get_tenant("k8s-tenant").default_adapter == v1  # spec.default

        # A new spec (new bytes) is a new version; the old one is retired.
        obj["spec"]["source"] = folders["k8s-formal-v2"]
        _objects(kube).replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "support-formal", obj)
        obj = _ready(kube, ns, "support-formal", generation=2)
        v2 = obj["status"]["adapterId"]
        assert v2 != v1 and v2.startswith("support-formal@")
        assert v2 in _registered(platform) and v1 not in _registered(platform)
        # Ready means stored; replicas trust what they read for auth_cache_ttl_s.
        time.sleep(platform.main.tenancy.auth_cache_ttl_s + 0.1)
        with HybridServeClient(platform.address, api_key=tenant_key) as tenant:
            _, _, final = tenant.generate("Hello", adapter=v2, max_tokens=2, temperature=0)
            assert final.adapter == v2
            with pytest.raises(PermissionDeniedError):  # the old version is no longer granted
                tenant.generate("Hello", adapter=v1, max_tokens=2)

        # A bad source: Failed, with the platform's reason and message.
        _create(kube, ns, "broken", {"source": "no/such/folder", "tenants": ["k8s-tenant"]})
        cond = _wait("broken Failed", lambda: (c := _condition(_read(kube, ns, "broken")))
                     and c["status"] == "False" and c)
        assert cond["reason"] and cond["reason"] != "Registered"
        assert "no/such/folder" in cond["message"]
        # The API server's own validation refuses what the CRD schema forbids.
        from kubernetes.client.exceptions import ApiException

        with pytest.raises(ApiException) as refused:
            _create(kube, ns, "bad-spec", {"tenants": ["k8s-tenant"]})
        assert refused.value.status == 422 and "source" in refused.value.body

        # Delete: the finalizer revokes the grant and unregisters the adapter.
        _objects(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "support-formal")
        _wait("support-formal deleted", lambda: _read(kube, ns, "support-formal") is None)
        assert v2 not in _registered(platform)
        with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
            assert v2 not in admin.get_tenant("k8s-tenant").adapters
        _objects(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "broken")
        _wait("broken deleted", lambda: _read(kube, ns, "broken") is None)
        m = ctl.metrics()
        assert m['hybridserve_controller_reconciles_total{outcome="ready"}'] >= 2
        assert m['hybridserve_controller_reconciles_total{outcome="failed"}'] >= 1
        assert m['hybridserve_controller_reconciles_total{outcome="deleted"}'] >= 2
        assert m["hybridserve_controller_time_to_ready_seconds_count"] >= 2
    finally:
        ctl.stop()


def test_deletion_waits_while_another_grant_depends_on_it(kube, platform, lora, tmp_path):
    from hybridserve.client import HybridServeClient

    ns, _, folders = lora
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log").start()
    try:
        _create(kube, ns, "shared-skill", {"source": folders["k8s-a"], "tenants": ["k8s-tenant"]})
        adapter = _ready(kube, ns, "shared-skill")["status"]["adapterId"]
        with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
            admin.create_tenant("k8s-other")
            admin.grant_adapter("k8s-other", adapter)  # by hand, outside the resource
            _objects(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "shared-skill")
            cond = _wait("DeletionBlocked", lambda: (c := _condition(_read(kube, ns, "shared-skill")))
                         .get("reason") == "DeletionBlocked" and c)
            assert "k8s-other" in cond["message"]
            assert adapter in _registered(platform)
            admin.revoke_adapter("k8s-other", adapter)
        _wait("shared-skill deleted", lambda: _read(kube, ns, "shared-skill") is None, timeout=30)
        assert adapter not in _registered(platform)
    finally:
        ctl.stop()


def test_restart_mid_stream_registers_nothing_twice(kube, platform, lora, tmp_path):
    ns, _, folders = lora
    names = ["skill-b", "skill-c", "skill-d"]
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log").start()
    for name, folder in zip(names, ("k8s-b", "k8s-c", "k8s-d")):
        _create(kube, ns, name, {"source": folders[folder], "tenants": ["k8s-tenant"]})
    # Killed as soon as the first one is Ready: the others are mid-way.
    _wait("a first Ready", lambda: any(_condition(_read(kube, ns, n)).get("status") == "True"
                                       for n in names), interval=0.02)
    ctl.kill()
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log").start()
    try:
        ids = [_ready(kube, ns, n)["status"]["adapterId"] for n in names]
        for adapter_id in ids:
            assert _registrations(platform, adapter_id) == 1, adapter_id
        m = ctl.metrics()
        assert m['hybridserve_controller_api_calls_total{call="list",target="kubernetes"}'] == 1
        _delete(kube, ns, *names)
    finally:
        ctl.stop()


def test_watch_relists_after_410_gone_and_rides_out_an_api_outage(kube, platform, lora, tmp_path):
    ns, _, folders = lora
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log",
                            "--watch-timeout", "2").start()
    try:
        # The first watch is counted once the list has returned (its resourceVersion is set).
        _wait("the first watch", lambda: ctl.metrics().get(
            'hybridserve_controller_api_calls_total{call="watch",target="kubernetes"}', 0) >= 1)
        # Frozen past its watch's timeout, the controller's resourceVersion is
        # compacted away while a resource is created: its next watch gets 410 Gone.
        ctl.proc.send_signal(signal.SIGSTOP)
        time.sleep(3)
        _create(kube, ns, "skill-late", {"source": folders["k8s-late"], "tenants": ["k8s-tenant"]})
        kube.compact_etcd()
        ctl.proc.send_signal(signal.SIGCONT)
        _ready(kube, ns, "skill-late")
        m = ctl.metrics()
        assert m.get('hybridserve_controller_watch_restarts_total{reason="gone"}', 0) >= 1
        assert m['hybridserve_controller_api_calls_total{call="list",target="kubernetes"}'] >= 2

        # The API server goes away for a few seconds: backoff, then convergence.
        kube.stop_apiserver()
        time.sleep(4)
        errors = ctl.metrics()['hybridserve_controller_watch_restarts_total{reason="error"}']
        assert errors >= 1
        kube.start_apiserver()
        _create(kube, ns, "skill-outage", {"source": folders["k8s-outage"], "tenants": ["k8s-tenant"]})
        _ready(kube, ns, "skill-outage")
        _delete(kube, ns, "skill-late", "skill-outage")
    finally:
        ctl.stop()


def test_steady_state_makes_no_calls_between_events(kube, platform, lora, tmp_path):
    ns, _, folders = lora
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log",
                            "--watch-timeout", "2").start()
    try:
        _create(kube, ns, "steady", {"source": folders["k8s-a"], "tenants": ["k8s-tenant"]})
        _ready(kube, ns, "steady")
        time.sleep(1)

        def calls(m):
            return {k: v for k, v in m.items() if k.startswith("hybridserve_controller_api_calls_total")
                    and 'call="watch"' not in k}

        before = calls(ctl.metrics())
        time.sleep(6)  # three watch renewals
        after = ctl.metrics()
        assert calls(after) == before
        # Watches were renewed from the last resourceVersion, not by listing again.
        assert after['hybridserve_controller_api_calls_total{call="watch",target="kubernetes"}'] >= 3
        assert after['hybridserve_controller_api_calls_total{call="list",target="kubernetes"}'] == 1
        _delete(kube, ns, "steady")
    finally:
        ctl.stop()


# -- a LoRAAdapter is not an admin key -------------------------------------------------------


def _victim_intact(platform, victim_id: str) -> bool:
    from hybridserve.client import HybridServeClient

    with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
        tenant = admin.get_tenant("k8s-victim")
        return (victim_id in _registered(platform) and victim_id in tenant.adapters
                and tenant.default_adapter == victim_id)


def test_a_loraadapter_cannot_take_another_tenants_adapter(kube, platform, lora, tmp_path):
    """A source names a folder of the resource's own namespace: naming another party's
    folder of the adapter store registers nothing of theirs and grants nothing."""
    from hybridserve.client import HybridServeClient

    ns, tenant_key, folders = lora
    victim_id, victim_sha = folders["victim"]
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log").start()
    try:
        _create(kube, ns, "stolen", {"source": "victims/secret-skill", "tenants": ["k8s-tenant"]})
        _create(kube, ns, "escaped", {"source": "../victims/secret-skill", "tenants": ["k8s-tenant"]})
        for name in ("stolen", "escaped"):
            cond = _wait(f"{name} Failed", lambda n=name: (c := _condition(_read(kube, ns, n)))
                         .get("status") == "False" and c)
            assert "victims/secret-skill" in cond["message"], cond
        assert _condition(_read(kube, ns, "escaped"))["reason"] == "SourceOutsideNamespace"
        with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
            copies = [a.id for a in admin.list_adapters() if a.content_sha256 == victim_sha]
            assert copies == [victim_id]  # no second registration of the victim's bytes
            granted = admin.get_tenant("k8s-tenant").adapters
            assert not [a for a in granted if a.startswith(("stolen@", "escaped@"))], granted
        with HybridServeClient(platform.address, api_key=tenant_key) as tenant:
            assert victim_id not in [a.id for a in tenant.list_adapters()]
        _delete(kube, ns, "stolen", "escaped")
        assert _victim_intact(platform, victim_id)
    finally:
        ctl.stop()


def test_a_loraadapter_grants_only_to_tenants_its_namespace_may_grant_to(kube, platform, lora,
                                                                         tmp_path):
    ns, _, folders = lora
    victim_id, _ = folders["victim"]
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log").start()
    try:
        _create(kube, ns, "pushed", {"source": folders["k8s-c"], "tenants": ["k8s-victim"],
                                     "default": True})
        cond = _wait("pushed Failed", lambda: (c := _condition(_read(kube, ns, "pushed")))
                     .get("status") == "False" and c)
        assert cond["reason"] == "TenantNotAllowed" and "k8s-victim" in cond["message"]
        assert _victim_intact(platform, victim_id)  # its default adapter is still its own
        from hybridserve.client import HybridServeClient

        with HybridServeClient(platform.address, api_key=platform.admin_key) as admin:
            assert admin.get_tenant("k8s-victim").adapters == [victim_id]
        _delete(kube, ns, "pushed")
    finally:
        ctl.stop()


def test_a_faked_status_cannot_revoke_or_unregister_anothers_adapter(kube, platform, lora,
                                                                      tmp_path):
    """Whoever may write a LoRAAdapter's status names another party's adapter in it; the
    finalizer still revokes and unregisters only what the registry records as this
    resource's."""
    ns, _, folders = lora
    victim_id, _ = folders["victim"]
    ctl = ControllerProcess(kube, platform, ns, tmp_path / "controller.log").start()
    try:
        _create(kube, ns, "decoy", {"source": folders["k8s-d"], "tenants": ["k8s-tenant"]})
        mine = _ready(kube, ns, "decoy")["status"]["adapterId"]
        _objects(kube).patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, "decoy",
            {"status": {"adapterId": victim_id, "grantedTenants": ["k8s-victim", "k8s-tenant"]}})
        assert _read(kube, ns, "decoy")["status"]["adapterId"] == victim_id
        _delete(kube, ns, "decoy")
        assert mine not in _registered(platform)
        assert _victim_intact(platform, victim_id)
    finally:
        ctl.stop()


def test_the_node_cache_serves_loads_from_verified_local_copies(platform):
    """The chart's adapters.node_cache_dir: the `affinity` app loads adapters from
    node-local copies of the snapshots; its outputs equal those of the `generation` app,
    which loads from the registry itself."""
    from hybridserve.client import HybridServeClient

    from .conftest import AFFINITY_APP, MAIN_APP

    adapter = platform.ids["beta"]
    outputs = {}
    for app in (AFFINITY_APP, MAIN_APP):
        with HybridServeClient(platform.address, api_key=platform.admin_key, application=app) as c:
            _, outputs[app], _ = c.generate("The sky over the", adapter=adapter, max_tokens=8,
                                            temperature=0)
    assert outputs[AFFINITY_APP] == outputs[MAIN_APP] and len(outputs[MAIN_APP]) == 8
    name, version = adapter.split("@")
    copies = list((platform.affinity.adapters.node_cache_dir / name).glob(f"{version}-*"))
    assert len(copies) == 1 and (copies[0] / "adapter_config.json").is_file()
    assert platform.main.adapters.node_cache_dir is None
