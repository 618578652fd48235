#!/usr/bin/env bash
# Build the local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl), kwok (a simulated kubelet), helm and promtool from Go modules, once per version, into a cache
# outside the checkout.
#
# Usage: hack/build-tools.sh            build whatever is missing, print the bin directory
#        hack/build-tools.sh --print    print the bin directory only (no build)
#
# The versions and the pinned go.mod/go.sum of each consumer module live in hack/tools/.
# Go's own module and build caches stay at their default places, so a rebuild after a version bump
# only compiles what changed.
#
# A binary that is already on the machine, in a folder of EPHEMERA_TOOLS_DIR (a colon-separated
# list) or on PATH, is linked into the bin directory instead of built when it reports the pinned
# version (kwok excepted: its stages come from its Go module). Two runs at once take turns on a lock
# ($EPHEMERA_CACHE/build-tools.lock), so they never build into the same folder together.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/tools/versions.env
source "$here/tools/versions.env"

cache="${EPHEMERA_CACHE:-$HOME/.cache/ephemera}"
bindir="$cache/bin/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"

if [[ "${1:-}" == "--print" ]]; then
  echo "$bindir"
  exit 0
fi

mkdir -p "$cache"
lock="$cache/build-tools.lock"
exec {lock_fd}>"$lock"
if ! flock -n "$lock_fd"; then
  echo "[build-tools] another build-tools.sh holds $lock; waiting for it to finish" >&2
  flock "$lock_fd"
fi

export CGO_ENABLED=0
# Builds are reproducible from the pinned go.sum, whatever the checkout path.
export GOFLAGS="${GOFLAGS:-} -trimpath"

log() { echo "[build-tools $(date +%H:%M:%S)] $*" >&2; }

# Print a progress line every 100 compiled packages, so a cold build never looks hung.
progress() {
  awk -v what="$1" '{ n++; if (n % 100 == 0) { printf "[build-tools] %s: %d packages compiled\n", what, n; fflush() } }
       END { printf "[build-tools] %s: %d packages compiled in total\n", what, n }' >&2
}

# Copy a pinned consumer module to a scratch dir (go build writes nothing into the checkout).
workdir() {
  local src="$here/tools/$1" dst
  dst="$(mktemp -d)"
  cp "$src/go.mod" "$src/go.sum" "$dst/"
  echo "$dst"
}

# The name go build gives a package's binary: its last path element, less a /vN major suffix.
binname() {
  local name="${1##*/}"
  [[ "$name" =~ ^v[0-9]+$ ]] && { name="${1%/*}"; name="${name##*/}"; }
  echo "$name"
}

# The version a binary reports, in versions.env's form (v1.2.3); empty if it reports none.
version_of() {  # version_of NAME PATH
  case "$1" in
    etcd) "$2" --version 2>/dev/null | awk '/^etcd Version:/ { print "v" $3; exit }' ;;
    kube-apiserver | kube-controller-manager | kube-scheduler) "$2" --version 2>/dev/null | awk '{ print $2; exit }' ;;
    kubectl) "$2" version --client 2>/dev/null | awk '/^Client Version:/ { print $3; exit }' ;;
    helm) "$2" version --template '{{.Version}}' 2>/dev/null ;;
    promtool) "$2" --version 2>/dev/null | awk 'NR == 1 { print "v" $3; exit }' ;;
  esac
}

pinned_version() {  # pinned_version NAME: the version versions.env asks for; empty if it is never reused
  case "$1" in
    etcd) echo "$ETCD_VERSION" ;;
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl) echo "$KUBERNETES_VERSION" ;;
    helm) echo "$HELM_VERSION" ;;
    promtool) echo "${PROMTOOL_VERSION:-}" ;;
  esac
}

# Link a binary of the pinned version from EPHEMERA_TOOLS_DIR or PATH into $bindir; fails if none.
reuse() {  # reuse NAME
  local name="$1" want dir real own
  want="$(pinned_version "$name")"
  [[ -n "$want" ]] || return 1
  mkdir -p "$bindir"
  own="$(cd "$bindir" && pwd -P)"
  IFS=: read -ra dirs <<< "${EPHEMERA_TOOLS_DIR:+$EPHEMERA_TOOLS_DIR:}$PATH"
  for dir in "${dirs[@]}"; do
    [[ -n "$dir" && -f "$dir/$name" && -x "$dir/$name" ]] || continue
    real="$(cd "$dir" && pwd -P)"
    [[ "$real" == "$own" ]] && continue
    if [[ "$(version_of "$name" "$real/$name")" == "$want" ]]; then
      ln -sfn "$real/$name" "$bindir/$name"
      log "using $real/$name ($want) instead of building $name"
      return 0
    fi
  done
  return 1
}

# A linked binary stays in use while it is there and still reports the pinned version.
linked_current() {  # linked_current NAME
  [[ -L "$bindir/$1" && -x "$bindir/$1" && "$(version_of "$1" "$bindir/$1")" == "$(pinned_version "$1")" ]]
}

# The prerequisites of a build (Go, disk for its caches) are checked once, before the first build.
prereqs_checked=0
check_build_prereqs() {
  [[ $prereqs_checked -eq 1 ]] && return 0
  bash "$here/check-prereqs.sh" go
  prereqs_checked=1
}

