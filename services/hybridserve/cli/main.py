"""The `hybridserve` command.

  hybridserve up [--with-prometheus]     start the platform locally (Ctrl-C stops it)
  hybridserve ask QUESTION               answer from the tenant's documents through its adapter
  hybridserve generate [--adapter ID] P  stream a generation
  hybridserve adapters list|register|unregister
  hybridserve models prepare             prepare the default model offline
  hybridserve finetune --data F --name N train, evaluate and register a LoRA adapter
  hybridserve ingest PATH [--tenant T]   ingest .txt/.md/.html/.jsonl files (safe to re-run)
  hybridserve search QUERY [--tenant T]  hybrid search in a tenant's documents
  hybridserve delete [--tenant T] ID...  delete documents
  hybridserve rerank QUERY PASSAGE...    score and order passages
  hybridserve eval --questions F         a question set through base, adapter, rag, rag+adapter
  hybridserve admin ...                  tenants, keys, grants, quotas, apply, audit
  hybridserve serve-config               print the Serve config (KubeRay serveConfigV2) of a config
  hybridserve-controller                 the LoRAAdapter controller (Kubernetes)

Every command that talks to the platform sends an API key: $HYBRIDSERVE_API_KEY,
else --api-key-file, else the local admin key <data_dir>/admin.key that the first
`hybridserve up` wrote.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from hybridserve.cli import admin, client_cmds, finetune, server
from hybridserve.cli.client_cmds import err
from hybridserve.cli.eval import add_eval_parser
from hybridserve.errors import HybridServeError
from hybridserve.exceptions import ApiKeyFileError, from_rpc_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridserve", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML/JSON config file (default: $HYBRIDSERVE_CONFIG or built-in defaults)")
    sub = p.add_subparsers(dest="cmd", required=True)
    server.add_up_parser(sub)
    server.add_serve_config_parser(sub)
    client_cmds.add_ask_parser(sub)
    client_cmds.add_generate_parser(sub)
    client_cmds.add_adapters_parser(sub)
    server.add_models_parser(sub)
    client_cmds.add_ingest_parser(sub)
    client_cmds.add_search_parser(sub)
    client_cmds.add_delete_parser(sub)
    client_cmds.add_rerank_parser(sub)
    add_eval_parser(sub)
    finetune.add_finetune_parser(sub)
    admin.add_admin_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (HybridServeError, ApiKeyFileError) as e:
        return err(e.message)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        # `pip install hybridserve` gives the SDK and the client commands; the
        # platform's commands (up, serve-config, models, finetune) need its extra.
        if e.name and e.name.split(".")[0] not in ("hybridserve", "grpc", "google"):
            return err(f"this command needs the platform's dependencies (missing module "
                       f"{e.name!r}): pip install 'hybridserve[server]'")
        raise
    except Exception as e:
        if isinstance(e, grpc.RpcError):
            e = from_rpc_error(e)
            if e.code() == grpc.StatusCode.UNAVAILABLE and not e.reason:
                return err(
                    f"cannot reach hybridserve ({e.details()}); start it with `hybridserve up` "
                    "or pass --address host:port"
                )
            hint = ""
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                hint = ("\n  the key comes from $HYBRIDSERVE_API_KEY, --api-key-file, or the local "
                        "admin key file that `hybridserve up` wrote")
            for field, what in e.field_violations:
                hint += f"\n  {field}: {what}"
            return err(f"{e.code().name}: {e.details()}{hint}")
        raise


if __name__ == "__main__":
    sys.exit(main())
