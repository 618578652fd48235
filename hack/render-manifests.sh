#!/usr/bin/env bash
# Render deploy/manifests/ephemera.yaml from the chart (the one source), for `kubectl apply -k deploy/`.
# tests/test_chart.py fails if the committed file differs from a fresh rendering.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
helm="$(bash "$root/hack/build-tools.sh")/helm"
out="${1:-$root/deploy/manifests/ephemera.yaml}"
mkdir -p "$(dirname "$out")"
{
  echo "# Rendered from charts/ephemera by hack/render-manifests.sh (make manifests). Do not edit."
  echo "# Fill in the Secret ephemera-secrets (webhook-secret, database-url, github-private-key) before use."
  "$helm" template ephemera "$root/charts/ephemera" --namespace ephemera --kube-version 1.36.0
} > "$out"
