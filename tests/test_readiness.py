"""Readiness and failure detail, judged from real objects: workloads rolled out by the controllers on
kwok's nodes, and the failures kwok's Stages simulate."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from devtools.support import Kubectl, wait_for
from ephemera.readiness import Assessment, assess
from tests.test_workloads import apply, deployment, job

pytestmark = pytest.mark.cluster


def judge(kubectl: Kubectl, namespace: str, later: float = 0.0) -> Assessment:
    """Assess the namespace's workloads as the operator would, `later` seconds from now."""
    items: list[dict[str, Any]] = kubectl.json("get", "deployments,statefulsets,daemonsets,jobs", "-n", namespace)[
        "items"
    ]
    pods = kubectl.json("get", "pods", "-n", namespace)["items"]
    replica_sets = kubectl.json("get", "replicasets", "-n", namespace)["items"]
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=later)
    return assess(items, pods, replica_sets, now=now)


def settled(kubectl: Kubectl, namespace: str, later: float = 0.0) -> Any:
    def check() -> Assessment | None:
        result = judge(kubectl, namespace, later)
        return result if result.ready or result.failed else None

    return wait_for(check, timeout=90, what="the workloads Ready or Failed")


def test_a_rolled_out_deployment_and_a_finished_job_are_ready(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, deployment("web"))
    apply(kubectl, namespace, job("migrate"))
    assert not judge(kubectl, namespace).ready  # just created: not yet
    result = settled(kubectl, namespace)
    assert result.ready, result.summary()


def test_ready_only_at_the_new_generation_with_old_replicas_gone(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, deployment("web"))
    assert settled(kubectl, namespace).ready
    kubectl.run("set", "image", "-n", namespace, "deployment/web", "web=web:2")
    result = settled(kubectl, namespace)
    assert result.ready
    sets = kubectl.json("get", "replicasets", "-n", namespace)["items"]
    old = [rs for rs in sets if rs["spec"]["template"]["spec"]["containers"][0]["image"] == "web:1"]
    assert old[0]["status"].get("replicas", 0) == 0  # Ready came only once the old ReplicaSet was empty


def rollout(generation: int, observed: int, replicas: int, updated: int, available: int) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {"name": "web", "generation": generation},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "updatedReplicas": updated,
            "availableReplicas": available,
        },
    }


@pytest.mark.parametrize(
    ("state", "ready", "waiting"),
    [
        (rollout(2, 1, 2, 2, 2), False, "has not seen generation 2"),  # the old generation, all available
        (rollout(2, 2, 3, 2, 2), False, "1 old replica(s) still running"),  # new ones up, an old one serving
        (rollout(2, 2, 2, 1, 2), False, "1/2 updated and available"),
        (rollout(2, 2, 2, 2, 2), True, ""),
    ],
)
def test_a_deployment_is_ready_only_at_its_new_generation(state: dict[str, Any], ready: bool, waiting: str) -> None:
    result = assess([state], [])
    assert result.ready is ready
    assert waiting in result.summary()


@pytest.mark.parametrize(
    ("simulate", "reason"), [("crash-loop", "CrashLoopBackOff"), ("image-pull", "ImagePullBackOff")]
)
def test_a_broken_pod_fails_naming_the_container_and_reason(
    kubectl: Kubectl, namespace: str, simulate: str, reason: str
) -> None:
    apply(kubectl, namespace, deployment("web", replicas=1, simulate=simulate, image="web:broken"))
    result = settled(kubectl, namespace)
    assert result.failed
    (problem,) = result.problems
    assert (problem.kind, problem.reason) == ("Pod", reason)
    assert problem.name.startswith("web-")
    assert "container web" in problem.message


def test_a_fixed_template_recovers_and_old_broken_pods_are_not_judged(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, deployment("web", replicas=1, simulate="crash-loop"))
    assert settled(kubectl, namespace).failed
    apply(kubectl, namespace, deployment("web", replicas=1, image="web:2"))
    result = wait_for(lambda: judge(kubectl, namespace).ready and judge(kubectl, namespace), timeout=90, what="Ready")
    assert result.problems == []


