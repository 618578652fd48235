"""What isolates a preview namespace: its ResourceQuota (enforced by the API server's quota admission)
and its NetworkPolicies (checked as objects: the local control plane has no network plugin to
enforce them, so that packets are dropped is not tested here)."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from devtools.support import Kubectl, Process, wait_for
from ephemera import children
from ephemera.api.models import PreviewEnvironmentSpec
from ephemera.api.naming import environment_name
from ephemera.config import Settings
from tests.test_operator import SHA_B, make_env, unique, wait_phase

SPEC = PreviewEnvironmentSpec.model_validate(
    {"repository": "octo-org/shop", "pullRequest": 1, "commitSha": "a" * 40, "branch": "main"}
)
DNS_RULE = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


def test_the_quota_caps_services_storage_and_object_counts_by_default() -> None:
    settings = Settings()
    hard = children.build_resource_quota("ns", "env", SPEC, children.resolve_quota(SPEC, settings))["spec"]["hard"]
    assert hard["services.loadbalancers"] == "0"
    assert hard["services.nodeports"] == "0"
    assert hard["persistentvolumeclaims"] == "5"
    assert hard["requests.storage"] == "20Gi"
    assert hard["requests.ephemeral-storage"] == hard["limits.ephemeral-storage"] == "10Gi"
    assert (hard["configmaps"], hard["secrets"], hard["services"]) == ("50", "50", "20")


def test_the_quota_follows_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LOAD_BALANCERS": "1",
        "NODE_PORTS": "2",
        "PERSISTENT_VOLUME_CLAIMS": "3",
        "STORAGE": "7Gi",
        "EPHEMERAL_STORAGE": "512Mi",
        "CONFIG_MAPS": "4",
        "SECRETS": "5",
        "SERVICES": "6",
    }.items():
        monkeypatch.setenv(f"EPHEMERA_QUOTA_{name}", value)
    settings = Settings()
    quota = children.resolve_quota(SPEC, settings)
    hard = children.build_resource_quota("ns", "env", SPEC, quota)["spec"]["hard"]
    assert hard["services.loadbalancers"] == "1"
    assert hard["services.nodeports"] == "2"
    assert hard["persistentvolumeclaims"] == "3"
    assert hard["requests.storage"] == "7Gi"
    assert hard["limits.ephemeral-storage"] == "512Mi"
    assert (hard["configmaps"], hard["secrets"], hard["services"]) == ("4", "5", "6")
    # Containers that ask for no disk get a default that fits the quota.
    limits = children.build_limit_range("ns", "env", SPEC, quota)["spec"]["limits"][0]
    assert limits["default"]["ephemeral-storage"] == "512Mi"
    assert limits["defaultRequest"]["ephemeral-storage"] == "128Mi"


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        ("EPHEMERA_QUOTA_STORAGE", "lots", "EPHEMERA_QUOTA_STORAGE"),
        ("EPHEMERA_QUOTA_NODE_PORTS", "-1", "greater than or equal to 0"),
        ("EPHEMERA_QUOTA_CONFIG_MAPS", "0", "greater than or equal to 1"),
        ("EPHEMERA_EGRESS_ALLOW_CIDRS", '["10.0.0.1/8"]', "has host bits set"),
        ("EPHEMERA_EGRESS_ALLOW_CIDRS", '["not-a-network"]', "EPHEMERA_EGRESS_ALLOW_CIDRS"),
        ("EPHEMERA_EGRESS_EXTRA_RULES", '{"to": []}', "list"),
    ],
)
def test_bad_isolation_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, complaint: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=complaint):
        Settings()


def test_egress_is_denied_but_to_the_namespace_and_cluster_dns() -> None:
    policy = children.build_egress_policy("ns", "env", SPEC, Settings())
    assert policy["metadata"]["name"] == "ephemera-egress"
    assert policy["spec"] == {
        "podSelector": {},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {}}]}, DNS_RULE],
    }


def test_more_egress_is_allowed_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {"to": [{"namespaceSelector": {"matchLabels": {"team": "shared"}}}], "ports": [{"port": 5432}]}
    monkeypatch.setenv("EPHEMERA_EGRESS_ALLOW_CIDRS", '["10.20.0.0/16", "fd00::/8"]')
    monkeypatch.setenv("EPHEMERA_EGRESS_EXTRA_RULES", json.dumps([extra]))
    egress = children.build_egress_policy("ns", "env", SPEC, Settings())["spec"]["egress"]
    assert egress[2] == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}, {"ipBlock": {"cidr": "fd00::/8"}}]}
    assert egress[3] == extra
    assert len(egress) == 4


# On the API server --------------------------------------------------------------------------------


def service(name: str, type_: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": type_, "ports": [{"port": 80}], "selector": {"app": name}},
    }


def create(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kubectl.run("-n", namespace, "create", "-f", "-", input=json.dumps(manifest), check=False)


def quota_counted(kubectl: Kubectl, namespace: str) -> dict[str, Any] | None:
    """The quota once the quota controller has counted the namespace (admission refuses before that)."""
    found = kubectl.json("-n", namespace, "get", "resourcequota", "ephemera-quota")
    status = found.get("status") or {}
    return status if set(status.get("hard") or {}) == set(found["spec"]["hard"]) and "used" in status else None


@pytest.fixture
def environment(operator: Process, kubectl: Kubectl) -> Iterator[tuple[str, str]]:
    """A Ready environment made by the operator: (object name, namespace)."""
    name = unique("isolation")
    # A repository of its own: the namespace is named by the repository and the PR. With a PR number
    # drawn from a hundred (as before), two of the module's four environments shared one in 6% of runs,
    # and the next one's provision, reading the namespace before the previous one's teardown (deleted
    # without waiting) deleted it, would fail for good as a NamespaceConflict.
    repo, number = f"octo-org/isolation-{uuid.uuid4().hex[:6]}", 900
    kubectl.apply(make_env(name, number, repo=repo))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    assert namespace == environment_name(repo, number)
    yield name, namespace
    kubectl.run("delete", "pe", name, "--wait=false", check=False)


def test_a_preview_gets_no_load_balancer_or_node_port(environment: tuple[str, str], kubectl: Kubectl) -> None:
    _, namespace = environment
    wait_for(lambda: quota_counted(kubectl, namespace), timeout=60, what="the quota counted")
    for type_, resource in (("NodePort", "services.nodeports"), ("LoadBalancer", "services.loadbalancers")):
        result = create(kubectl, namespace, service(f"exposed-{type_.lower()}", type_))
        assert result.returncode != 0
        assert "exceeded quota: ephemera-quota" in result.stderr, result.stderr
        assert f"limited: {resource}=0" in result.stderr, result.stderr
    assert create(kubectl, namespace, service("internal", "ClusterIP")).returncode == 0


def test_object_counts_and_storage_are_enforced(kubectl: Kubectl, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder's quota, with small counts, on a namespace of its own (no operator needed)."""
    limits = {"configmaps": 3, "secrets": 2, "services": 2}
    monkeypatch.setenv("EPHEMERA_QUOTA_CONFIG_MAPS", str(limits["configmaps"]))
    monkeypatch.setenv("EPHEMERA_QUOTA_SECRETS", str(limits["secrets"]))
    monkeypatch.setenv("EPHEMERA_QUOTA_SERVICES", str(limits["services"]))
    monkeypatch.setenv("EPHEMERA_QUOTA_PERSISTENT_VOLUME_CLAIMS", "1")
    monkeypatch.setenv("EPHEMERA_QUOTA_STORAGE", "1Gi")
    namespace = f"quota-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", namespace)
    try:
        quota = children.resolve_quota(SPEC, Settings())
        kubectl.apply(children.build_resource_quota(namespace, "env", SPEC, quota))
        used = wait_for(lambda: quota_counted(kubectl, namespace), timeout=60, what="the quota counted")["used"]
        kinds: dict[str, Callable[[int], dict[str, Any]]] = {
            "configmaps": lambda i: {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}"}},
            "secrets": lambda i: {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"s{i}"}},
            "services": lambda i: service(f"svc{i}", "ClusterIP"),
        }
        for resource, manifest in kinds.items():
            room = limits[resource] - int(used.get(resource, "0"))  # kube-root-ca.crt may be counted already
            for i in range(room):
                made = create(kubectl, namespace, manifest(i))
                assert made.returncode == 0, made.stderr
            refused = create(kubectl, namespace, manifest(room))
            assert f"exceeded quota: ephemera-quota, requested: {resource}=1" in refused.stderr, refused.stderr
        claim: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "big"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
        }
        too_big = create(kubectl, namespace, claim)
        assert "exceeded quota: ephemera-quota, requested: requests.storage=2Gi" in too_big.stderr, too_big.stderr
        claim["spec"]["resources"]["requests"]["storage"] = "1Gi"
        assert create(kubectl, namespace, claim).returncode == 0
        claim["metadata"]["name"] = "second"
        second = create(kubectl, namespace, claim)
        assert "persistentvolumeclaims=1" in second.stderr, second.stderr
    finally:
        kubectl.run("delete", "namespace", namespace, "--wait=false")


