"""A real Kubernetes API server on loopback, for the chart and controller tests.

etcd and kube-apiserver (built by scripts/install_k8s.sh into the cache) run
as child processes with a self-signed serving certificate and a static admin
token. Nothing else of Kubernetes runs: no kubelet, scheduler or controller
manager, so objects are stored and validated (CRD schemas included) but Pods
stay Pending, Jobs never run and namespaces never finish terminating.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

from hybridserve import constants, localproc

TOOLS = ("etcd", "kube-apiserver", "helm")


def tool(name: str) -> Path:
    return Path(os.environ.get("HYBRIDSERVE_CACHE_DIR", constants.CACHE_DIR)).expanduser() / "bin" / name


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not tool(t).is_file()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class KubeTestCluster:
    """etcd + kube-apiserver in `root`; `kubeconfig` is an admin kubeconfig."""

    def __init__(self, root: Path, *, watch_cache: bool = True):
        self.root = root
        self.watch_cache = watch_cache
        self.etcd_port, self.etcd_peer_port = _free_port(), _free_port()
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.kubeconfig = root / "kubeconfig"
        self._etcd: subprocess.Popen | None = None
        self._apiserver: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def _certs(self) -> None:
        pki = self.root / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"), "-subj", "/CN=test-ca")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "server.key"),
                 "-out", str(pki / "server.csr"), "-subj", "/CN=kube-apiserver")
        (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", str(pki / "server.csr"), "-CA", str(pki / "ca.crt"),
                 "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(pki / "server.crt"), "-extfile", str(pki / "san.ext"))
        _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
        (pki / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')

    def start(self, timeout_s: float = 120) -> KubeTestCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self._certs()
        self.start_etcd()
        self.start_apiserver(timeout_s)
        ca = (self.root / "pki" / "ca.crt").resolve()
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": str(ca)}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin",
                                                      "namespace": "default"}}],
        }))
        self.kubeconfig.chmod(0o600)
        return self

    def start_etcd(self) -> None:
        log = self.root / "etcd.log"
        self._etcd = localproc.launch(
            [str(tool("etcd")), "--data-dir", str(self.root / "etcd"),
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
             "--initial-cluster", f"default=http://127.0.0.1:{self.etcd_peer_port}",
             "--quota-backend-bytes", str(1 << 30), "--log-level", "warn"], log, {})
        localproc.await_ready(self._etcd, f"{self.etcd_url}/health", 30, "etcd", log)

    def start_apiserver(self, timeout_s: float = 120) -> None:
        pki = self.root / "pki"
        log = self.root / "kube-apiserver.log"
        args = [
            str(tool("kube-apiserver")), "--etcd-servers", self.etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.port),
            "--tls-cert-file", str(pki / "server.crt"), "--tls-private-key-file", str(pki / "server.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--token-auth-file", str(pki / "tokens.csv"),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--authorization-mode", "RBAC",
            # NOTE: a loopback advertise address is refused without this.
            "--endpoint-reconciler-type", "none",
            "--enable-priority-and-fairness=false",
            f"--watch-cache={'true' if self.watch_cache else 'false'}",
        ]
        self._apiserver = localproc.launch(args, log, {})
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def ready() -> bool:
            req = urllib.request.Request(f"{self.url}/readyz",
                                         headers={"Authorization": f"Bearer {self.token}"})
            try:
                return urllib.request.urlopen(req, context=ctx, timeout=2).read() == b"ok"
            except OSError:
                return False

        localproc.await_ready(self._apiserver, ready, timeout_s, "kube-apiserver", log)

    def stop_apiserver(self) -> None:
        localproc.terminate(self._apiserver)
        self._apiserver = None

    def compact_etcd(self) -> int:
        """Compacts etcd at its current revision (what kube-apiserver does every 5
        minutes); watches from older resourceVersions then get 410 Gone."""
        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(f"{self.etcd_url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=10).read())

        # NOTE: a compaction at revision R keeps R itself; one write outside the API
        # server's keys first, so that the last real change is compacted away too.
        key = base64.b64encode(b"/hybridserve-test/compaction").decode()
        rev = int(post("/v3/kv/put", {"key": key, "value": "AA=="})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def stop(self) -> None:
        self.stop_apiserver()
        localproc.terminate(self._etcd)
        self._etcd = None

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root / "home"),
               "KUBECONFIG": str(self.kubeconfig),
               "HELM_CACHE_HOME": str(self.root / "helm" / "cache"),
               "HELM_CONFIG_HOME": str(self.root / "helm" / "config"),
               "HELM_DATA_HOME": str(self.root / "helm" / "data")}
        return subprocess.run([str(tool("helm")), *args], env=env, capture_output=True, text=True,
                              check=check, timeout=timeout)


def missing_tools_hint() -> str:
    return ("the Kubernetes test tools are missing (" + ", ".join(missing_tools())
            + "): run scripts/install_k8s.sh (make test does)")
