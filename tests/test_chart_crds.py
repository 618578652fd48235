"""The CRDs are templates (charts/ephemera/templates/crds.yaml), so that `helm upgrade` upgrades them,
behind crds.install and crds.keep, as cert-manager does.

The install and upgrade run against the local API server with a copy of the chart whose PreviewEnvironment
and PreviewTemplate CRDs are moved to a group and kinds of the test's own (the session's CRDs of
ephemera.dev were applied by kubectl and serve the other tests): same templates, other names.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.controlplane import REPO_ROOT, ControlPlane, running
from devtools.support import Kubectl, wait_for
from tests.test_chart import CHART, NAMESPACE, helm, template

SECRET = "a-webhook-secret-of-32-characters"


def rendered_crds(control_plane: ControlPlane, *args: str) -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all(template(control_plane, *args).stdout)
    return {d["metadata"]["name"]: d for d in docs if d and d["kind"] == "CustomResourceDefinition"}


def test_the_crds_are_rendered_from_the_one_source(control_plane: ControlPlane) -> None:
    crds = rendered_crds(control_plane)
    sources = [yaml.safe_load(p.read_text()) for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))]
    assert sorted(crds) == sorted(s["metadata"]["name"] for s in sources)
    for source in sources:
        crd = crds[source["metadata"]["name"]]
        assert crd["spec"] == source["spec"]
        assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crds_install_and_keep_are_switches(control_plane: ControlPlane) -> None:
    assert rendered_crds(control_plane, "--set", "crds.install=false") == {}
    for crd in rendered_crds(control_plane, "--set", "crds.keep=false").values():
        assert "annotations" not in crd["metadata"] or "helm.sh/resource-policy" not in crd["metadata"]["annotations"]


def moved_chart(tmp: Path, group: str, suffix: str) -> Path:
    """The chart, its ephemera.dev CRDs moved to `group` under kinds, plurals and no short names of
    their own (kubectl would otherwise find two `pe`, and keep the wrong one in its discovery cache
    after this test), and kopf's left to the session."""
    chart = tmp / "ephemera"
    shutil.copytree(CHART, chart)
    (chart / "files" / "crds" / "clusterkopfpeerings.yaml").unlink()
    for path in (chart / "files" / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        kind = f"{crd['spec']['names']['kind']}Probe{suffix}"
        names = {"kind": kind, "listKind": f"{kind}List", "plural": f"{kind.lower()}s", "singular": kind.lower()}
        crd["spec"]["group"] = group
        crd["spec"]["names"] = names
        crd["metadata"]["name"] = f"{names['plural']}.{group}"
        path.write_text(yaml.safe_dump(crd))
    return chart


def change_crd(chart: Path, name: str, edit: Any) -> None:
    path = chart / "files" / "crds" / f"{name}.yaml"
    crd = yaml.safe_load(path.read_text())
    edit(crd)
    path.write_text(yaml.safe_dump(crd))


@pytest.fixture
def release(control_plane: ControlPlane, kubectl: Kubectl, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A release name, its test group and its chart copy; the release, its CRDs and peering object go after."""
    suffix = uuid.uuid4().hex[:6]
    name, group = f"crdtest-{suffix}", f"crdtest{suffix}.example.com"
    kubectl.run("apply", "-f", str(REPO_ROOT / "crds" / "clusterkopfpeerings.yaml"))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/clusterkopfpeerings.kopf.dev")
    yield name, group, moved_chart(tmp_path, group, suffix)
    helm(control_plane, "uninstall", name, "--namespace", f"{NAMESPACE}-{suffix}", check=False)
    for kind in ("previewenvironment", "previewtemplate"):
        crd = f"{kind}probe{suffix}s.{group}"
        kubectl.run("delete", "crd", crd, "--ignore-not-found", "--wait=false", check=False)
    kubectl.run("delete", "clusterkopfpeering", name, "--ignore-not-found", check=False)
    kubectl.run("delete", "namespace", f"{NAMESPACE}-{suffix}", "--ignore-not-found", "--wait=false", check=False)


def test_helm_upgrade_changes_a_changed_crd_on_the_api_server(
    control_plane: ControlPlane, kubectl: Kubectl, release: tuple[str, str, Path]
) -> None:
    name, group, chart = release
    namespace = f"{NAMESPACE}-{name.removeprefix('crdtest-')}"
    # The release's other cluster-wide objects must not meet the session's: its own peering object,
    # no admission policies (they would judge every test's PreviewEnvironments) and no aggregated roles.
    values = [
        "--namespace", namespace,
        "--set", f"secrets.webhookSecret={SECRET}",
        "--set", f"operator.peering={name}",
        "--set", "policies.operatorScope=false",
        "--set", "policies.previewEnvironments=off",
        "--set", "rbac.aggregateRoles=false",
    ]  # fmt: skip
    installed = helm(control_plane, "install", name, str(chart), "--create-namespace", *values, check=False)
    assert installed.returncode == 0, installed.stderr
    suffix = name.removeprefix("crdtest-")
    crd_name, short_name = f"previewtemplateprobe{suffix}s.{group}", f"ptx{suffix}"

    def crd() -> dict[str, Any]:
        found: dict[str, Any] = kubectl.json("get", "crd", crd_name)
        return found

    created = crd()
    assert created["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert created["metadata"]["annotations"]["meta.helm.sh/release-name"] == name
    assert "shortNames" not in created["spec"]["names"]
    columns = created["spec"]["versions"][0].get("additionalPrinterColumns", [])
    assert "Upgraded" not in [c["name"] for c in columns]
    # Its custom resource, made by a post-install hook once the CRD exists (kopf's peering object).
    peering_uid = kubectl.json("get", "clusterkopfpeering", name)["metadata"]["uid"]

    def edit(doc: dict[str, Any]) -> None:
        doc["spec"]["names"]["shortNames"] = [short_name]
        version = doc["spec"]["versions"][0]
        version.setdefault("additionalPrinterColumns", []).append(
            {"name": "Upgraded", "type": "string", "jsonPath": ".metadata.name"}
        )

    change_crd(chart, "previewtemplates", edit)
    upgraded = helm(control_plane, "upgrade", name, str(chart), *values, check=False)
    assert upgraded.returncode == 0, upgraded.stderr
    after = crd()
    assert after["spec"]["names"]["shortNames"] == [short_name]
    assert "Upgraded" in [c["name"] for c in after["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert int(after["metadata"]["generation"]) > int(created["metadata"]["generation"])
    # The API server serves the change: the new short name is known to discovery.
    wait_for(
        lambda: kubectl.run("get", short_name, check=False).returncode == 0,
        timeout=30,
        what="the upgraded CRD's new short name",
    )
    # The peering object outlives the upgrade untouched (a hook on upgrade would delete and remake it).
    assert kubectl.json("get", "clusterkopfpeering", name)["metadata"]["uid"] == peering_uid

    # crds.keep: uninstalling leaves the CRDs, and so every object of theirs.
    helm(control_plane, "uninstall", name, "--namespace", namespace)
    assert kubectl.run("get", "crd", crd_name, check=False).returncode == 0


def test_a_fresh_install_makes_the_crds_then_the_peering_object(tmp_path: Path) -> None:
    """On an API server that has none of the CRDs (a control plane of this test's own), one `helm
    install` makes them and kopf's peering object, a custom resource of one of them: Helm checks
    every kind of a release's objects before it creates any, so the peering object is a post-install
    hook. Uninstalling keeps the CRDs."""
    with running(tmp_path / "fresh") as fresh:
        kubectl = Kubectl(fresh.bin_dir / "kubectl", fresh.kubeconfig)
        assert kubectl.json("get", "crd")["items"] == []
        installed = helm(
            fresh, "install", "ephemera", str(CHART), "--namespace", NAMESPACE, "--create-namespace",
            "--set", f"secrets.webhookSecret={SECRET}", check=False,
        )  # fmt: skip
        assert installed.returncode == 0, installed.stderr
        crds = {c["metadata"]["name"] for c in kubectl.json("get", "crd")["items"]}
        assert crds == {
            "previewenvironments.ephemera.dev",
            "previewtemplates.ephemera.dev",
            "clusterkopfpeerings.kopf.dev",
        }
        assert kubectl.run("get", "clusterkopfpeering", "ephemera", check=False).returncode == 0
        helm(fresh, "uninstall", "ephemera", "--namespace", NAMESPACE)
        assert {c["metadata"]["name"] for c in kubectl.json("get", "crd")["items"]} == crds