def test_every_environment_gets_the_egress_policy(environment: tuple[str, str], kubectl: Kubectl) -> None:
    _, namespace = environment
    policy = kubectl.json("-n", namespace, "get", "networkpolicy", "ephemera-egress")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert policy["spec"]["podSelector"] == {}
    assert policy["spec"]["egress"] == [{"to": [{"podSelector": {}}]}, DNS_RULE]


def test_an_environment_made_before_the_egress_policy_gets_it_on_its_next_reconcile(
    environment: tuple[str, str], kubectl: Kubectl
) -> None:
    name, namespace = environment
    # As an operator before this change left it: no egress policy.
    kubectl.run("-n", namespace, "delete", "networkpolicy", "ephemera-egress", "--ignore-not-found")
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    wait_for(
        lambda: kubectl.run("-n", namespace, "get", "networkpolicy", "ephemera-egress", check=False).returncode == 0,
        timeout=60,
        what="the egress policy mended on the next reconcile",
    )
    wait_phase(kubectl, name, "Ready")


def pod(name: str, resources: dict[str, Any] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": "registry.example.com/app:1"}
    if resources is not None:
        container["resources"] = resources
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}


def test_pods_that_ask_for_no_disk_get_a_share_of_the_ephemeral_storage_quota(
    environment: tuple[str, str], kubectl: Kubectl
) -> None:
    _, namespace = environment
    wait_for(lambda: quota_counted(kubectl, namespace), timeout=60, what="the quota counted")
    wait_for(
        lambda: kubectl.run("-n", namespace, "get", "serviceaccount", "default", check=False).returncode == 0,
        timeout=60,
        what="the namespace's default ServiceAccount",
    )
    # With ephemeral storage in the quota, a pod that names none is admitted only through the
    # LimitRange's defaults.
    made = create(kubectl, namespace, pod("plain"))
    assert made.returncode == 0, made.stderr
    limits = kubectl.json("-n", namespace, "get", "pod", "plain")["spec"]["containers"][0]["resources"]["limits"]
    assert limits["ephemeral-storage"] == "1Gi"
    greedy = create(kubectl, namespace, pod("greedy", {"limits": {"ephemeral-storage": "11Gi"}}))
    assert greedy.returncode != 0
    assert "ephemeral-storage" in greedy.stderr, greedy.stderr
