#!/usr/bin/env bash
# The main job, end to end on this machine: fine-tune two LoRA adapters (a
# persona and an output format, two tenants' "skills"), start the platform
# (Ray Serve + vLLM + a local weaviate-server), register them, and stream the
# same question through the base model and through each adapter; then give a
# tenant its knowledge: ingest a folder of articles and answer a question from
# it with hybrid search and reranking; last, what the platform measured (tokens
# per adapter, requests by status, adapter residency per replica) from the
# metrics endpoint Prometheus scrapes. Run via `make demo` (which installs first).
#
# Env: HYBRIDSERVE_DATA_DIR (default ~/.local/share/hybridserve),
#      HYBRIDSERVE_GRPC_PORT (default 50051), DEMO_PROMPT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HS=.venv/bin/hybridserve
PY=.venv/bin/python
export HF_HUB_OFFLINE=1
export HYBRIDSERVE_DATA_DIR=${HYBRIDSERVE_DATA_DIR:-$HOME/.local/share/hybridserve}
PROMPT=${DEMO_PROMPT:-"How do I keep my houseplants alive?"}
WORK=$(mktemp -d)
READY="$WORK/ready"
LOG="$WORK/up.log"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "preparing the default model (SmolLM2-135M-Instruct, offline, once)"
$HS models prepare

say "building the demo adapters (short CPU fine-tunes, ~30 s each, cached after the first run)"
$PY -m hybridserve.demo "$HYBRIDSERVE_DATA_DIR/adapters/pirate-tone"
$PY -m hybridserve.demo --format "$HYBRIDSERVE_DATA_DIR/adapters/json-answer"

say "starting the platform (Ray Serve + vLLM + weaviate-server; the engine takes ~30-60 s)"
$HS up --ready-file "$READY" >"$LOG" 2>&1 &
UP_PID=$!
cleanup() {
  if kill -0 "$UP_PID" 2>/dev/null; then
    say "stopping the platform"
    kill -INT "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  [ -s "$READY" ] && break
  if ! kill -0 "$UP_PID" 2>/dev/null; then
    echo "the platform failed to start; its log:" >&2; tail -40 "$LOG" >&2; exit 1
  fi
  sleep 1
done
[ -s "$READY" ] || { echo "the platform did not become healthy in 600 s; log: $LOG" >&2; tail -40 "$LOG" >&2; exit 1; }
ADDR=$(cat "$READY")
echo "gRPC on $ADDR"

say "registering the adapters (validated, snapshotted, immutable ids)"
register() { $HS adapters register --address "$ADDR" "$1" "$1" | $PY -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
PIRATE=$(register pirate-tone)
JSONA=$(register json-answer)
$HS adapters list --address "$ADDR"

say "base model, streamed: $PROMPT"
$HS generate --address "$ADDR" --chat --temperature 0 --max-tokens 80 "$PROMPT"

for ID in "$PIRATE" "$JSONA"; do
  say "adapter $ID, streamed: $PROMPT"
  $HS generate --address "$ADDR" --chat --temperature 0 --max-tokens 80 --adapter "$ID" "$PROMPT"
done

say "a tenant's knowledge: create tenant 'demo' and ingest its articles (re-running is safe)"
$HS admin tenants create --address "$ADDR" demo
$HS ingest --address "$ADDR" tests/data/knowledge/corpus.jsonl --tenant demo

QUESTION=${DEMO_QUESTION:-"How long can I wait before returning something I already opened?"}
say "hybrid search + rerank in tenant 'demo': $QUESTION"
$HS search --address "$ADDR" --tenant demo --top-k 3 --rerank "$QUESTION"

METRICS=$(sed -n 's/^  metrics: //p' "$LOG" | head -1)
say "what the platform measured ($METRICS, what Prometheus scrapes; Ray reports every 10 s)"
$PY - "$METRICS" "$PIRATE" "$JSONA" <<'PYEOF'
import sys, time, urllib.request
from collections import defaultdict
from prometheus_client.parser import text_string_to_metric_families

url, adapters = sys.argv[1], set(sys.argv[2:])
deadline = time.monotonic() + 60
while True:
    sums = defaultdict(float)
    for family in text_string_to_metric_families(urllib.request.urlopen(url, timeout=30).read().decode()):
        for s in family.samples:
            if s.name == "ray_hybridserve_completion_tokens_total":
                sums[("completion tokens", "adapter=" + s.labels["adapter"])] += s.value
            elif s.name == "ray_hybridserve_requests_total":
                sums[("requests", f"{s.labels['service']}.{s.labels['method']} {s.labels['code']}")] += s.value
            elif s.name == "ray_hybridserve_adapter_resident" and s.value:
                sums[("resident adapters", f"replica={s.labels['replica']} adapter={s.labels['adapter']}")] = 1
    seen = {k.split("=", 1)[1] for what, k in sums if what == "completion tokens"}
    if adapters <= seen or time.monotonic() > deadline:
        break
    time.sleep(2)
for (what, key), value in sorted(sums.items()):
    print(f"  {what:18} {key:55} {value:g}")
PYEOF
