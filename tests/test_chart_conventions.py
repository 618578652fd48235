"""The chart's conventions: roles aggregated into view and edit (proven by impersonation on the local
API server), fullnameOverride and nameOverride, Artifact Hub's metadata, a description on every value,
and the chart README's values table generated from the schema."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.support import Kubectl, wait_for
from tests.test_chart import CHART, template
from tests.test_operator import make_env


def docs(control_plane: ControlPlane, *args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(control_plane, *args).stdout) if d]


@pytest.fixture(scope="module")
def aggregated(control_plane: ControlPlane, kubectl: Kubectl, crd: object) -> Iterator[str]:
    """The chart's aggregated ClusterRoles, and its viewers' binding for the group `previewers-<id>`,
    applied to the API server (and deleted after); yields the group."""
    group = f"previewers-{uuid.uuid4().hex[:6]}"
    release = f"roles-{uuid.uuid4().hex[:6]}"
    rendered = subprocess.run(
        [str(control_plane.bin_dir / "helm"), "template", release, str(CHART), "--namespace", "ephemera-roles",
         "--show-only", "templates/aggregate-roles.yaml",
         "--set", "rbac.viewers[0].kind=Group", "--set", f"rbac.viewers[0].name={group}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    kubectl.run("apply", "-f", "-", input=rendered)
    yield group
    kubectl.run("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


def as_user(kubectl: Kubectl, user: str, *args: str, groups: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return kubectl.run(f"--as={user}", *(f"--as-group={g}" for g in groups), *args, check=False)


def bind(kubectl: Kubectl, role: str, user: str, namespace: str | None = None) -> None:
    name = f"{role}-{user}"
    if namespace is None:
        kubectl.run("create", "clusterrolebinding", name, f"--clusterrole={role}", f"--user={user}")
    else:
        kubectl.run("create", "rolebinding", name, f"--clusterrole={role}", f"--user={user}", "-n", namespace)


def test_view_and_edit_include_previewenvironments(
    aggregated: str, kubectl: Kubectl, namespace: str, crd: object
) -> None:
    name = f"roles-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(name, 4242))
    viewer, editor, stranger = (f"{who}-{uuid.uuid4().hex[:4]}" for who in ("viewer", "editor", "stranger"))
    bind(kubectl, "view", viewer)
    bind(kubectl, "edit", editor)
    try:
        # The clusterrole-aggregation controller adds the chart's rules to view and edit.
        wait_for(
            lambda: as_user(kubectl, viewer, "get", "pe", name).returncode == 0,
            timeout=30,
            what="view aggregating the chart's rules",
        )
        assert as_user(kubectl, viewer, "get", "pt").returncode == 0
        refused = as_user(kubectl, viewer, "annotate", "pe", name, "ephemera.dev/retry=1")
        assert refused.returncode != 0
        assert "forbidden" in refused.stderr
        wait_for(
            lambda: as_user(kubectl, editor, "annotate", "pe", name, "ephemera.dev/retry=1").returncode == 0,
            timeout=30,
            what="edit aggregating patch on PreviewEnvironments",
        )
        for verb in ("delete", "create"):
            assert as_user(kubectl, editor, "auth", "can-i", verb, "pe").stdout.strip() == "no", verb
        assert as_user(kubectl, viewer, "auth", "can-i", "list", "pe").stdout.strip() == "yes"
        assert as_user(kubectl, stranger, "get", "pe").returncode != 0
    finally:
        for role, user in (("view", viewer), ("edit", editor)):
            kubectl.run("delete", "clusterrolebinding", f"{role}-{user}", check=False)
        kubectl.run("delete", "pe", name, "--wait=false", check=False)


def test_a_namespace_user_bound_to_view_gets_pe_through_the_viewers_group(
    aggregated: str, kubectl: Kubectl, namespace: str, crd: object
) -> None:
    """RBAC grants a cluster-scoped kind only through a ClusterRoleBinding: bound to view in one
    namespace, a user sees no PreviewEnvironment, until a group of rbac.viewers is theirs."""
    user = f"dev-{uuid.uuid4().hex[:4]}"
    bind(kubectl, "view", user, namespace)
    wait_for(
        lambda: as_user(kubectl, user, "-n", namespace, "get", "configmaps").returncode == 0,
        timeout=30,
        what="the namespace's view binding",
    )
    alone = as_user(kubectl, user, "get", "pe")
    assert alone.returncode != 0
    assert "forbidden" in alone.stderr
    assert as_user(kubectl, user, "get", "pe", groups=(aggregated,)).returncode == 0
    assert as_user(kubectl, user, "-n", namespace, "get", "pe", groups=(aggregated,)).returncode == 0
    assert as_user(kubectl, user, "delete", "pe", "anything", groups=(aggregated,)).returncode != 0


def test_fullname_and_name_overrides_are_honoured_everywhere(control_plane: ControlPlane) -> None:
    rendered = docs(
        control_plane,
        "--set", "fullnameOverride=acme-previews",
        "--set", "nameOverride=previews",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.prometheusRule.enabled=true",
        "--set", "metrics.dashboard.enabled=true",
        "--set", "dashboard.enabled=true",
        "--set", "webhook.ingress.enabled=true",
        "--set", "rbac.viewers[0].kind=Group",
        "--set", "rbac.viewers[0].name=devs",
    )  # fmt: skip
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    # Every object the release names is under the override (CRDs and kopf's peering object have
    # names of their own).
    fixed = {"CustomResourceDefinition", "ClusterKopfPeering"}
    assert [n for k, n in names if k not in fixed and not n.startswith("acme-previews")] == []
    text = yaml.safe_dump_all(rendered)
    assert "ephemera-ephemera" not in text
    for doc in rendered:
        if doc["kind"] == "CustomResourceDefinition":
            continue
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "previews", doc["metadata"]["name"]
    # ...and every reference between them still points at an object that is there.
    by_kind = {(k, n) for k, n in names}
    for doc in rendered:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]
            assert ("ServiceAccount", pod["spec"]["serviceAccountName"]) in by_kind
            assert doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
            for container in pod["spec"]["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ("Secret", ref["name"]) in by_kind
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert (doc["roleRef"]["kind"], doc["roleRef"]["name"]) in by_kind
            for subject in doc["subjects"]:
                if subject["kind"] == "ServiceAccount":
                    assert ("ServiceAccount", subject["name"]) in by_kind
        if doc["kind"] == "Ingress":
            backend = doc["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
            assert ("Service", backend) in by_kind


def test_every_value_has_a_description() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            if not str(sub.get("description", "")).strip():
                missing.append(f"{path}{name}")
            walk(sub, f"{path}{name}.")
            if isinstance(sub.get("items"), dict):
                walk(sub["items"], f"{path}{name}[].")

    walk(schema, "")
    assert missing == []


def test_the_chart_readme_values_table_is_generated_from_the_schema() -> None:
    check = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "values-table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    readme = (CHART / "README.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    # A sample of rows: a leaf, a map, and a value with its description.
    assert "| `metrics.prometheusRule.timeToReadyObjective` | number | `300` |" in readme
    assert "| `config.extraEnv` | object | `{}` |" in readme
    description = schema["properties"]["crds"]["properties"]["keep"]["description"]
    assert f"| `crds.keep` | boolean | `true` | {description} |" in readme


def test_artifact_hub_metadata_matches_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    notes = chart["annotations"]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert notes["artifacthub.io/license"] == pyproject["project"]["license"]
    assert notes["artifacthub.io/operator"] == "true"
    crds = yaml.safe_load(notes["artifacthub.io/crds"])
    sources = [yaml.safe_load(p.read_text()) for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))]
    assert sorted((c["name"], c["kind"], c["version"]) for c in crds) == sorted(
        (s["metadata"]["name"], s["spec"]["names"]["kind"], s["spec"]["versions"][0]["name"]) for s in sources
    )
    assert all(c["description"] and c["displayName"] for c in crds)
    [example] = yaml.safe_load(notes["artifacthub.io/crdsExamples"])
    assert example == yaml.safe_load((REPO_ROOT / "deploy" / "samples" / "previewenvironment.yaml").read_text())
    [image] = yaml.safe_load(notes["artifacthub.io/images"])
    assert image["image"].endswith(f":{chart['appVersion']}")
    for link in yaml.safe_load(notes["artifacthub.io/links"]):
        assert link["url"].startswith("https://")
