"""Kubernetes benchmarks: chart render time, LoRAAdapter convergence, API calls per reconcile.

  .venv/bin/python benchmarks/k8s.py                 # starts its own tiny-model platform
  .venv/bin/python benchmarks/k8s.py --smoke --address HOST:PORT --api-key-file F \\
      --store-dir DIR --base-dir DIR --base-name NAME

- render: `helm template` of every ci/ scenario, `--rounds` times each, interleaved.
- convergence: a real kube-apiserver (built by scripts/install_k8s.sh) and the
  controller (in this process, the same classes the `hybridserve-controller`
  command runs) against the platform: `--adapters` LoRAAdapters created one at a
  time, each timed from create to Ready (the adapter registered and granted).
- calls: Kubernetes and platform calls per reconcile, and over `--steady-s`
  seconds with nothing changing (watch renewals counted apart).

Writes benchmarks/results/k8s.json (k8s-smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "hybridserve"
sys.path.insert(0, str(ROOT))  # the repo root, for testkit/
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_render(kube, rounds: int) -> dict:
    scenarios = sorted(p for p in (CHART / "ci").glob("*-values.yaml"))
    times = {p.stem.removesuffix("-values"): [] for p in scenarios}
    for _ in range(rounds):
        for path in scenarios:  # interleaved: every scenario in every round
            t0 = time.perf_counter()
            kube.helm("template", "hs", str(CHART), "-f", str(path))
            times[path.stem.removesuffix("-values")].append(time.perf_counter() - t0)
    return {name: {"p50_ms": round(statistics.median(t) * 1000, 1),
                   "max_ms": round(max(t) * 1000, 1), "rounds": len(t)} for name, t in times.items()}


def _counts(metrics) -> dict[str, float]:
    out = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == "hybridserve_controller_api_calls_total":
                out[f"{s.labels['target']}:{s.labels['call']}"] = s.value
            if s.name == "hybridserve_controller_reconciles_total":
                out[f"reconcile:{s.labels['outcome']}"] = s.value
    return out


def bench_controller(kube, address, admin_key, store_dir, base_dir, base_name, n, steady_s) -> dict:
    from kubernetes import client, config

    from hybridserve.client import HybridServeClient
    from hybridserve.controller.main import Controller, KubeObjects, Metrics, PlatformAdmin
    from testkit.tiny import build_lora_adapter

    api = config.new_client_from_config(config_file=str(kube.kubeconfig))
    ext = client.ApiextensionsV1Api(api)
    import yaml

    ext.create_custom_resource_definition(
        yaml.safe_load((CHART / "crds" / "loraadapters.hybridserve.dev.yaml").read_text()))
    time.sleep(2)  # established
    ns = "bench"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
    run = uuid.uuid4().hex[:6]
    tenant = f"bench-k8s-{run}"
    folders = []
    for i in range(n):
        folder = f"bench-k8s-{run}-{i}"
        # A LoRAAdapter's source is relative to its namespace's folder of the store.
        build_lora_adapter(Path(base_dir), Path(store_dir) / ns / folder, seed=900 + i, rank=8,
                           base_model_name=base_name)
        folders.append(folder)
    sdk = HybridServeClient(address, api_key=admin_key)
    sdk.create_tenant(tenant)
    metrics = Metrics()
    ctl = Controller(KubeObjects(api, ns, metrics), PlatformAdmin(sdk, metrics), metrics,
                     watch_timeout_s=5, namespace_tenants={ns: frozenset({tenant})})
    thread = threading.Thread(target=ctl.run, daemon=True)
    thread.start()
    ctl.synced.wait(30)
    objects = client.CustomObjectsApi(api)
    times = []
    for i, folder in enumerate(folders):
        name = f"skill-{i}"
        t0 = time.perf_counter()
        objects.create_namespaced_custom_object("hybridserve.dev", "v1alpha1", ns, "loraadapters", {
            "apiVersion": "hybridserve.dev/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name}, "spec": {"source": folder, "tenants": [tenant]}})
        while True:
            obj = objects.get_namespaced_custom_object("hybridserve.dev", "v1alpha1", ns,
                                                       "loraadapters", name)
            conds = (obj.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                break
            time.sleep(0.01)
        times.append(time.perf_counter() - t0)
    time.sleep(1)
    converged = _counts(metrics)
    time.sleep(steady_s)
    steady = _counts(metrics)
    ctl.stop.set()
    thread.join(10)
    for i in range(n):  # leave the platform as it was
        adapter = objects.get_namespaced_custom_object(
            "hybridserve.dev", "v1alpha1", ns, "loraadapters", f"skill-{i}")["status"]["adapterId"]
        sdk.revoke_adapter(tenant, adapter)
        sdk.unregister_adapter(adapter)
    sdk.delete_tenant(tenant)
    sdk.close()
    working = converged.get("reconcile:ready", 0)
    per = {k: round(v / working, 2) for k, v in converged.items()
           if not k.startswith("reconcile") and ":watch" not in k and ":list" not in k}
    delta = {k: steady.get(k, 0) - converged.get(k, 0) for k in set(steady) | set(converged)}
    return {
        "adapters": n,
        "create_to_ready_ms": {"p50": round(_pct(times, 0.5) * 1000, 1),
                               "max": round(max(times) * 1000, 1),
                               "all": [round(t * 1000, 1) for t in times]},
        "calls_per_ready_reconcile": per,
        "reconciles": {k: v for k, v in converged.items() if k.startswith("reconcile")},
        "steady_window_s": steady_s,
        "steady_calls_excluding_watch": sum(v for k, v in delta.items()
                                            if ":watch" not in k and not k.startswith("reconcile")),
        "steady_watch_renewals": delta.get("kubernetes:watch", 0),
        "steady_reconciles": {k: v for k, v in delta.items() if k.startswith("reconcile") and v},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--steady-s", type=float, default=30)
    p.add_argument("--address", help="use a running platform")
    p.add_argument("--api-key-file", help="its admin key")
    p.add_argument("--store-dir", help="its adapter store (with --address)")
    p.add_argument("--base-dir", help="its base model folder (with --address)")
    p.add_argument("--base-name", default="tiny-llama", help="its served model name")
    p.add_argument("--smoke", action="store_true", help="one short round of each part")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.adapters, args.steady_s = 1, 1, 3

    from testkit.kube import KubeTestCluster, missing_tools, missing_tools_hint

    if missing_tools():
        sys.exit(missing_tools_hint())
    work = Path(tempfile.mkdtemp(prefix="hs-k8s-bench-"))
    running = None
    if args.address:
        from hybridserve.client import resolve_api_key

        address, admin_key = args.address, resolve_api_key(None, args.api_key_file)
        store_dir, base_dir, base_name = args.store_dir, args.base_dir, args.base_name
    else:
        from rag import start_platform

        running, cfg, base_dir, base_name = start_platform("tiny", work)
        address, store_dir = running.grpc_address, cfg.adapter_store
        from hybridserve.tenancy.bootstrap import read_key_file

        admin_key = read_key_file(cfg.admin_key_path)
    kube = KubeTestCluster(work / "kube").start()
    try:
        results = {"helm": kube.helm("version", "--short").stdout.strip(), "args": vars(args),
                   "render": bench_render(kube, args.rounds)}
        print("render:", json.dumps(results["render"]), flush=True)
        results["controller"] = bench_controller(kube, address, admin_key, store_dir, base_dir,
                                                 base_name, args.adapters, args.steady_s)
        print("controller:", json.dumps(results["controller"]), flush=True)
    finally:
        kube.stop()
        if running is not None:
            running.stop()
    out = ROOT / "benchmarks" / "results" / ("k8s-smoke.json" if args.smoke else "k8s.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
