#!/usr/bin/env bash
# What must already be on the machine before `make` can install the rest, each missing piece named
# with what to do about it (README, "Prerequisites").
#
# Usage: hack/check-prereqs.sh python [PYTHON]   Python 3.11 or newer with venv (make venv)
#        hack/check-prereqs.sh go                 Go (1.26.7 or newer: hack/tools/*/go.mod), flock, disk
#                                                 (hack/build-tools.sh, before it builds anything)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# A cold build of every tool fills Go's module and build caches with about 6 GB (1.7 GB of modules,
# 4.2 GB of compiled packages, measured for Kubernetes v1.36, etcd, helm and kwok).
GO_CACHE_GB=7

fail() {
  echo "error: $*" >&2
  exit 1
}

check_python() {
  local py="${1:-python3}" version
  command -v "$py" > /dev/null \
    || fail "$py not found: install Python 3.11 or newer with its venv module (Debian: apt-get install python3 python3-venv), or name one with make PYTHON=/path/to/python3"
  version="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null)" \
    || fail "$py does not run: install Python 3.11 or newer, or name one with make PYTHON=/path/to/python3"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$py is Python $version; Ephemera needs 3.11 or newer (make PYTHON=/path/to/python3.11)"
  # `python -m venv` needs ensurepip, which Debian ships apart in python3-venv.
  "$py" -c 'import ensurepip, venv' 2> /dev/null \
    || fail "$py (Python $version) has no venv module: install it (Debian: apt-get install python3-venv)"
}

check_go() {
  command -v go > /dev/null \
    || fail "go not found: the control plane and helm are built from Go modules; install Go 1.26 or newer and put it on PATH (or point EPHEMERA_TOOLS_DIR at binaries of the versions in hack/tools/versions.env)"
  # The newest `go` line of the pinned consumer modules: an older Go would try to download a newer
  # toolchain, which fails offline.
  local version need
  version="$(go env GOVERSION)"
  need="$(awk '$1 == "go" { print $2 }' "$here"/tools/*/go.mod | sort -V | tail -n 1)"
  if [[ "$(printf '%s\n%s\n' "$need" "${version#go}" | sort -V | head -n 1)" != "$need" ]]; then
    fail "go is $version; the pinned tools (hack/tools/*/go.mod) need Go $need or newer"
  fi
  command -v flock > /dev/null || fail "flock not found: install util-linux (it keeps two builds apart)"
  local cache free_kb
  cache="$(go env GOCACHE)"
  mkdir -p "$cache"
  free_kb="$(df -Pk "$cache" | awk 'NR == 2 { print $4 }')"
  if (( free_kb < GO_CACHE_GB * 1024 * 1024 )); then
    fail "$((free_kb / 1024 / 1024)) GB free at $cache; a first build fills Go's caches (GOCACHE, GOMODCACHE) with about ${GO_CACHE_GB} GB: free some space or move them (go env -w GOCACHE=... GOMODCACHE=...)"
  fi
}

case "${1:-}" in
  python) check_python "${2:-}" ;;
  go) check_go ;;
  *) fail "usage: $0 python [PYTHON] | go" ;;
esac