def test_pods_of_a_deployment_whose_controller_has_not_seen_the_fix_are_not_judged() -> None:
    """The template was just fixed: the Deployment's new generation is applied, its controller has not
    handled it, so the only ReplicaSet listed is the broken one, whose pods still fail. That is a
    rollout under way, not a failure (judged a failure, an environment stayed Failed in a loaded run)."""
    deployment_ = {**rollout(2, 1, 2, 0, 0), "metadata": {"name": "web", "generation": 2, "uid": "d1"}}
    old_set: dict[str, Any] = {
        "kind": "ReplicaSet",
        "metadata": {
            "name": "web-old",
            "labels": {"pod-template-hash": "old"},
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "ownerReferences": [{"kind": "Deployment", "name": "web", "uid": "d1"}],
        },
        "spec": {"replicas": 2},
    }
    waiting: dict[str, Any] = {
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
    }
    old_pod: dict[str, Any] = {
        "metadata": {"name": "web-old-1", "labels": {"pod-template-hash": "old"}},
        "status": {"containerStatuses": [{"name": "web", **waiting}]},
    }

    result = assess([deployment_], [old_pod], [old_set])

    assert result.problems == []
    assert not result.ready
    assert "has not seen generation 2" in result.summary()
    # Once it has (the new ReplicaSet listed with it), the new revision's pods are judged, not the old one's.
    seen = {**deployment_, "status": {**deployment_["status"], "observedGeneration": 2}}
    new_meta = {**old_set["metadata"], "name": "web-new", "labels": {"pod-template-hash": "new"}}
    new_set = {**old_set, "metadata": {**new_meta, "annotations": {"deployment.kubernetes.io/revision": "2"}}}
    new_pod = {**old_pod, "metadata": {"name": "web-new-1", "labels": {"pod-template-hash": "new"}}}
    assert assess([seen], [old_pod], [old_set, new_set]).problems == []
    assert [p.name for p in assess([seen], [old_pod, new_pod], [old_set, new_set]).problems] == ["web-new-1"]


def test_a_failed_job_fails(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job("migrate", simulate="fail"))
    (problem,) = settled(kubectl, namespace).problems
    assert (problem.kind, problem.name, problem.reason) == ("Job", "migrate", "BackoffLimitExceeded")


def test_a_quota_refusal_names_the_quota(kubectl: Kubectl, namespace: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "tight"},
        "spec": {"hard": {"pods": "0"}},
    }
    apply(kubectl, namespace, quota)
    wait_for(
        lambda: kubectl.json("get", "resourcequota", "-n", namespace, "tight").get("status", {}).get("hard"),
        timeout=30,
        what="the quota counted",
    )
    apply(kubectl, namespace, deployment("web", replicas=1))
    problems = settled(kubectl, namespace).problems
    assert [(p.kind, p.reason) for p in problems] == [("ReplicaSet", "FailedCreate")]
    assert "exceeded quota: tight" in problems[0].message


def test_an_unschedulable_pod_fails_after_its_grace(kubectl: Kubectl, namespace: str) -> None:
    body = deployment("web", replicas=1)
    body["spec"]["template"]["spec"]["nodeSelector"] = {"ephemera.dev/no-such-node": "true"}
    apply(kubectl, namespace, body)
    wait_for(
        lambda: any(
            c.get("reason") == "Unschedulable"
            for pod in kubectl.json("get", "pods", "-n", namespace)["items"]
            for c in pod.get("status", {}).get("conditions") or []
        ),
        timeout=60,
        what="the scheduler to give up on the pod",
    )
    assert not judge(kubectl, namespace).failed  # within the grace: a node may yet come
    (problem,) = judge(kubectl, namespace, later=120).problems
    assert (problem.kind, problem.reason) == ("Pod", "Unschedulable")
    assert "node affinity/selector" in problem.message
