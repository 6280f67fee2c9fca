#!/usr/bin/env bash
# The main job, end to end on this machine: two tenants, each with its own documents
# (its knowledge) and its own LoRA adapter (its skill), ask a question that only their
# own documents answer, and get a streamed, cited answer written through their own
# adapter, with the time each stage took. Then tenant B tries tenant A's adapter and
# A's documents, and gets PERMISSION_DENIED and no hit.
#
# Steps: prepare the default model and fine-tune the two demo adapters (cached after
# the first run); start the platform (Ray Serve + vLLM + weaviate-server + Redis);
# register the adapters; apply the tenants file (tenants, grants, defaults, quotas);
# create a key per tenant; ingest each tenant's folder with its own key; ask; show
# the isolation; last, what the platform measured. Run via `make demo`.
#
# Env: HYBRIDSERVE_DATA_DIR (default ~/.local/share/hybridserve),
#      HYBRIDSERVE_GRPC_PORT (default 50051).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HS=.venv/bin/hybridserve
PY=.venv/bin/python
export HF_HUB_OFFLINE=1
export HYBRIDSERVE_DATA_DIR=${HYBRIDSERVE_DATA_DIR:-$HOME/.local/share/hybridserve}
WORK=$(mktemp -d)
READY="$WORK/ready"
LOG="$WORK/up.log"
QUESTION_A=${DEMO_QUESTION_A:-"What is the heaviest payload I can fly on a Kestrel rideshare?"}
QUESTION_B=${DEMO_QUESTION_B:-"How long are your plants guaranteed?"}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "preparing the default model (SmolLM2-135M-Instruct, offline, once)"
$HS models prepare

say "building the two tenants' adapters (short CPU fine-tunes, cached after the first run)"
# examples/adapters/NAME/train.jsonl -> $HYBRIDSERVE_DATA_DIR/adapters/NAME, trained on every
# example (--output: no evaluation, no registering; reused while the inputs are the same).
# The recipe (examples/adapters/README.md): rank 8, alpha 16, q/k/v/o on the upper half of
# SmolLM2-135M's 30 layers, lr 2e-3, batch 4, seed 0.
train_adapter() {  # NAME STEPS
  local out="$HYBRIDSERVE_DATA_DIR/adapters/$1"
  # A folder an older demo built carries its old marker, not finetune's: --output refuses
  # folders it did not write, so that one is rebuilt.
  if [ -f "$out/.hybridserve-demo-adapter.json" ] && [ ! -f "$out/.hybridserve-finetune.json" ]; then
    rm -rf "$out"
  fi
  $HS finetune --data "examples/adapters/$1/train.jsonl" --name "$1" --steps "$2" \
    --rank 8 --alpha 16 --lr 2e-3 --batch-size 4 --layers 15-29 --seed 0 \
    --output "$HYBRIDSERVE_DATA_DIR/adapters/$1"
}
train_adapter pirate-tone 35
train_adapter json-answer 36

say "starting the platform (Ray Serve + vLLM + weaviate-server + Redis; the engine takes ~30-60 s)"
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
echo "gRPC on $ADDR; the admin key is in $HYBRIDSERVE_DATA_DIR/admin.key (the CLI uses it)"

say "registering the adapters (validated, snapshotted, immutable ids)"
register() { $HS adapters register --address "$ADDR" "$1" "$1" | $PY -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
PIRATE=$(register pirate-tone)
JSONA=$(register json-answer)
$HS adapters list --address "$ADDR"

say "applying the tenants file: acme gets $PIRATE, globex gets $JSONA (idempotent)"
sed -e "s/@PIRATE@/$PIRATE/g" -e "s/@JSON@/$JSONA/g" examples/tenants/tenants.yaml.in > "$WORK/tenants.yaml"
$HS admin apply --address "$ADDR" -f "$WORK/tenants.yaml"

say "one API key per tenant (shown once; only its digest is stored)"
KEY_A=$($HS admin keys create acme --name demo --address "$ADDR")
KEY_B=$($HS admin keys create globex --name demo --address "$ADDR")
as_a() { HYBRIDSERVE_API_KEY=$KEY_A "$@"; }
as_b() { HYBRIDSERVE_API_KEY=$KEY_B "$@"; }

say "each tenant ingests its own documents with its own key"
as_a $HS ingest --address "$ADDR" examples/tenants/acme
as_b $HS ingest --address "$ADDR" examples/tenants/globex

say "acme asks (its documents, its adapter $PIRATE): $QUESTION_A"
as_a $HS ask --address "$ADDR" --temperature 0 --max-tokens 96 --show-timings "$QUESTION_A"

say "globex asks (its documents, its adapter $JSONA): $QUESTION_B"
as_b $HS ask --address "$ADDR" --temperature 0 --max-tokens 96 --show-timings "$QUESTION_B"

say "isolation: globex tries acme's adapter"
if as_b $HS ask --address "$ADDR" --adapter "$PIRATE" --max-tokens 8 "$QUESTION_A" 2>"$WORK/denied"; then
  echo "globex could use acme's adapter: that must not happen" >&2; exit 1
fi
grep -q PERMISSION_DENIED "$WORK/denied" || { cat "$WORK/denied" >&2; exit 1; }
sed 's/^/  /' "$WORK/denied"

say "isolation: globex searches for acme's payload rules"
HITS=$(as_b $HS search --address "$ADDR" --json --top-k 10 "Kestrel rideshare payload 250 kilograms")
echo "$HITS" | $PY -c '
import json, sys
hits = json.load(sys.stdin)
leaked = [h for h in hits if "rideshare" in h["text"].lower() or "kestrel" in h["text"].lower()]
docs = sorted({h["docId"] for h in hits})
print(f"  {len(hits)} hits, all from globex documents {docs}; {len(leaked)} from acme")
sys.exit(1 if leaked else 0)'
echo "  and asking acme's question gets globex's own (irrelevant) documents or a refusal:"
as_b $HS ask --address "$ADDR" --temperature 0 --max-tokens 48 "$QUESTION_A"

OPENAI_URL=$(sed -n 's/^  OpenAI-compatible API: \([^ ]*\).*/\1/p' "$LOG" | head -1)
say "the same question through the OpenAI-compatible API ($OPENAI_URL, the official openai client, acme's key)"
OPENAI_API_KEY=$KEY_A $PY - "$OPENAI_URL" "$QUESTION_A" <<'PYEOF'
import sys
import openai

client = openai.OpenAI(base_url=sys.argv[1], max_retries=2)
print("  models acme may use:", ", ".join(m.id for m in client.models.list()))
out = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": sys.argv[2]}], max_tokens=96,
    temperature=0, extra_body={"rag": {}})
