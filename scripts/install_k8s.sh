#!/usr/bin/env bash
# Builds the Kubernetes tools the chart and controller tests use, once per
# machine, into the same cache as weaviate-server ($CACHE/bin):
#
#   kube-apiserver  k8s.io/kubernetes v1.37.2 (about 15 CPU-minutes, 171 MB)
#   etcd            go.etcd.io/etcd/server/v3 v3.7.3 (about 40 s)
#   helm            helm.sh/helm/v3 v3.22.0 (about 2.5 min)
#
# Nothing else of Kubernetes runs in the tests: no kubelet, scheduler or
# controller manager, so Pods stay Pending there.
#
# `go install` refuses kube-apiserver and etcd (their modules carry replace
# directives), so each is built inside a small wrapper module of our own that
# requires the module and pins what its replace directives point at.
#
# Env: HYBRIDSERVE_CACHE_DIR (default ~/.cache/hybridserve).
set -euo pipefail

CACHE=${HYBRIDSERVE_CACHE_DIR:-$HOME/.cache/hybridserve}
BIN="$CACHE/bin"
KUBE_VERSION=v1.37.2
STAGING_VERSION=v0.37.2   # the staging modules' tag for kube v1.37.2
ETCD_VERSION=v3.7.3
HELM_VERSION=v3.22.0

log() { printf '[install-k8s] %s\n' "$*" >&2; }

if ! command -v go >/dev/null; then
  log "go is not installed; the Kubernetes tests will be skipped (install Go >= 1.26 and re-run)"
  exit 0
fi
mkdir -p "$BIN"

built() {  # name version: true when $BIN/name was built from that version
  [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ]
}

# wrapper NAME MODULE VERSION PACKAGE LDFLAGS REPLACE...: builds PACKAGE from a
# throwaway module that requires MODULE@VERSION and replaces each REPLACE
# ("path version") with that version. The binary lands in $BIN atomically.
wrapper() {
  local name=$1 module=$2 version=$3 package=$4 ldflags=$5; shift 5
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/hybridserve-$name.XXXXXX")
  trap 'rm -rf "$dir"' RETURN
  {
    echo "module hybridserve.dev/build/$name"
    echo
    echo "go 1.26"
    echo
    echo "require $module $version"
    echo
    local path pin
    for r in "$@"; do
      read -r path pin <<<"$r"
      echo "replace $path => $path $pin"
    done
  } > "$dir/go.mod"
  printf 'package tools\n\nimport _ "%s"\n' "$package" > "$dir/tools.go"
  sed -i '1i //go:build tools\n' "$dir/tools.go"
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy)
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$BIN/.$name.partial" "$package")
  mv "$BIN/.$name.partial" "$BIN/$name"
  echo "$module@$version" > "$BIN/.$name.version"
}

if ! built etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION"; then
  log "building etcd $ETCD_VERSION (about 40 s)"
  wrapper etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 "-s -w" \
    "go.etcd.io/etcd/api/v3 $ETCD_VERSION" \
    "go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION" \
    "go.etcd.io/etcd/client/v3 $ETCD_VERSION" \
    "go.etcd.io/etcd/pkg/v3 $ETCD_VERSION"
fi

if ! built kube-apiserver "k8s.io/kubernetes@$KUBE_VERSION"; then
  log "building kube-apiserver $KUBE_VERSION (about 15 CPU-minutes, once per machine)"
  # The staging modules k8s.io/kubernetes requires at v0.0.0 (it points them
  # at ./staging with replace directives, which a dependent module ignores).
  GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$KUBE_VERSION"
  gomod=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$KUBE_VERSION.mod
  mapfile -t staging < <(awk '/^require \(/,/^\)/' "$gomod" \
    | awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1 " '"$STAGING_VERSION"'"}')
  log "  pinning ${#staging[@]} staging modules at $STAGING_VERSION"
  # Without these, the binary reports v0.0.0-master and Helm's kubeVersion
  # checks fail.
  ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=37"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=2026-01-01T00:00:00Z"
  done
  wrapper kube-apiserver k8s.io/kubernetes "$KUBE_VERSION" k8s.io/kubernetes/cmd/kube-apiserver \
    "$ldflags" "${staging[@]}"
fi

# NOTE: helm's own Makefile sets these: the Kubernetes version `helm template`
# and `helm lint` assume (else 1.20, which fails every kubeVersion >= 1.21),
# from the client-go it is built with (v0.37 -> 1.37), and its own version.
HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  HELM_LDFLAGS+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=37"
done
if ! built helm "helm.sh/helm/v3@$HELM_VERSION k8s-1.37"; then
  log "building helm $HELM_VERSION (about 2.5 min)"
  GOBIN="$BIN" GOFLAGS=-mod=mod CGO_ENABLED=0 go install -trimpath -ldflags "$HELM_LDFLAGS" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "helm.sh/helm/v3@$HELM_VERSION k8s-1.37" > "$BIN/.helm.version"
fi

# The CRDs the chart's objects are validated against in the tests, from the
# projects' Go modules: KubeRay's RayService and the Prometheus Operator's
# PodMonitor/ServiceMonitor/PrometheusRule (the tests prefer ../shared/ when it
# holds newer copies).
KUBERAY_VERSION=v1.5.1   # the first with Ray token authentication (authOptions)
PROMETHEUS_OPERATOR_VERSION=v0.93.0
CRDS="$CACHE/crds"
stamp="$KUBERAY_VERSION $PROMETHEUS_OPERATOR_VERSION"
if [ "$(cat "$CRDS/.version" 2>/dev/null)" != "$stamp" ]; then
  log "fetching the KubeRay $KUBERAY_VERSION and Prometheus Operator $PROMETHEUS_OPERATOR_VERSION CRDs"
  moddir() { GOFLAGS=-mod=mod go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'; }
  kuberay=$(moddir "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION")
  promop=$(moddir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")
  rm -rf "$CRDS.partial" && mkdir -p "$CRDS.partial/kuberay" "$CRDS.partial/prometheus-operator"
  cp "$kuberay/config/crd/bases/ray.io_rayservices.yaml" "$CRDS.partial/kuberay/"
  for crd in podmonitors servicemonitors prometheusrules; do
    cp "$promop/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml" "$CRDS.partial/prometheus-operator/"
  done
  chmod -R u+w "$CRDS.partial" && echo "$stamp" > "$CRDS.partial/.version"
  rm -rf "$CRDS" && mv "$CRDS.partial" "$CRDS"
fi

log "ready: $BIN/{kube-apiserver,etcd,helm}, $CRDS"
