#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (Debian's package) are installed; the tests start their own
# server from them in a temporary folder. Installs with apt-get when run as root.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "PostgreSQL's server is not installed: run 'sudo apt-get install -y postgresql' (the tests need initdb and pg_ctl)" >&2
  exit 1
fi
echo "[install-postgres] installing Debian's postgresql package" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null
