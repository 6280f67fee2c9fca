"""Writes helm/hybridserve/values.schema.json.

The chart's own values are described here; its `config` value is the platform's
typed config, so its schema is generated from the pydantic model: `helm install`
refuses a config that `hybridserve up` would refuse (unknown keys, wrong types,
out-of-range numbers) before anything reaches the cluster.

tests/unit/test_chart.py fails when the file is stale.
Usage: python scripts/gen_chart_schema.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hybridserve.config import MOVED_KEYS, HybridServeConfig

OUT = Path(__file__).resolve().parent.parent / "helm" / "hybridserve" / "values.schema.json"


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    out.update(extra)
    return out


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT0 = {"type": "integer", "minimum": 0}
INT1 = {"type": "integer", "minimum": 1}
QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"},
                      {"type": "number", "minimum": 0}]}
SIZE = {"type": "string", "pattern": r"^[0-9]+(Ki|Mi|Gi|Ti)$"}
RESOURCES = obj({
    "requests": {"type": "object", "additionalProperties": QUANTITY},
    "limits": {"type": "object", "additionalProperties": QUANTITY},
})
IMAGE_REF = {"type": "string", "minLength": 1}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
DNS_NAME = {"type": "string", "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "maxLength": 63}


def config_schema() -> tuple[dict, dict]:
    """The pydantic schema of the config (without its $defs) and its $defs."""
    schema = HybridServeConfig.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})
    schema.pop("title", None)
    schema["description"] = "The platform's typed config (docs/config.md)."
    # NOTE: the chart needs these to render the Serve config and the pods.
    schema["required"] = ["data_dir", "serve"]
    serve = defs["ServeConfig"]
    serve["required"] = ["grpc_host", "grpc_port", "http_port", "apps"]
    # Keys that moved stay accepted (the platform maps them and warns), so that a
    # values file written for an older chart still installs.
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        defs[f"{section.capitalize()}Config"]["properties"][key] = {
            "deprecated": True, "description": f"Deprecated: use config.{new} (docs/config.md, Migration)."}
    return schema, defs


def build() -> dict:
    config, defs = config_schema()
    workers = {"minReplicas": INT0, "maxReplicas": INT0, "resources": RESOURCES}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hybridserve chart values",
        **obj({
            "nameOverride": DNS_NAME,
            "fullnameOverride": DNS_NAME,
            "image": obj({
                "repository": IMAGE_REF,
                "tag": STR,
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            }, ["repository"]),
            "imagePullSecrets": {"type": "array", "items": obj({"name": STR}, ["name"])},
            "config": config,
            "ray": obj({
                "version": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
                "autoscaling": BOOL,
                "idleTimeoutSeconds": INT0,
                "terminationGracePeriodSeconds": {"type": "integer", "minimum": 30},
                "adapterCacheSize": SIZE,
                "tokenAuth": BOOL, "mtls": BOOL, "readOnlyRootFilesystem": BOOL,
                "head": obj({"resources": RESOURCES, "numCpus": INT0}),
                "cpuWorkers": obj(workers),
                "gpuWorkers": obj({
                    **workers, "enabled": BOOL, "gpusPerPod": INT1,
                    "acceleratorType": STR,
                    "tolerations": {"type": "array", "items": {"type": "object"}},
                }),
            }),
            "service": obj({
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": PORT,
                "httpPort": PORT,
            }),
            "openai": obj({
                "ingress": obj({
                    "enabled": BOOL,
                    "className": STR,
                    # An empty host: any host.
                    "host": {"type": "string", "pattern": r"^((\*\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$"},
                    "annotations": {"type": "object", "additionalProperties": STR},
                    "tls": {"type": "array", "items": obj({
                        "secretName": STR,
                        "hosts": {"type": "array", "items": STR},
                    })},
                }),
            }),
            "storage": obj({"size": SIZE, "storageClass": STR, "existingClaim": DNS_NAME}),
            "weaviate": obj({
                "enabled": BOOL,
                # No credentials in the URL: it travels in the Serve config.
                "externalUrl": {"type": "string", "pattern": r"^(https?://[^@/]+(/.*)?)?$"},
                "existingSecret": DNS_NAME,
                "image": IMAGE_REF, "storageSize": SIZE, "storageClass": STR,
                "resources": RESOURCES,
            }),
            "postgresql": obj({
                "enabled": BOOL, "externalSecret": DNS_NAME, "image": IMAGE_REF,
                "storageSize": SIZE, "resources": RESOURCES,
            }),
            "redis": obj({
                "enabled": BOOL,
                "externalUrl": {"type": "string", "pattern": r"^((redis|rediss|unix)://.+)?$"},
                "existingSecret": DNS_NAME,
                "image": IMAGE_REF, "resources": RESOURCES,
            }),
            "admin": obj({
                "existingSecret": DNS_NAME,
                "key": {"type": "string", "pattern": r"^(hsa_[A-Za-z0-9]{12}_[A-Za-z0-9_-]{43})?$"},
            }),
            "tenants": obj({
                "enabled": BOOL, "existingConfigMap": DNS_NAME,
                "file": {"type": "object"},
                "activeDeadlineSeconds": INT1,
            }),
            "controller": obj({
                "enabled": BOOL, "retryMaxSeconds": INT1,
                "namespaceTenants": {"type": "object", "additionalProperties": {
                    "type": "array", "items": {
                        "type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"}}},
                "metricsPort": {"type": "integer", "minimum": 1024, "maximum": 65535},
                "resources": RESOURCES,
            }),
            "monitoring": obj({
                "podMonitor": BOOL, "rules": BOOL, "dashboards": BOOL,
                "dashboardLabel": {"type": "string", "minLength": 1},
                "labels": {"type": "object", "additionalProperties": STR},
                "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
            }),
            "networkPolicy": obj({
                "enabled": BOOL,
                "metricsFrom": {"type": "object", "additionalProperties": STR},
                "operatorFrom": {"type": "object", "additionalProperties": STR, "minProperties": 1},
                "dnsTo": {"type": "array", "minItems": 1, "items": {"type": "object"}},
                "apiServerCidrs": {"type": "array", "items": {
                    "type": "string", "pattern": r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"}},
                "apiServerPorts": {"type": "array", "minItems": 1, "items": {
                    "type": "integer", "minimum": 1, "maximum": 65535}},
                "extraEgress": {"type": "array", "items": {"type": "object"}},
            }),
            "podDisruptionBudget": obj({"enabled": BOOL}),
        }, ["image", "config", "ray", "admin"]),
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_chart_schema.py", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    OUT.write_text(text)
    print(f"wrote {OUT}")