print("  answer:", out.choices[0].message.content.strip())
for c in out.model_extra["citations"]:
    print(f"  cites {c['numbers']} at {c['start']}-{c['end']}:",
          ", ".join(s["title"] for s in c["sources"]))
print(f"  {out.usage.total_tokens} tokens; retrieve {out.model_extra['rag']['timings']['retrieve_ms']:.0f} ms")
PYEOF

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
                sums[("completion tokens", f"tenant={s.labels['tenant']} adapter={s.labels['adapter']}")] += s.value
            elif s.name == "ray_hybridserve_requests_total":
                sums[("requests", f"{s.labels['service']}.{s.labels['method']} {s.labels['code']}")] += s.value
    seen = {k.split("adapter=", 1)[1] for what, k in sums if what == "completion tokens"}
    asks = {k for what, k in sums if what == "requests" and k.startswith("rag.Ask")}
    if (adapters <= seen and "rag.Ask PERMISSION_DENIED" in asks) or time.monotonic() > deadline:
        break
    time.sleep(2)
for (what, key), value in sorted(sums.items()):
    print(f"  {what:18} {key:60} {value:g}")
PYEOF

say "knowledge plus skill, measured: a third tenant, Northwind Transit, trains a retrieval-aware adapter"
# Its documents (examples/tenants/northwind) and 340 questions with reference answers
# (examples/eval/northwind.jsonl). `finetune --rag` builds training chats with the prompts
# this platform's Ask builds for the tenant (the gold passage among retrieved distractors, or
# removed so that it learns to refuse), holds out whole documents with their questions,
# trains, and registers the adapter only if it beats the base model on the held-out ones.
# Sized for a 2-core CPU (DEMO_RAG_STEPS, DEMO_ACCEPT_QUESTIONS, DEMO_EVAL_QUESTIONS raise
# it; benchmarks/eval.py runs the full recipe and all held-out questions). The prompts are
# built for 48 answer tokens, and the arms answer with 48: the same prompts.
# --reuse: a later demo reuses the adapter trained from the same recipe (cached). --force:
# the demo registers it whatever the acceptance check says (the check's table is printed),
# so that it runs unattended; leave --force out in real use.
$HS admin tenants create northwind --display-name "Northwind Transit" --allow-base \
  --system-prompt "You answer questions from Northwind Transit's passengers." --address "$ADDR" >/dev/null
KEY_N=$($HS admin keys create northwind --name demo --address "$ADDR")
as_n() { HYBRIDSERVE_API_KEY=$KEY_N "$@"; }
as_n $HS ingest --address "$ADDR" --quiet examples/tenants/northwind
as_n $HS finetune --rag --questions examples/eval/northwind.jsonl --name northwind-cite \
  --address "$ADDR" --write-held-out "$WORK/held-out.jsonl" --reuse --force \
  --steps "${DEMO_RAG_STEPS:-24}" --layers 22-29 --rank 8 --alpha 16 --lr 2e-3 --batch-size 4 --seed 0 \
  --answer-tokens 48 --eval-max-examples "${DEMO_ACCEPT_QUESTIONS:-12}" > "$WORK/finetune.out"
sed 's/^/  /' "$WORK/finetune.out"
NW_ADAPTER=$(head -1 "$WORK/finetune.out")
$HS admin grants add northwind "$NW_ADAPTER" --address "$ADDR" >/dev/null

say "the four arms on questions about documents the adapter never saw: base, adapter, rag, rag+adapter"
REPORT="$HYBRIDSERVE_DATA_DIR/northwind-eval.html"
rc=0
as_n $HS eval --address "$ADDR" --questions "$WORK/held-out.jsonl" --adapter "$NW_ADAPTER" \
  --limit "${DEMO_EVAL_QUESTIONS:-8}" --max-tokens 48 --concurrency 4 --report "$REPORT" || rc=$?
# 1: some questions failed (listed above, counted as wrong); 2: bad input.
[ "$rc" -le 1 ] || exit "$rc"
echo "  every answer of every arm, side by side: $REPORT"
