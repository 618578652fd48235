#!/usr/bin/env bash
# Make sure Debian's chromium and its chromedriver are installed: tests/test_dashboard.py drives the
# dashboard page in that browser through Selenium (no browser is downloaded). Installs with apt-get
# when run as root.
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "Chromium is not installed: run 'sudo apt-get install -y chromium chromium-driver' (tests/test_dashboard.py needs /usr/bin/chromium and /usr/bin/chromedriver)" >&2
  exit 1
fi
echo "[install-chromium] installing Debian's chromium and chromium-driver packages" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null
