"""Applying a rendered template into a namespace on the real API server: server-side apply, the
inventory, pruning, refusals before anything is applied, and readiness of what was applied."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.support import Kubectl, wait_for
from ephemera.apply import FIELD_MANAGER, Applier, Ref
from ephemera.kube import Kube
from ephemera.templates import TemplateError
from tests.test_workloads import deployment

pytestmark = pytest.mark.cluster
LABELS = {"app.kubernetes.io/managed-by": "ephemera"}


def service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}}


def config_map(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def names(kubectl: Kubectl, namespace: str, kinds: str) -> set[str]:
    items = kubectl.json("get", kinds, "-n", namespace)["items"]
    return {f"{item['kind']}/{item['metadata']['name']}" for item in items}


def test_apply_records_the_inventory_and_prunes_what_is_no_longer_rendered(
    kube: Kube, kubectl: Kubectl, namespace: str
) -> None:
    applier = Applier(kube)
    first = applier.apply([deployment("web"), service("web"), config_map("settings", a="1")], namespace, LABELS)
    assert first == sorted(
        [Ref("apps/v1", "Deployment", "web"), Ref("v1", "Service", "web"), Ref("v1", "ConfigMap", "settings")]
    )
    applied = kubectl.json("get", "configmap", "-n", namespace, "settings", "--show-managed-fields")
    assert applied["metadata"]["labels"] == LABELS
    assert FIELD_MANAGER in {entry["manager"] for entry in applied["metadata"]["managedFields"]}

    # Someone else's object in the namespace is never pruned: only what the inventory holds.
    kubectl.run("create", "configmap", "-n", namespace, "theirs")
    second = applier.apply([deployment("web"), config_map("settings", a="2")], namespace, LABELS, previous=first)
    assert Ref("v1", "Service", "web") not in second
    wait_for(lambda: "Service/web" not in names(kubectl, namespace, "services"), timeout=30, what="the pruned Service")
    assert {"ConfigMap/settings", "ConfigMap/theirs"} <= names(kubectl, namespace, "configmaps")
    assert kubectl.json("get", "configmap", "-n", namespace, "settings")["data"] == {"a": "2"}


def test_apply_takes_over_fields_changed_by_hand(kube: Kube, kubectl: Kubectl, namespace: str) -> None:
    applier = Applier(kube)
    applier.apply([config_map("settings", a="1")], namespace, LABELS)
    kubectl.run("patch", "configmap", "-n", namespace, "settings", "-p", '{"data": {"a": "edited"}}')
    applier.apply([config_map("settings", a="1")], namespace, LABELS)
    assert kubectl.json("get", "configmap", "-n", namespace, "settings")["data"] == {"a": "1"}


@pytest.mark.parametrize(
    ("bad", "reason", "message"),
    [
        (
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "x"}},
            "ObjectDenied",
            "ClusterRoleBinding is not allowed",
        ),
        ({**config_map("x"), "metadata": {"name": "x", "namespace": "kube-system"}}, "ObjectDenied", "kube-system"),
        (
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "x"}},
            "ObjectDenied",
            "cluster-scoped",
        ),
        ({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}}, "UnknownKind", "Widget"),
    ],
)
def test_a_refused_object_applies_nothing(
    kube: Kube, kubectl: Kubectl, namespace: str, bad: dict[str, Any], reason: str, message: str
) -> None:
    with pytest.raises(TemplateError, match=message) as err:
        Applier(kube).apply([config_map("first"), bad], namespace, LABELS)
    assert err.value.reason == reason
    assert "ConfigMap/first" not in names(kubectl, namespace, "configmaps")


def test_the_api_servers_refusal_is_named(kube: Kube, namespace: str) -> None:
    bad_port = service("web")
    bad_port["spec"]["ports"][0]["port"] = 99999
    with pytest.raises(TemplateError, match=r"applying Service web: 422 .*spec.ports\[0\].port") as err:
        Applier(kube).apply([bad_port], namespace, LABELS)
    assert err.value.reason == "ApplyRefused"
    wrong_type = deployment("web")
    wrong_type["spec"]["replicas"] = "two"  # answered with a 500 by server-side apply, yet final
    with pytest.raises(TemplateError, match=r"\.spec\.replicas: expected numeric") as err:
        Applier(kube).apply([wrong_type], namespace, LABELS)
    assert err.value.reason == "ApplyRefused"


def test_observe_judges_the_inventorys_workloads(kube: Kube, namespace: str) -> None:
    applier = Applier(kube)
    inventory = applier.apply([deployment("web"), service("web")], namespace, LABELS)
    result = wait_for(lambda: (r := applier.observe(namespace, inventory)).ready and r, timeout=90, what="Ready")
    assert result.problems == []
    broken = applier.apply([deployment("web", simulate="crash-loop")], namespace, LABELS, previous=inventory)

    def failed() -> Any:
        found = applier.observe(namespace, broken)
        return found if found.failed else None

    problems = wait_for(failed, timeout=90, what="the crash loop seen").problems
    assert {p.reason for p in problems} == {"CrashLoopBackOff"}
