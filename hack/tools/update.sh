#!/usr/bin/env bash
# Regenerate hack/tools/*/go.mod and go.sum from versions.env (a developer's step after a bump;
# builds use the committed files).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/versions.env"
export CGO_ENABLED=0

gen() {  # gen DIR MODULE@VERSION [extra go.mod text]
  local dir="$here/$1"
  mkdir -p "$dir"
  rm -f "$dir/go.mod" "$dir/go.sum"
  printf 'module ephemera.dev/hack/tools/%s\n\ngo 1.26.0\n\nrequire %s\n%s\n' "$1" "${2/@/ }" "${3:-}" > "$dir/go.mod"
}

gen etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
gen helm "helm.sh/helm/v3@$HELM_VERSION"
gen kwok "sigs.k8s.io/kwok@$KWOK_VERSION"
promtool_minor="${PROMTOOL_VERSION#v3.}"; promtool_minor="${promtool_minor%%.*}"
gen promtool "github.com/prometheus/prometheus@v0.$((300 + promtool_minor)).${PROMTOOL_VERSION##*.}"

# k8s.io/kubernetes replaces its staging modules with ./staging/...; a consumer pins each one to
# the matching published v0.N.P instead.
modfile="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
staging_version="v0.${KUBERNETES_VERSION#v1.}"
replaces="$(grep -E '=> \./staging/' "$modfile" | awk -v v="$staging_version" '{ printf "\t%s => %s %s\n", $1, $1, v }')"
gen kubernetes "k8s.io/kubernetes@$KUBERNETES_VERSION" "$(printf '\nreplace (\n%s\n)\n' "$replaces")"

tidy() {  # tidy DIR PKG...: record the packages to build as tool directives, then resolve.
  local dir="$here/$1"; shift
  # Written by hand: `go get -tool` would upgrade the pinned module to its newest version.
  printf 'tool %s\n' "$@" >> "$dir/go.mod"
  (cd "$dir" && go mod tidy)
}
tidy etcd go.etcd.io/etcd/server/v3
tidy helm helm.sh/helm/v3/cmd/helm
tidy kwok sigs.k8s.io/kwok/cmd/kwok
tidy promtool github.com/prometheus/prometheus/cmd/promtool
tidy kubernetes k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
