"""The `hybridserve` command.

  hybridserve up                         start the platform locally (Ctrl-C stops it)
  hybridserve generate [--adapter ID] P  stream a generation
  hybridserve adapters list|register|unregister
  hybridserve models prepare             prepare the default model offline
  hybridserve finetune --data F --name N train, evaluate and register a LoRA adapter
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from hybridserve import constants
from hybridserve.errors import HybridServeError
from hybridserve.finetune.cli import add_finetune_parser


def _config(ns):
    from hybridserve.config import HybridServeConfig

    cfg = HybridServeConfig.load(ns.config)
    if getattr(ns, "port", None):
        cfg.serve.grpc_port = ns.port
    return cfg


def _address(ns) -> str:
    if ns.address:
        return ns.address
    cfg = _config(ns)
    return f"{cfg.serve.grpc_host}:{cfg.serve.grpc_port}"


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def cmd_up(ns) -> int:
    from hybridserve import platform

    cfg = _config(ns)
    plat = platform.start(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"hybridserve is up: gRPC on {plat.grpc_address} (reflection and grpc.health.v1 served)")
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


def cmd_generate(ns) -> int:
    from hybridserve.client import HybridServeClient

    kwargs = dict(
        adapter=ns.adapter or "",
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        seed=ns.seed,
        json_schema=ns.json_schema or "",
        timeout=ns.timeout,
    )
    if ns.chat or ns.system:
        msgs = ([("system", ns.system)] if ns.system else []) + [("user", ns.prompt)]
        kwargs["messages"] = msgs
        prompt = None
    else:
        prompt = ns.prompt
    with HybridServeClient(_address(ns)) as client:
        for msg in client.generate_stream(prompt, **kwargs):
            if msg.HasField("delta"):
                sys.stdout.write(msg.delta.text)
                sys.stdout.flush()
            else:
                f = msg.final
                print(file=sys.stdout)
                print(
                    f"[finish={f.finish_reason and _finish_name(f.finish_reason)} "
                    f"prompt_tokens={f.usage.prompt_tokens} completion_tokens={f.usage.completion_tokens} "
                    f"adapter={f.adapter or '(base)'} replica={f.replica_id}]",
                    file=sys.stderr,
                )
    return 0


def _finish_name(value: int) -> str:
    from hybridserve.v1 import common_pb2

    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def cmd_adapters(ns) -> int:
    from google.protobuf.json_format import MessageToDict

    from hybridserve.client import HybridServeClient

    with HybridServeClient(_address(ns)) as client:
        if ns.adapters_cmd == "list":
            adapters = client.list_adapters()
            if not adapters:
                print("no adapters registered; add one with `hybridserve adapters register NAME PATH`")
            for a in adapters:
                print(f"{a.id}\trank={a.rank}\tmodules={','.join(a.target_modules)}\tsize={a.size_bytes}")
        elif ns.adapters_cmd == "register":
            meta = dict(kv.split("=", 1) for kv in ns.meta or [])
            reply = client.register_adapter(ns.name, ns.path, version=ns.version or "", metadata=meta)
            print(json.dumps(MessageToDict(reply.adapter), indent=2))
            print("registered" if reply.created else "already registered (same content)", file=sys.stderr)
        elif ns.adapters_cmd == "unregister":
            client.unregister_adapter(ns.id)
            print(f"unregistered {ns.id}")
    return 0


def cmd_models(ns) -> int:
    from hybridserve.models import prepare_default_model

    cfg = _config(ns)
    path = prepare_default_model(cfg.cache_dir, dtype=cfg.model.dtype, progress=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridserve", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML/JSON config file (default: $HYBRIDSERVE_CONFIG or built-in defaults)")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start the platform locally; Ctrl-C stops it")
    up.add_argument("--port", type=int, help=f"gRPC port (default {constants.DEFAULT_GRPC_PORT})")
    up.add_argument("--ready-file", help="write the gRPC address here once healthy (for scripts)")
    up.set_defaults(func=cmd_up)

    def client_args(sp):
        sp.add_argument("--address", help="host:port of the platform (default: from config)")

    g = sub.add_parser("generate", help="stream a generation")
    client_args(g)
    g.add_argument("prompt")
    g.add_argument("--adapter", help="adapter id (name@version); default: the base model")
    g.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    g.add_argument("--system", help="system message (implies --chat)")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--json-schema", help="constrain the output to this JSON schema (a JSON string)")
    g.add_argument("--timeout", type=float, default=300, help="deadline in seconds (default 300)")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("adapters", help="manage LoRA adapters")
    asub = a.add_subparsers(dest="adapters_cmd", required=True)
    al = asub.add_parser("list", help="list registered adapters")
    client_args(al)
    ar = asub.add_parser("register", help="register an adapter folder inside the adapter store")
    client_args(ar)
    ar.add_argument("name")
    ar.add_argument("path", help="folder relative to the adapter store (<data_dir>/adapters)")
    ar.add_argument("--version", help="default: the first 12 hex digits of the content hash")
    ar.add_argument("--meta", action="append", metavar="KEY=VALUE")
    au = asub.add_parser("unregister", help="remove an adapter from the registry")
    client_args(au)
    au.add_argument("id")
    a.set_defaults(func=cmd_adapters)

    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("prepare", help="prepare the default model (offline, once)")
    m.set_defaults(func=cmd_models)

    add_finetune_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except HybridServeError as e:
        return _err(e.message)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        import grpc

        if isinstance(e, grpc.RpcError):
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return _err(
                    f"cannot reach hybridserve ({e.details()}); start it with `hybridserve up` "
                    "or pass --address host:port"
                )
            return _err(f"{e.code().name}: {e.details()}")
        raise


if __name__ == "__main__":
    sys.exit(main())
