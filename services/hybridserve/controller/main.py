"""`hybridserve-controller`: watches LoRAAdapter resources and reconciles them.

    hybridserve-controller --platform hs-grpc:9000 [--namespace NS] [--kubeconfig F]
        [--namespace-tenants NS=T1,T2 ...]

The admin key comes from $HYBRIDSERVE_API_KEY (the chart mounts it from the
admin Secret). The controller is the usual shape:

- a watcher thread: one LIST (the cache), then WATCH from its resourceVersion
  with bookmarks. A watch that ends (its timeout, a dropped connection) resumes
  from the last resourceVersion it saw; 410 Gone (the version was compacted
  away) relists; an API server that cannot be reached is retried with
  exponential backoff.
- a worker thread: takes object keys off a queue and reconciles the cached
  object. A failure requeues the key with per-key exponential backoff; an event
  for the key runs it at once.

A process restart starts with a LIST: converged objects cost no call, and
objects that were still failing are picked up again (a resourceVersion kept
across restarts would skip those).

Metrics (prometheus-client, on --metrics-port): reconciles by outcome, errors,
time to Ready, watch restarts by reason, and API calls by target.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hybridserve.client import HybridServeClient
from hybridserve.controller import GROUP, PLURAL, VERSION
from hybridserve.controller.reconcile import Reconciler, is_converged, parse_namespace_tenants

log = logging.getLogger("hybridserve.controller")

Key = tuple[str, str]  # (namespace, name)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.registry = r
        p = "hybridserve_controller"
        self.reconciles = Counter(f"{p}_reconciles", "LoRAAdapter reconciles, by outcome "
                                  "(ready, skipped, failed, blocked, deleted, error).",
                                  ["outcome"], registry=r)
        self.errors = Counter(f"{p}_errors", "Errors, by where they happened "
                              "(reconcile, watch).", ["stage"], registry=r)
        self.time_to_ready = Histogram(
            f"{p}_time_to_ready_seconds",
            "From the controller first seeing a generation of a LoRAAdapter to its Ready status.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.watch_restarts = Counter(f"{p}_watch_restarts", "Watch restarts, by reason "
                                      "(timeout, gone, error).", ["reason"], registry=r)
        self.api_calls = Counter(f"{p}_api_calls", "Calls the controller made, by target "
                                 "(kubernetes, platform) and call.", ["target", "call"], registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Object keys waiting to be reconciled.",
                                 registry=r)


class DelayQueue:
    """Keys to reconcile, each at most once; `add` runs one now, `retry` later with
    per-key exponential backoff, `forget` resets a key's backoff."""

    def __init__(self, base_s: float = 1.0, max_s: float = 300.0, clock=time.monotonic):
        self._heap: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._cond = threading.Condition()
        self._seq = 0
        self._base, self._max, self._clock = base_s, max_s, clock
        self.closed = False

    def _put(self, key: Key, at: float) -> None:
        if key in self._due and self._due[key] <= at:
            return
        self._due[key] = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, key))
        self._cond.notify()

    def add(self, key: Key) -> None:
        with self._cond:
            self._put(key, self._clock())

    def retry(self, key: Key) -> float:
        with self._cond:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
            delay = min(self._max, self._base * 2 ** n)
            self._put(key, self._clock() + delay)
            return delay

    def forget(self, key: Key) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def get(self, timeout: float | None = None) -> Key | None:
        """The next due key; None on close or timeout."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self.closed:
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier due time
                now = self._clock()
                if self._heap and self._heap[0][0] <= now:
                    _, _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    return key
                wait = (self._heap[0][0] - now) if self._heap else None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
            return None

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class KubeObjects:
    """The Kubernetes side: LoRAAdapter list/watch/patch through CustomObjectsApi."""

    def __init__(self, api_client, namespace: str | None, metrics: Metrics):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.metrics = metrics

    def count(self, call: str) -> None:
        self.metrics.api_calls.labels("kubernetes", call).inc()

    def list_fn(self) -> Callable[..., Any]:
        if self.namespace:
            return lambda **kw: self.api.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, **kw)
        return lambda **kw: self.api.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw)

    def list(self) -> tuple[list[dict], str]:
        self.count("list")
        out = self.list_fn()(_request_timeout=30)
        return out.get("items", []), out["metadata"]["resourceVersion"]

    def set_finalizers(self, obj: dict, finalizers: list[str]) -> dict:
        self.count("patch")
        meta = obj["metadata"]
        # NOTE: the resourceVersion makes this a compare-and-swap: a finalizer list
        # someone else changed in between is a 409, and the key is retried.
        return self.api.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
            {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}},
            _request_timeout=30)

    def patch_status(self, obj: dict, status: dict) -> dict:
        self.count("patch_status")
        meta = obj["metadata"]
        # NOTE: with the resourceVersion of the object this reconcile read: a status
        # written from stale data is a 409, and the key is retried on fresh data.
        return self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
            {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status},
            _request_timeout=30)


class PlatformAdmin:
    """The platform side: the admin API through the SDK, with the admin key."""

    def __init__(self, client, metrics: Metrics, timeout_s: float = 60):
        self.client, self.metrics, self.timeout = client, metrics, timeout_s

    def _call(self, name: str, fn, *args, **kwargs):
        self.metrics.api_calls.labels("platform", name).inc()
        return fn(*args, timeout=self.timeout, **kwargs)

    def list_adapters(self):
        return self._call("ListAdapters", self.client.list_adapters)

    def get_tenant(self, tenant):
        return self._call("GetTenant", self.client.get_tenant, tenant)

    def register_adapter(self, name, path, *, version="", metadata=None):
        return self._call("RegisterAdapter", self.client.register_adapter, name, path,
                          version=version, metadata=metadata)

    def unregister_adapter(self, adapter_id):
        return self._call("UnregisterAdapter", self.client.unregister_adapter, adapter_id)

    def grant_adapter(self, tenant, adapter, *, make_default=False):
        return self._call("GrantAdapter", self.client.grant_adapter, tenant, adapter,
                          make_default=make_default)

    def revoke_adapter(self, tenant, adapter):
        return self._call("RevokeAdapter", self.client.revoke_adapter, tenant, adapter)


def _key(obj: dict) -> Key:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


class Controller:
    def __init__(self, kube: KubeObjects, platform, metrics: Metrics, *,
                 watch_timeout_s: int = 300, backoff_max_s: float = 30.0,
                 retry_base_s: float = 1.0, retry_max_s: float = 300.0,
                 namespace_tenants=None):
        self.kube = kube
        self.metrics = metrics
        self.reconciler = Reconciler(kube, platform, namespace_tenants)
        self.queue = DelayQueue(retry_base_s, retry_max_s)
        self.cache: dict[Key, dict] = {}
        self._lock = threading.Lock()
        self._first_seen: dict[tuple[Key, int], float] = {}
        # (uid, generation) of each resource this process made Ready: the watch then
        # echoes our own finalizer and status writes back, and those need no reconcile.
        self._done: dict[Key, tuple[str, int]] = {}
        self.watch_timeout_s = watch_timeout_s
        self.backoff_max_s = backoff_max_s
        self.stop = threading.Event()
        self.resource_version: str | None = None
        self.synced = threading.Event()

    # -- the watcher ------------------------------------------------------------------

    def _store(self, obj: dict, deleted: bool = False) -> None:
        key = _key(obj)
        with self._lock:
            if deleted:
                self.cache.pop(key, None)
                self._done.pop(key, None)
                for seen in [k for k in self._first_seen if k[0] == key]:
                    del self._first_seen[seen]
                return
            self.cache[key] = obj
            gen = obj["metadata"].get("generation", 0)
            self._first_seen.setdefault((key, gen), time.monotonic())
        if not is_converged(obj) and not self._is_done(key, obj):
            self.queue.add(key)

    def _is_done(self, key: Key, obj: dict) -> bool:
        meta = obj["metadata"]
        return (not meta.get("deletionTimestamp")
                and self._done.get(key) == (meta.get("uid"), meta.get("generation")))

    def _relist(self) -> None:
        items, rv = self.kube.list()
        with self._lock:
            gone = set(self.cache) - {_key(o) for o in items}
            for key in gone:
                self.cache.pop(key, None)
        for obj in items:
            self._store(obj)
        self.resource_version = rv
        self.synced.set()
        log.info("listed %d LoRAAdapter(s) at resourceVersion %s", len(items), rv)

    def watch_forever(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        need_list = True
        while not self.stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                w = watch.Watch()
                self.kube.count("watch")
                for event in w.stream(self.kube.list_fn(), resource_version=self.resource_version,
                                      timeout_seconds=self.watch_timeout_s,
                                      allow_watch_bookmarks=True,
                                      _request_timeout=self.watch_timeout_s + 30):
                    if self.stop.is_set():
                        w.stop()
                        return
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        if isinstance(obj, dict) and obj.get("code") == 410:
                            raise ApiException(status=410, reason="Gone")
                        raise RuntimeError(f"watch error event: {obj}")
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        self.resource_version = rv
                    if kind == "BOOKMARK":
                        continue
                    self._store(obj, deleted=(kind == "DELETED"))
                    backoff = 0.5
                self.metrics.watch_restarts.labels("timeout").inc()
            except ApiException as e:
                if e.status == 410:
                    log.info("watch resourceVersion %s is too old (410 Gone): relisting",
                             self.resource_version)
                    self.metrics.watch_restarts.labels("gone").inc()
                    need_list = True
                    continue
                self._watch_failed(e, backoff)
                backoff = min(self.backoff_max_s, backoff * 2)
            except Exception as e:  # noqa: BLE001 - an unreachable API server, a reset
                self._watch_failed(e, backoff)
                backoff = min(self.backoff_max_s, backoff * 2)

    def _watch_failed(self, e: Exception, backoff: float) -> None:
        self.metrics.errors.labels("watch").inc()
        self.metrics.watch_restarts.labels("error").inc()
        log.warning("watch failed (%s: %s); retrying in %.1f s", type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "", backoff)
        self.stop.wait(backoff)

    # -- the worker -------------------------------------------------------------------

    def work_forever(self) -> None:
        while not self.stop.is_set():
            key = self.queue.get(timeout=1.0)
            self.metrics.queue_depth.set(len(self.queue))
            if key is None:
                continue
            with self._lock:
                obj = self.cache.get(key)
            if obj is None:
                continue
            if self._is_done(key, obj):  # queued before its reconcile finished
                self.metrics.reconciles.labels("skipped").inc()
                continue
            self.process(key, obj)

    def process(self, key: Key, obj: dict) -> None:
        try:
            outcome = self.reconciler.reconcile(obj)
        except Exception as e:  # noqa: BLE001 - the platform, the API server, urllib3, a bug:
            # never the worker thread's end; the key is retried with backoff.
            self.metrics.errors.labels("reconcile").inc()
            self.metrics.reconciles.labels("error").inc()
            delay = self.queue.retry(key)
            log.warning("reconcile %s/%s failed (%s: %s); retrying in %.0f s", *key,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", delay)
            return
        self.metrics.reconciles.labels(outcome.kind).inc()
        if outcome.kind == "deleted":
            self._done.pop(key, None)
        if outcome.kind == "ready":
            gen = obj["metadata"].get("generation", 0)
            self._done[key] = (obj["metadata"].get("uid"), gen)
            with self._lock:
                seen = self._first_seen.pop((key, gen), None)
            if seen is not None:
                self.metrics.time_to_ready.observe(time.monotonic() - seen)
            log.info("%s/%s ready: %s", *key, outcome.message)
        if outcome.retry:
            delay = self.queue.retry(key)
            log.info("%s/%s %s: %s (again in %.0f s)", *key, outcome.kind, outcome.message, delay)
        else:
            self.queue.forget(key)

    def run(self) -> None:
        threads = [threading.Thread(target=self.watch_forever, name="watch", daemon=True),
                   threading.Thread(target=self.work_forever, name="work", daemon=True)]
        for t in threads:
            t.start()
        self.stop.wait()
        self.queue.close()
        for t in threads:
            t.join(timeout=5)


def _api_client(kubeconfig: str | None):
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridserve-controller", description=__doc__.splitlines()[0])
    p.add_argument("--platform", required=True,
                   help="gRPC address of the platform (Serve's gRPC proxy), host:port")
    p.add_argument("--namespace", default=os.environ.get("HYBRIDSERVE_CONTROLLER_NAMESPACE"),
                   help="watch this namespace only (default: $HYBRIDSERVE_CONTROLLER_NAMESPACE, "
                   "else every namespace)")
    p.add_argument("--namespace-tenants", action="append", default=[], metavar="NS=T1,T2",
                   help="the tenants the LoRAAdapters of namespace NS may grant to (repeatable); "
                   "a namespace not listed may grant to none")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else ~/.kube/config)")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus metrics port (0: off)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics server binds")
    p.add_argument("--api-key-file", help="admin key file (default: $HYBRIDSERVE_API_KEY)")
    p.add_argument("--tls", action="store_true", help="TLS to the platform")
    p.add_argument("--watch-timeout", type=int, default=300,
                   help="seconds a watch request lasts before it is renewed")
    p.add_argument("--backoff-max", type=float, default=30.0,
                   help="longest wait between retries of the API server, in seconds")
    p.add_argument("--retry-max", type=float, default=300.0,
                   help="longest wait between retries of one failing LoRAAdapter, in seconds")
    p.add_argument("--rpc-timeout", type=float, default=120.0,
                   help="deadline of each admin call to the platform, in seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        namespace_tenants = parse_namespace_tenants(ns.namespace_tenants)
    except ValueError as e:
        parser.error(f"--namespace-tenants: {e}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = Metrics()
    if ns.metrics_port:
        start_http_server(ns.metrics_port, addr=ns.metrics_host, registry=metrics.registry)
    client = HybridServeClient(ns.platform, api_key_file=ns.api_key_file, tls=ns.tls)
    controller = Controller(
        KubeObjects(_api_client(ns.kubeconfig), ns.namespace, metrics),
        PlatformAdmin(client, metrics, ns.rpc_timeout), metrics,
        watch_timeout_s=ns.watch_timeout, backoff_max_s=ns.backoff_max, retry_max_s=ns.retry_max,
        namespace_tenants=namespace_tenants)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: controller.stop.set())
    log.info("watching LoRAAdapters in %s; platform %s; grants allowed: %s",
             ns.namespace or "every namespace", ns.platform,
             "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(namespace_tenants.items()))
             or "none")
    controller.run()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
