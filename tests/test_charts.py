"""A template's Helm chart, served by a local chart repository (helm package + helm repo index + a
loopback HTTP server), rendered by the helm binary and applied like inline resources."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.controlplane import ControlPlane
from devtools.support import wait_for
from ephemera.apply import Applier
from ephemera.charts import RELEASE, render_chart
from ephemera.kube import Kube, load_api_client
from ephemera.templates import HelmSource, TemplateError, render_tree
from tests.test_templates import values

pytestmark = pytest.mark.cluster

CHART = {
    "Chart.yaml": "apiVersion: v2\nname: web\nversion: 1.2.3\n",
    "values.yaml": "image: web:1\nreplicas: 1\n",
    "templates/deployment.yaml": """apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-web
  annotations:
    ephemera.dev/title: {{ .Values.title | quote }}
spec:
  replicas: {{ .Values.replicas }}
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: {{ .Values.image | quote }}}]
""",
    "templates/service.yaml": """apiVersion: v1
kind: Service
metadata: {name: {{ .Release.Name }}-web}
spec: {selector: {app: web}, ports: [{port: 80}]}
""",
    "templates/tests/check.yaml": """apiVersion: v1
kind: Pod
metadata:
  name: check
  annotations: {"helm.sh/hook": test}
spec: {containers: [{name: c, image: check}]}
""",
}


@pytest.fixture(scope="module")
def chart_repo(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A chart repository on loopback holding the chart `web` 1.2.3."""
    helm = control_plane.bin_dir / "helm"
    source, served = tmp_path_factory.mktemp("chart") / "web", tmp_path_factory.mktemp("repo")
    for name, text in CHART.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    subprocess.run([str(helm), "package", str(source), "-d", str(served)], check=True, capture_output=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    subprocess.run([str(helm), "repo", "index", str(served), "--url", url], check=True, capture_output=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield url
    server.shutdown()


def source(repo: str, version: str = "1.2.3") -> HelmSource:
    raw = {"image": "web:{{ commit.short }}", "title": "{{ pr.title }}"}
    return HelmSource(repository=repo, chart="web", version=version, values=render_tree(raw, values(), "spec.helm"))


def test_a_chart_renders_with_placeholders_in_its_values(
    control_plane: ControlPlane, chart_repo: str, tmp_path: Path
) -> None:
    objects = render_chart(control_plane.bin_dir / "helm", source(chart_repo), "pr-1", home=tmp_path)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Service", f"{RELEASE}-web"),
        ("Deployment", f"{RELEASE}-web"),
    ]  # the test hook is left out
    deployment = objects[1]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "web:9f2c6d1"
    assert deployment["metadata"]["annotations"]["ephemera.dev/title"] == "Add a cart"


def test_a_chart_deploys_like_inline_resources(
    control_plane: ControlPlane, chart_repo: str, namespace: str, tmp_path: Path
) -> None:
    kube = Kube(load_api_client(control_plane.kubeconfig))
    try:
        objects = render_chart(control_plane.bin_dir / "helm", source(chart_repo), namespace, home=tmp_path)
        applier = Applier(kube)
        inventory = applier.apply(objects, namespace, {"app.kubernetes.io/managed-by": "ephemera"})
        assert {ref.kind for ref in inventory} == {"Deployment", "Service"}
        wait_for(lambda: applier.observe(namespace, inventory).ready, timeout=90, what="the chart's Deployment ready")
    finally:
        kube.close()


def test_a_missing_version_is_a_clear_error(control_plane: ControlPlane, chart_repo: str, tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"chart web 9\.9\.9 from http://127\.0\.0\.1:\d+: .*9\.9\.9") as err:
        render_chart(control_plane.bin_dir / "helm", source(chart_repo, "9.9.9"), "pr-1", home=tmp_path)
    assert err.value.reason == "ChartRenderError"
