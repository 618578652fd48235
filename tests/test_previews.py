"""The application in a preview, end to end below the operator: a PreviewTemplate on the API server
matched to a PR, rendered, applied into its namespace and judged ready."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import ControlPlane
from devtools.support import Kubectl, wait_for
from ephemera.apply import Applier
from ephemera.kube import Kube
from ephemera.previews import Previews
from ephemera.templates import TemplateError
from tests.test_charts import chart_repo  # noqa: F401 - a fixture
from tests.test_templates import spec, template_crd  # noqa: F401 - a fixture
from tests.test_workloads import deployment

pytestmark = pytest.mark.cluster
LABELS = {"app.kubernetes.io/managed-by": "ephemera"}


@pytest.fixture
def templates(template_crd: Path, kubectl: Kubectl) -> Iterator[list[str]]:  # noqa: F811
    made: list[str] = []
    yield made
    for name in made:
        kubectl.run("delete", "pt", name, "--ignore-not-found")


def put_template(kubectl: Kubectl, made: list[str], name: str, **fields: Any) -> None:
    body = {"apiVersion": "ephemera.dev/v1alpha1", "kind": "PreviewTemplate", "metadata": {"name": name}}
    kubectl.apply({**body, "spec": fields})
    made.append(name)


def web(name: str = "web-{{ pr.number }}") -> dict[str, Any]:
    body = deployment("web")
    body["metadata"]["name"] = name
    body["spec"]["template"]["spec"]["containers"][0]["image"] = "shop:{{ commit.short }}"
    return body


def test_a_matching_template_is_applied_and_becomes_ready(
    kube: Kube, kubectl: Kubectl, namespace: str, templates: list[str]
) -> None:
    # An owner of the test's own: the running operator re-provisions every environment a template matches
    # when it is applied and deleted, and octo-org/* matched those the other tests left.
    unique = uuid.uuid4().hex[:6]
    repo = f"octo-{unique}/shop"
    put_template(
        kubectl, templates, f"exact-{unique}", repositories=[repo], resources=[web()], url="https://{{ host }}/"
    )
    put_template(kubectl, templates, f"org-{unique}", repositories=[f"octo-{unique}/*"], resources=[])
    previews = Previews(kube, Applier(kube), domain="preview.test")
    rollout = previews.rollout(spec(repository=repo), namespace, LABELS, [])
    assert rollout is not None
    assert rollout.template.startswith("exact-")
    assert rollout.url == f"https://{namespace}.preview.test/"
    assert [(r.kind, r.name) for r in rollout.inventory] == [("Deployment", "web-42")]
    image = kubectl.json("get", "deployment", "-n", namespace, "web-42")["spec"]["template"]["spec"]["containers"]
    assert image[0]["image"] == "shop:9f2c6d1"
    wait_for(lambda: previews.assess(namespace, rollout).ready, timeout=90, what="the app Ready")
    json.dumps(rollout.status())  # what goes into the status is plain JSON


def test_no_matching_template_means_a_namespace_only(kube: Kube, namespace: str, templates: list[str]) -> None:
    previews = Previews(kube, Applier(kube), domain="preview.test")
    assert previews.rollout(spec(repository="nobody/nothing"), namespace, LABELS, []) is None


def test_a_template_with_a_chart(
    kube: Kube,
    kubectl: Kubectl,
    namespace: str,
    templates: list[str],
    chart_repo: str,  # noqa: F811
    control_plane: ControlPlane,
) -> None:
    repo = f"octo-org/chart-{uuid.uuid4().hex[:6]}"
    helm = {"repository": chart_repo, "chart": "web", "version": "1.2.3", "values": {"image": "w:{{ commit.short }}"}}
    put_template(kubectl, templates, f"chart-{repo.split('-')[-1]}", repositories=[repo], helm=helm)
    previews = Previews(kube, Applier(kube), domain="preview.test", helm=control_plane.bin_dir / "helm")
    rollout = previews.rollout(spec(repository=repo), namespace, LABELS, [])
    assert rollout is not None
    assert {(r.kind, r.name) for r in rollout.inventory} == {("Deployment", "preview-web"), ("Service", "preview-web")}
    wait_for(lambda: previews.assess(namespace, rollout).ready, timeout=90, what="the chart's app Ready")


def test_a_bad_template_fails_with_its_cause_and_applies_nothing(
    kube: Kube, kubectl: Kubectl, namespace: str, templates: list[str]
) -> None:
    repo = f"octo-org/bad-{uuid.uuid4().hex[:6]}"
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "kube-system"}}
    put_template(kubectl, templates, f"bad-{repo.split('-')[-1]}", repositories=[repo], resources=[web(), bad])
    with pytest.raises(TemplateError, match="names namespace kube-system"):
        Previews(kube, Applier(kube), domain="preview.test").rollout(spec(repository=repo), namespace, LABELS, [])
    assert kubectl.json("get", "deployments", "-n", namespace)["items"] == []
