"""The chart's RBAC and admission policies, proven by impersonation on the local API server.

The chart is rendered and its ServiceAccounts, RBAC and ValidatingAdmissionPolicies are applied; then
`kubectl --as=system:serviceaccount:...` asks what each identity may do (`auth can-i`) and tries it.
Writes that must be refused outside Ephemera's namespaces are tried with --dry-run=server (admission
runs on dry runs), so that a broken policy cannot delete kube-system from the test control plane.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.support import Kubectl, wait_for
from ephemera.api.naming import MANAGED_BY, MANAGED_BY_LABEL
from tests.conftest import wait_policies_lifted

CHART = REPO_ROOT / "charts" / "ephemera"
RELEASE, NAMESPACE = "policytest", "ephemera-policies"
OPERATOR = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-ephemera-operator"
WEBHOOK = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-ephemera-webhook"
APPLIED = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
REFUSED_BY_POLICY = "ValidatingAdmissionPolicy"


def render(control_plane: ControlPlane, *sets: str) -> list[dict[str, Any]]:
    args = [f"--set={s}" for s in sets]
    result = subprocess.run(
        [str(control_plane.bin_dir / "helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] in APPLIED]


@dataclass
class Release:
    """The chart's cluster objects on the API server, replaced by `apply(values)`."""

    control_plane: ControlPlane
    kubectl: Kubectl
    objects: list[dict[str, Any]]

    def apply(self, *sets: str) -> None:
        docs = render(self.control_plane, *sets)
        for doc in docs:
            if doc["kind"] == "ServiceAccount":  # helm template leaves the release namespace out
                doc["metadata"]["namespace"] = NAMESPACE
        wanted = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for old in self.objects:
            if (old["kind"], old["metadata"]["name"]) not in wanted:
                self.delete(old)
        for doc in docs:
            result = self.kubectl.apply(doc, check=False)
            assert result.returncode == 0, result.stderr
        self.objects = docs

    def delete(self, doc: dict[str, Any]) -> None:
        self.kubectl.run("delete", "--ignore-not-found", "-f", "-", input=json.dumps(doc), check=False)


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, kubectl: Kubectl, crd: Path) -> Iterator[Release]:
    kubectl.run("create", "namespace", NAMESPACE)
    applied = Release(control_plane, kubectl, [])
    applied.apply()
    yield applied
    for doc in applied.objects:  # cluster-wide policies must not outlive this module
        applied.delete(doc)
    wait_policies_lifted(kubectl)
    kubectl.run("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def as_(kubectl: Kubectl, user: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return kubectl.run(f"--as={user}", *args, input=input, check=False)

    return run


def can_i(kubectl: Kubectl, user: str, *args: str) -> bool:
    answer = as_(kubectl, user)("auth", "can-i", *args).stdout.strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


def namespace(name: str, labelled: bool) -> str:
    labels = {MANAGED_BY_LABEL: MANAGED_BY} if labelled else {}
    return json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


def quota(namespace: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "ephemera-quota", "namespace": namespace},
            "spec": {"hard": {"pods": "1"}},
        }
    )


def network_policy(namespace: str) -> str:
    return json.dumps(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "ephemera-egress", "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
        }
    )


def deployment(namespace: str) -> str:
    """What a PreviewTemplate applies: held to Ephemera's namespaces like the guards."""
    labels = {"app": "web"}
    template = {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}}
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {"selector": {"matchLabels": labels}, "template": template},
        }
    )


def secret(namespace: str) -> str:
    return json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app", "namespace": namespace}, "data": {}}
    )


def limit_range(namespace: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": {"name": "ephemera-limits", "namespace": namespace},
            "spec": {"limits": [{"type": "Container", "default": {"cpu": "100m"}}]},
        }
    )


def refused(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and REFUSED_BY_POLICY in result.stderr


def test_the_operator_only_watches_pods_and_posts_events_only_in_default(release: Release, kubectl: Kubectl) -> None:
    # Pods are listed and watched (a PreviewTemplate's app is judged by its pods: a crash loop is named
    # from the container's state), never fetched one by one, changed, exec'ed into or deleted.
    assert can_i(kubectl, OPERATOR, "watch", "pods", "--all-namespaces")
    for verb in ("get", "create", "patch", "delete"):
        assert not can_i(kubectl, OPERATOR, verb, "pods", "-n", "default")
    assert not can_i(kubectl, OPERATOR, "create", "pods/exec", "-n", "default")
    # Secrets: an app's are written (server-side apply), never read.
    assert can_i(kubectl, OPERATOR, "patch", "secrets", "-n", "pr-1-octo-shop-0123456789ab")
    for verb in ("get", "list", "watch"):
        assert not can_i(kubectl, OPERATOR, verb, "secrets", "-n", "pr-1-octo-shop-0123456789ab")
    assert can_i(kubectl, OPERATOR, "create", "events", "-n", "default")
    assert not can_i(kubectl, OPERATOR, "create", "events", "-n", "kube-system")
    assert not can_i(kubectl, OPERATOR, "create", "events", "-n", "pr-1-octo-shop-0123456789ab")
    assert not can_i(kubectl, OPERATOR, "create", "events.events.k8s.io", "-n", "default")
    assert not can_i(kubectl, OPERATOR, "list", "secrets", "--all-namespaces")
    # What RBAC cannot narrow (any namespace or none): the admission policy below does.
    assert can_i(kubectl, OPERATOR, "delete", "namespaces")
    assert can_i(kubectl, OPERATOR, "create", "resourcequotas", "-n", "kube-system")


@pytest.fixture(scope="module")
def team(kubectl: Kubectl, release: Release) -> Iterator[str]:
    """A namespace that is not Ephemera's, though it carries Ephemera's label (the label alone is not enough)."""
    name = f"team-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", name)
    kubectl.run("label", "namespace", name, f"{MANAGED_BY_LABEL}={MANAGED_BY}")
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false")