# Each build records its -ldflags in $bindir/.NAME.ldflags, and a binary built with other flags
# than today's is built again. A binary without a record counts as current, except for the tools
# named in STAMP_REQUIRED, whose flags changed after caches were first filled (helm was built
# without Helm's own version flags, so it assumed Kubernetes v1.20.0).
STAMP_REQUIRED=" helm "
build() {
  local name="$1" module="$2"; shift 2
  local ldflags="$1"; shift
  local stamp="$bindir/.$name.ldflags" current=1 missing=()
  if [[ -f "$stamp" ]]; then
    [[ "$(cat "$stamp")" == "$ldflags" ]] || current=0
  elif [[ "$STAMP_REQUIRED" == *" $name "* ]]; then
    current=0
  fi
  local bin
  for pkg in "$@"; do
    bin="$(binname "$pkg")"
    if [[ -L "$bindir/$bin" ]]; then
      linked_current "$bin" && continue
      rm -f "$bindir/$bin"
    elif [[ $current -eq 1 && -x "$bindir/$bin" ]]; then
      continue
    fi
    reuse "$bin" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  check_build_prereqs
  log "building $name; a cold build takes many minutes"
  local start=$SECONDS dir out
  dir="$(workdir "$module")"
  # A scratch output folder of this build's own, so that a build beside it never moves its files.
  mkdir -p "$(dirname "$bindir")"
  out="$(mktemp -d "$bindir.tmp.XXXXXX")"
  (cd "$dir" && go build -v -ldflags "$ldflags" -o "$out/" "${missing[@]}") 2>&1 | progress "$name"
  local rc=${PIPESTATUS[0]}
  rm -rf "$dir"
  [[ $rc -eq 0 ]] || { rm -rf "$out"; log "build of $name failed"; exit "$rc"; }
  mkdir -p "$bindir"
  mv "$out"/* "$bindir/"
  rmdir "$out"
  printf '%s
' "$ldflags" > "$stamp"
  log "$name built in $((SECONDS - start)) s"
}

minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

if [[ -L "$bindir/etcd" ]] && ! linked_current etcd; then
  rm -f "$bindir/etcd"
fi
if [[ ! -x "$bindir/etcd" ]] && ! reuse etcd; then
  build etcd etcd "-s -w" go.etcd.io/etcd/server/v3
  mv "$bindir/server" "$bindir/etcd"
fi
# Stamped as Helm's own Makefile stamps a release (v3.22): the version, an empty build metadata
# (a tagged build), a clean tree, and the default Kubernetes version of `helm template` and
# `helm lint` from the client-go it is built with (v0.N -> v1.N). Without the last two it assumes
# Kubernetes v1.20.0 and refuses charts that need newer. The git commit is left out: a module
# download carries none.
client_go="$(awk '$1 == "k8s.io/client-go" { print $2 }' "$here/tools/helm/go.mod")"
[[ "$client_go" =~ ^v0\.[0-9]+\. ]] || { log "no k8s.io/client-go v0.N in hack/tools/helm/go.mod"; exit 1; }
client_go="${client_go#v}"
helm_k8s_major=$(( ${client_go%%.*} + 1 ))
helm_k8s_minor="${client_go#*.}"; helm_k8s_minor="${helm_k8s_minor%%.*}"
helm_ldflags="-s -w"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.metadata="
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=$helm_k8s_major -X $pkg.k8sVersionMinor=$helm_k8s_minor"
done
build helm helm "$helm_ldflags" helm.sh/helm/v3/cmd/helm
build kubernetes kubernetes "$k8s_ldflags" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl

# promtool, for `promtool check metrics` on Ephemera's /metrics in the tests. Stamped with its
# version as Prometheus's release build does (common/version), so a promtool found on PATH can be
# compared with it and a version bump rebuilds it.
promtool_ldflags="-s -w -X github.com/prometheus/common/version.Version=${PROMTOOL_VERSION#v}"
promtool_ldflags+=" -X github.com/prometheus/common/version.Branch=HEAD"
build promtool promtool "$promtool_ldflags" github.com/prometheus/prometheus/cmd/promtool

# kwok plays the kubelet: it marks scheduled pods Running and Ready through its Stage resources. Its
# own stages for nodes and pods are data in its module; they are read from Go's module cache here,
# next to the binary, at the version built (the project's own stages are in hack/kwok/).
if [[ ! -x "$bindir/kwok" || "$(cat "$bindir/kwok.version" 2>/dev/null)" != "$KWOK_VERSION" ]]; then
  rm -f "$bindir/kwok"
  build kwok kwok "-s -w" sigs.k8s.io/kwok/cmd/kwok
  dir="$(workdir kwok)"
  src="$(cd "$dir" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
  rm -rf "$dir" "$bindir/kwok-stages"
  mkdir -p "$bindir/kwok-stages"
  for stage in node/fast/node-initialize node/heartbeat/node-heartbeat pod/fast/pod-ready pod/fast/pod-complete \
               pod/fast/pod-delete; do
    cp "$src/$stage.yaml" "$bindir/kwok-stages/"
  done
  echo "$KWOK_VERSION" > "$bindir/kwok.version"
fi

echo "$bindir"
