"""The local control plane runs workloads: kube-scheduler binds pods to kwok's fake nodes, kwok marks
them Running, and the controllers roll Deployments out, finish Jobs and fill EndpointSlices; pods
labelled `ephemera.dev/simulate` fail the way a test asks."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from devtools.controlplane import NODES, POD_CIDR, ControlPlane
from devtools.support import Kubectl, wait_for

pytestmark = pytest.mark.cluster


def deployment(name: str, replicas: int = 2, simulate: str | None = None, image: str = "web:1") -> dict[str, Any]:
    labels = {"app": name, **({"ephemera.dev/simulate": simulate} if simulate else {})}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": image}]},
            },
        },
    }


def job(name: str, simulate: str | None = None) -> dict[str, Any]:
    labels = {"ephemera.dev/simulate": simulate} if simulate else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "task", "image": "task:1"}]},
            },
        },
    }


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl.apply({**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}})


def pods(kubectl: Kubectl, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return items


def condition(obj: dict[str, Any], kind: str) -> str | None:
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return str(item.get("status"))
    return None


def test_fake_nodes_become_ready_and_schedulable(control_plane: ControlPlane, kubectl: Kubectl) -> None:
    def ready_nodes() -> list[str]:
        nodes = kubectl.json("get", "nodes")["items"]
        return [
            n["metadata"]["name"]
            for n in nodes
            if condition(n, "Ready") == "True"
            and not any(t.get("effect") == "NoSchedule" for t in n.get("spec", {}).get("taints") or [])
        ]

    assert len(wait_for(ready_nodes, timeout=60, what="kwok's nodes Ready without taints")) == NODES


def test_deployment_rolls_out_to_available(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, deployment("web"))
    kubectl.run("rollout", "status", "-n", namespace, "deployment/web", "--timeout=90s")
    running = pods(kubectl, namespace, "app=web")
    assert len(running) == 2
    for pod in running:
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"].startswith("kwok-node-")
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)

    # A new image rolls out through a new ReplicaSet; the old one is scaled to 0.
    kubectl.run("set", "image", "-n", namespace, "deployment/web", "web=web:2")
    kubectl.run("rollout", "status", "-n", namespace, "deployment/web", "--timeout=90s")
    sets = kubectl.json("get", "replicasets", "-n", namespace, "-l", "app=web")["items"]
    by_image = {rs["spec"]["template"]["spec"]["containers"][0]["image"]: rs for rs in sets}
    assert by_image["web:1"]["spec"]["replicas"] == 0
    assert by_image["web:2"]["status"].get("readyReplicas") == 2


def test_service_gets_endpoints_of_ready_pods(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, deployment("api", replicas=1))
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "api"},
        "spec": {"selector": {"app": "api"}, "ports": [{"port": 80}]},
    }
    apply(kubectl, namespace, service)

    def ready_endpoints() -> list[str]:
        slices = kubectl.json("get", "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=api")
        return [
            address
            for item in slices["items"]
            for endpoint in item.get("endpoints") or []
            if (endpoint.get("conditions") or {}).get("ready")
            for address in endpoint.get("addresses") or []
        ]

    assert len(wait_for(ready_endpoints, timeout=90, what="an EndpointSlice with the ready pod")) == 1


def test_job_completes(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job("migrate"))
    wait_for(
        lambda: condition(kubectl.json("get", "job", "-n", namespace, "migrate"), "Complete") == "True",
        timeout=90,
        what="the Job Complete",
    )


@pytest.mark.parametrize(
    ("simulate", "reason", "phase"),
    [("crash-loop", "CrashLoopBackOff", "Running"), ("image-pull", "ImagePullBackOff", "Pending")],
)
def test_simulated_pod_failures_never_become_ready(
    kubectl: Kubectl, namespace: str, simulate: str, reason: str, phase: str
) -> None:
    apply(kubectl, namespace, deployment("broken", replicas=1, simulate=simulate))
    apply(kubectl, namespace, deployment("healthy", replicas=1))
    kubectl.run("rollout", "status", "-n", namespace, "deployment/healthy", "--timeout=90s")

    def waiting_reason() -> str | None:
        for pod in pods(kubectl, namespace, "app=broken"):
            for status in pod.get("status", {}).get("containerStatuses") or []:
                waiting = (status.get("state") or {}).get("waiting") or {}
                if waiting.get("reason"):
                    return str(waiting["reason"])
        return None

    assert wait_for(waiting_reason, timeout=90, what=f"the pod's container waiting with {reason}") == reason
    # The healthy Deployment rolled out after the broken one was created, on the same nodes; the broken
    # pod, though marked long before that, is still not Ready: pod-ready never took it over.
    (pod,) = pods(kubectl, namespace, "app=broken")
    assert pod["status"]["phase"] == phase
    assert condition(pod, "Ready") == "False"
    broken = kubectl.json("get", "deployment", "-n", namespace, "broken")
    assert not broken["status"].get("availableReplicas")


def test_simulated_job_failure(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job("fails", simulate="fail"))
    wait_for(
        lambda: condition(kubectl.json("get", "job", "-n", namespace, "fails"), "Failed") == "True",
        timeout=90,
        what="the Job Failed",
    )
    (pod,) = pods(kubectl, namespace, "job-name=fails")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (pod["status"]["phase"], terminated["exitCode"]) == ("Failed", 1)