def test_the_operator_is_refused_writes_outside_ephemeras_namespaces(team: str, kubectl: Kubectl) -> None:
    operator = as_(kubectl, OPERATOR)
    wait_for(
        lambda: refused(operator("delete", "namespace", team, "--dry-run=server")),
        timeout=30,
        what="the operator-scope policy in force",
    )
    result = operator("delete", "namespace", team, "--dry-run=server")
    assert f"namespace {team} is not one" in result.stderr
    # kube-system and default: NamespaceLifecycle refuses their deletion to everyone, before the policy.
    assert operator("delete", "namespace", "kube-system", "--dry-run=server").returncode != 0
    for manifest in (quota, limit_range, network_policy, deployment, secret):
        assert refused(operator("create", "-f", "-", input=manifest(team)))
        for other in ("kube-system", "default"):
            assert refused(operator("create", "--dry-run=server", "-f", "-", input=manifest(other)))
    # A name of Ephemera's form without the label, or the label on another name: refused.
    assert refused(operator("create", "-f", "-", "--dry-run=server", input=namespace("pr-7-octo-shop-abc", False)))
    assert refused(operator("create", "-f", "-", "--dry-run=server", input=namespace("prod-7-shop", True)))
    assert refused(operator("create", "-f", "-", "--dry-run=server", input=namespace("team-b", True)))


def test_the_operator_may_still_write_its_own_namespaces(release: Release, kubectl: Kubectl) -> None:
    operator = as_(kubectl, OPERATOR)
    name = f"pr-7-octo-shop-{uuid.uuid4().hex[:12]}"
    created = operator("create", "-f", "-", input=namespace(name, True))
    assert created.returncode == 0, created.stderr
    try:
        for manifest in (quota, limit_range, network_policy, deployment, secret):
            result = operator("create", "-f", "-", input=manifest(name))
            assert result.returncode == 0, result.stderr
        replaced = operator("replace", "-f", "-", input=quota(name).replace('"1"', '"2"'))
        assert replaced.returncode == 0, replaced.stderr
        deleted = operator("delete", "namespace", name, "--wait=false")
        assert deleted.returncode == 0, deleted.stderr
    finally:
        kubectl.run("delete", "namespace", name, "--ignore-not-found", "--wait=false")


def test_the_operator_scope_policy_can_be_turned_off(release: Release, team: str, kubectl: Kubectl) -> None:
    operator = as_(kubectl, OPERATOR)
    release.apply("policies.operatorScope=false")
    try:
        # Only RBAC is left: the same dry run goes through (which is why the policy is on by default).
        wait_for(
            lambda: operator("delete", "namespace", team, "--dry-run=server").returncode == 0,
            timeout=30,
            what="the policy gone",
        )
    finally:
        release.apply()
    wait_for(
        lambda: refused(operator("delete", "namespace", team, "--dry-run=server")),
        timeout=30,
        what="the policy back",
    )


PE_EDITOR = f"pe-editor-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def editor(kubectl: Kubectl, release: Release) -> Iterator[str]:
    """A user whose RBAC lets them create and patch PreviewEnvironments (as a team might be granted)."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": PE_EDITOR},
        "rules": [
            {
                "apiGroups": ["ephemera.dev"],
                "resources": ["previewenvironments"],
                "verbs": ["get", "list", "create", "patch", "update", "delete"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": PE_EDITOR},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PE_EDITOR},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
    }
    kubectl.apply(role)
    kubectl.apply(binding)
    yield "alice"
    kubectl.run("delete", "clusterrolebinding,clusterrole", PE_EDITOR, "--ignore-not-found")


def pe(name: str, installation: int | None = None) -> str:
    spec: dict[str, Any] = {
        "repository": "octo-org/shop",
        "pullRequest": 42,
        "commitSha": "9f2c6d1e8b7a4c3d2e1f0a9b8c7d6e5f4a3b2c1d",
        "branch": "feature/checkout",
    }
    if installation is not None:
        spec["installationId"] = installation
    return json.dumps(
        {"apiVersion": "ephemera.dev/v1alpha1", "kind": "PreviewEnvironment", "metadata": {"name": name}, "spec": spec}
    )


def test_only_the_webhook_may_set_installation_id(release: Release, editor: str, kubectl: Kubectl) -> None:
    alice, webhook = as_(kubectl, editor), as_(kubectl, WEBHOOK)
    name = f"policy-{uuid.uuid4().hex[:8]}"
    assert can_i(kubectl, editor, "create", "previewenvironments.ephemera.dev")
    try:
        wait_for(
            lambda: refused(alice("create", "--dry-run=server", "-f", "-", input=pe(name, 99))),
            timeout=30,
            what="the installationId policy in force",
        )
        result = alice("create", "-f", "-", input=pe(name, 99))
        assert refused(result)
        assert "spec.installationId may only be set or changed by Ephemera's webhook" in result.stderr
        # Without it, the same user may create the object, and edit other fields...
        created = alice("create", "-f", "-", input=pe(name))
        assert created.returncode == 0, created.stderr
        patched = alice("patch", "pe", name, "--type=merge", "-p", '{"spec": {"branch": "other"}}')
        assert patched.returncode == 0, patched.stderr
        # ...but not add the installation afterwards.
        assert refused(alice("patch", "pe", name, "--type=merge", "-p", '{"spec": {"installationId": 99}}'))
        # The webhook may: it takes the installation from a signed GitHub event.
        by_webhook = webhook("patch", "pe", name, "--type=merge", "-p", '{"spec": {"installationId": 99}}')
        assert by_webhook.returncode == 0, by_webhook.stderr
        # Nobody else may change it or take it away, cluster admins included.
        assert refused(alice("patch", "pe", name, "--type=merge", "-p", '{"spec": {"installationId": 100}}'))
        assert refused(kubectl.run("patch", "pe", name, "--type=json", "-p", _remove_installation(), check=False))
        # Other writes to an object that has one go through (the operator's finalizer and annotations).
        annotated = alice("annotate", "pe", name, "ephemera.dev/retry=now", "--overwrite")
        assert annotated.returncode == 0, annotated.stderr
        other = f"policy-{uuid.uuid4().hex[:8]}"
        made = webhook("create", "-f", "-", input=pe(other, 99))
        assert made.returncode == 0, made.stderr
        kubectl.run("delete", "pe", other, "--wait=false")
    finally:
        kubectl.run("delete", "pe", name, "--ignore-not-found", "--wait=false")


def _remove_installation() -> str:
    return json.dumps([{"op": "remove", "path": "/spec/installationId"}])


def test_the_strict_mode_lets_only_the_webhook_create(release: Release, editor: str, kubectl: Kubectl) -> None:
    alice, webhook = as_(kubectl, editor), as_(kubectl, WEBHOOK)
    name = f"policy-{uuid.uuid4().hex[:8]}"
    release.apply("policies.previewEnvironments=create")
    try:
        wait_for(
            lambda: refused(alice("create", "--dry-run=server", "-f", "-", input=pe(name))),
            timeout=30,
            what="the create policy in force",
        )
        result = alice("create", "-f", "-", input=pe(name))
        assert "Only Ephemera's webhook" in result.stderr
        assert webhook("create", "--dry-run=server", "-f", "-", input=pe(name, 7)).returncode == 0
    finally:
        release.apply()


def test_the_preview_environment_policy_can_be_turned_off(release: Release, editor: str, kubectl: Kubectl) -> None:
    alice = as_(kubectl, editor)
    release.apply("policies.previewEnvironments=off")
    try:
        wait_for(
            lambda: alice("create", "--dry-run=server", "-f", "-", input=pe("policy-off", 99)).returncode == 0,
            timeout=30,
            what="the policy gone",
        )
    finally:
        release.apply()


def test_the_backstop_may_create_environments_and_keep_its_state_in_the_release_namespace(
    release: Release, kubectl: Kubectl
) -> None:
    """The operator's backstop creates an environment for an open PR whose event was lost (with the
    installation GitHub listed it under), deletes one whose PR closed, and keeps the closed-PR records
    and its delivery cursor in ConfigMaps of the release's namespace; ConfigMaps elsewhere stay refused."""
    operator = as_(kubectl, OPERATOR)
    name = f"policy-{uuid.uuid4().hex[:8]}"
    try:
        made = operator("create", "-f", "-", input=pe(name, 99))
        assert made.returncode == 0, made.stderr
        deleted = operator("delete", "pe", name, "--wait=false")
        assert deleted.returncode == 0, deleted.stderr
    finally:
        kubectl.run("delete", "pe", name, "--ignore-not-found", "--wait=false")
    cursor = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ephemera-backstop"}})
    created = operator("create", "-n", NAMESPACE, "--dry-run=server", "-f", "-", input=cursor)
    assert created.returncode == 0, created.stderr
    assert not can_i(kubectl, OPERATOR, "list", "configmaps", "-n", NAMESPACE)
    assert refused(operator("create", "-n", "default", "--dry-run=server", "-f", "-", input=cursor))
