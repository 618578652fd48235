"""The operator reconciles PreviewEnvironments through their lifecycle on the real API server."""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest

from devtools.support import Kubectl, Process, post_webhook, wait_for
from ephemera import children
from ephemera.api.models import PreviewEnvironmentSpec
from ephemera.api.naming import DELIVERY_ANNOTATION as DELIVERY
from ephemera.api.naming import (
    FINALIZER,
    MANAGED_BY_LABEL,
    OWNER_UID_ANNOTATION,
    PR_LABEL,
    environment_labels,
    environment_name,
    legacy_environment_name,
)
from ephemera.api.naming import PR_UPDATED_AT_ANNOTATION as UPDATED_AT
from ephemera.config import Settings
from ephemera.watchcache import Vanishing
from tests.conftest import WEBHOOK_SECRET, http_ok

SHA_A = "a" * 40
SHA_B = "b" * 40


def make_env(name: str, pr: int, repo: str = "octo-org/shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ephemera.dev/v1alpha1",
        "kind": "PreviewEnvironment",
        "metadata": {"name": name},
        "spec": {"repository": repo, "pullRequest": pr, "commitSha": SHA_A, "branch": "feature/x", **spec},
    }


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    result = kubectl.run("get", "pe", name, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    data: dict[str, Any] = json.loads(result.stdout).get("status") or {}
    return data


def wait_phase(kubectl: Kubectl, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (s := status(kubectl, name)).get("phase") == phase and s,
        timeout=timeout,
        what=f"{name} to be {phase}",
    )
    return found


def events_of(kubectl: Kubectl, name: str) -> str:
    return kubectl.run("get", "events", "-A", "--field-selector", f"involvedObject.name={name}").stdout


def exists(kubectl: Kubectl, *args: str) -> bool:
    return kubectl.run("get", *args, check=False).returncode == 0


def test_create_reaches_ready_with_every_child(operator: Process, kubectl: Kubectl) -> None:
    name = unique("create")
    kubectl.apply(make_env(name, 101))
    st = wait_phase(kubectl, name, "Ready")
    namespace = st["namespace"]
    assert namespace == environment_name("octo-org/shop", 101)
    assert st["commit"] == SHA_A[:7]
    assert st["observedGeneration"] == 1
    assert st["provisionedAt"]
    assert st["lastTransitionTime"]
    assert [(c["type"], c["status"]) for c in st["conditions"]] == [("Ready", "True")]

    env_uid = kubectl.json("get", "pe", name)["metadata"]["uid"]
    ns = kubectl.json("get", "namespace", namespace)
    assert ns["metadata"]["labels"][MANAGED_BY_LABEL] == "ephemera"
    assert ns["metadata"]["labels"][PR_LABEL] == "101"
    assert ns["metadata"]["annotations"][OWNER_UID_ANNOTATION] == env_uid
    assert [(r["kind"], r["name"], r["uid"]) for r in ns["metadata"]["ownerReferences"]] == [
        ("PreviewEnvironment", name, env_uid)
    ]
    quota = kubectl.json("-n", namespace, "get", "resourcequota", "ephemera-quota")
    assert quota["spec"]["hard"]["limits.cpu"] == "2"
    assert quota["spec"]["hard"]["pods"] == "20"
    limits = kubectl.json("-n", namespace, "get", "limitrange", "ephemera-limits")
    assert limits["spec"]["limits"][0]["default"] == {"cpu": "500m", "memory": "512Mi", "ephemeral-storage": "1Gi"}
    policy = kubectl.json("-n", namespace, "get", "networkpolicy", "ephemera-isolation")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]
    wait_for(lambda: "Ready" in events_of(kubectl, name), timeout=30, what="a Ready event")


def test_new_commit_goes_updating_then_ready(operator: Process, kubectl: Kubectl) -> None:
    name = unique("update")
    kubectl.apply(make_env(name, 102))
    wait_phase(kubectl, name, "Ready")
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    st = wait_for(
        lambda: (s := status(kubectl, name)).get("phase") == "Ready" and s.get("commit") == SHA_B[:7] and s,
        timeout=60,
        what="Ready at the new commit",
    )
    assert st["observedGeneration"] == 2
    wait_for(lambda: "Updating" in events_of(kubectl, name), timeout=30, what="an Updating event")


def test_quota_change_is_applied(operator: Process, kubectl: Kubectl) -> None:
    name = unique("quota")
    kubectl.apply(make_env(name, 103))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"resources": {"cpu": "3"}}}))
    wait_for(
        lambda: (
            kubectl.json("-n", namespace, "get", "resourcequota", "ephemera-quota")["spec"]["hard"]["limits.cpu"] == "3"
        ),
        timeout=60,
        what="the quota to follow the spec",
    )


def test_delete_removes_namespace_and_object(operator: Process, kubectl: Kubectl) -> None:
    name = unique("delete")
    kubectl.apply(make_env(name, 104))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    kubectl.run("delete", "pe", name, "--wait=false")
    wait_for(lambda: not exists(kubectl, "pe", name), timeout=90, what="the object to be gone")
    # The finalizer is released only once the namespace is really gone.
    assert not exists(kubectl, "namespace", namespace)


def test_namespace_deleted_by_hand_is_recreated(operator: Process, kubectl: Kubectl) -> None:
    name = unique("recreate")
    kubectl.apply(make_env(name, 105))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    old_uid = kubectl.json("get", "namespace", namespace)["metadata"]["uid"]
    kubectl.run("delete", "namespace", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: (
            exists(kubectl, "namespace", namespace)
            and kubectl.json("get", "namespace", namespace)["metadata"]["uid"] != old_uid
        ),
        timeout=60,
        what="the namespace to be re-created",
    )
    st = wait_for(
        lambda: (s := status(kubectl, name)).get("phase") == "Ready" and "re-created" in s.get("message", "") and s,
        timeout=60,
        what="Ready with a message about the re-creation",
    )
    assert namespace in st["message"]
    assert exists(kubectl, "-n", namespace, "resourcequota", "ephemera-quota")


def test_foreign_namespace_collision_fails_and_leaves_it_alone(operator: Process, kubectl: Kubectl) -> None:
    name = unique("foreign")
    namespace = environment_name("octo-org/shop", 106)
    kubectl.run("create", "namespace", namespace)
    kubectl.run("label", "namespace", namespace, "team=payments")
    before = kubectl.json("get", "namespace", namespace)["metadata"]
    kubectl.apply(make_env(name, 106))
    st = wait_phase(kubectl, name, "Failed")
    assert "already exists and was not created by this PreviewEnvironment" in st["message"]
    assert st["permanent"] is True
    after = kubectl.json("get", "namespace", namespace)["metadata"]
    assert after["labels"] == before["labels"]
    assert after["resourceVersion"] == before["resourceVersion"]
    assert not exists(kubectl, "-n", namespace, "resourcequota", "ephemera-quota")
    # Deleting the environment leaves the foreign namespace in place too.
    kubectl.run("delete", "pe", name, "--wait=true", "--timeout=60s")
    assert kubectl.json("get", "namespace", namespace)["metadata"]["resourceVersion"] == before["resourceVersion"]
    kubectl.run("delete", "namespace", namespace, "--wait=false")


def test_impossible_spec_fails_with_a_message(operator: Process, kubectl: Kubectl) -> None:
    name = unique("ceiling")
    kubectl.apply(make_env(name, 107, resources={"cpu": "64"}))
    st = wait_phase(kubectl, name, "Failed")
    assert "spec.resources.cpu is 64, above the ceiling 8" in st["message"]
    assert st["reason"] == "QuotaAboveCeiling"
    assert not exists(kubectl, "namespace", environment_name("octo-org/shop", 107))
    # Fixing the spec brings it to Ready.
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"resources": {"cpu": "4"}}}))
    wait_phase(kubectl, name, "Ready")


def _children_of(kubectl: Kubectl, namespace: str) -> list[int]:
    return [
        len(kubectl.json("-n", namespace, "get", kind)["items"])
        for kind in ("resourcequotas", "limitranges", "networkpolicies")
    ]


def test_sigkill_mid_provision_converges_without_duplicates(operator: Process, kubectl: Kubectl) -> None:
    names = [unique("crash") for _ in range(20)]
    manifest = {"apiVersion": "v1", "kind": "List", "items": [make_env(n, 200 + i) for i, n in enumerate(names)]}
    kubectl.apply(manifest)
    # Kill as soon as the first one is under way, while the rest are queued or half done.
    wait_for(
        lambda: any(status(kubectl, n).get("phase") in ("Provisioning", "Ready") for n in names[:3]),
        timeout=60,
        interval=0.02,
        what="provisioning to start",
    )
    operator.restart()
    for n in names:
        wait_phase(kubectl, n, "Ready", timeout=120)
    for i in range(len(names)):
        namespace = environment_name("octo-org/shop", 200 + i)
        assert _children_of(kubectl, namespace) == [1, 1, 2]  # network policies: ingress and egress
    namespaces = kubectl.json("get", "namespaces", "-l", f"{MANAGED_BY_LABEL}=ephemera")["items"]
    # One namespace per object (other tests' namespaces, such as hand-made spoofs, do not count).
    owners = [
        ref["name"] for ns in namespaces for ref in ns["metadata"].get("ownerReferences", []) if ref["name"] in names
    ]
    assert sorted(owners) == sorted(names)


def test_fifty_objects_at_once_all_reach_ready(operator: Process, kubectl: Kubectl, tmp_path: Path) -> None:
    names = [unique("burst") for _ in range(50)]
    items = [make_env(n, 300 + i, repo="octo-org/burst") for i, n in enumerate(names)]
    kubectl.apply({"apiVersion": "v1", "kind": "List", "items": copy.deepcopy(items)})

    def all_ready() -> bool:
        listed = kubectl.json("get", "pe")["items"]
        phases = {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in listed}
        return all(phases.get(n) == "Ready" for n in names)

    wait_for(all_ready, timeout=180, interval=0.5, what="50 environments Ready")


def test_health_and_metrics(operator: Process, kubectl: Kubectl) -> None:
    import urllib.request

    name = unique("metrics")
    kubectl.apply(make_env(name, 108))
    wait_phase(kubectl, name, "Ready")

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{operator.port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def ready_gauge() -> float:
        found = re.search(r'ephemera_environments\{phase="Ready"\} (\S+)', metrics())
        return float(found.group(1)) if found else 0.0

    wait_for(lambda: ready_gauge() >= 1, timeout=30, what="the phase gauge to count Ready environments")
    text = metrics()
    assert 'ephemera_reconciles_total{handler="provision",outcome="success"}' in text
    assert "ephemera_time_to_ready_seconds_bucket" in text
    assert 'ephemera_transitions_total{phase="Ready"}' in text
    assert "ephemera_record_writes_total" in text


async def test_a_teardown_waiting_on_its_namespace_wakes_when_the_watch_sees_it_go() -> None:
    vanishing = Vanishing(remember=2)
    # Gone before anyone waits (the DELETED event came first): no wait at all.
    vanishing.gone("uid-early")
    assert await vanishing.wait("uid-early", within=0)
    # Gone while waited on: the waiter wakes at once, long before its bound.
    waiter = asyncio.create_task(vanishing.wait("uid-late", within=30))
    await asyncio.sleep(0)
    vanishing.gone("uid-late")
    assert await asyncio.wait_for(waiter, 5)
    # Never gone: the wait ends at its bound and says so (the handler then re-checks the API).
    assert not await vanishing.wait("uid-stuck", within=0.01)
    # Only the last `remember` uids are kept.
    vanishing.gone("uid-3")
    assert not await vanishing.wait("uid-early", within=0.01)


HOLD = "example.com/hold"


def get_pe(kubectl: Kubectl, name: str) -> dict[str, Any] | None:
    result = kubectl.run("get", "pe", name, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def progress(kubectl: Kubectl, name: str, handler: str) -> dict[str, Any]:
    """kopf's record of a handler's attempts on the object (retries, failure), kept in an annotation."""
    obj = get_pe(kubectl, name)
    assert obj is not None, f"{name} is gone"
    found: dict[str, Any] = json.loads((obj["metadata"].get("annotations") or {}).get(f"ephemera.dev/{handler}", "{}"))
    return found


def set_finalizers(kubectl: Kubectl, namespace: str, finalizers: list[str] | None) -> None:
    patch = json.dumps({"metadata": {"finalizers": finalizers}})
    kubectl.run("patch", "namespace", namespace, "--type=merge", "-p", patch)


def test_a_terminating_namespace_someone_else_made_is_waited_for(operator: Process, kubectl: Kubectl) -> None:
    """Not ours, but going: the name is free once it is gone, so the environment waits, then provisions."""
    name = unique("terminating")
    namespace = environment_name("octo-org/shop", 110)
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {"team": "x"}}})
    set_finalizers(kubectl, namespace, [HOLD])
    kubectl.run("delete", "namespace", namespace, "--wait=false")
    kubectl.apply(make_env(name, 110))

    def waiting() -> bool:
        assert status(kubectl, name).get("phase") != "Failed", status(kubectl, name)
        return int(progress(kubectl, name, "provision").get("retries") or 0) >= 1

    wait_for(waiting, timeout=60, what="a provision attempt that found the namespace terminating and waits")
    set_finalizers(kubectl, namespace, None)
    st = wait_phase(kubectl, name, "Ready", timeout=90)
    assert st["namespace"] == namespace
    ns = kubectl.json("get", "namespace", namespace)["metadata"]
    assert ns["annotations"][OWNER_UID_ANNOTATION] == kubectl.json("get", "pe", name)["metadata"]["uid"]
    kubectl.run("delete", "pe", name, "--wait=false")


def _refuse_status_writes(kubectl: Kubectl, name: str) -> str:
    """A ValidatingAdmissionPolicy that refuses every status write to one object: its teardown's
    first step (the Destroying status) fails until the policy goes."""
    policy = f"refuse-status-{name}"
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "ValidatingAdmissionPolicy",
                    "metadata": {"name": policy},
                    "spec": {
                        "failurePolicy": "Fail",
                        "matchConstraints": {
                            "resourceRules": [
                                {
                                    "apiGroups": ["ephemera.dev"],
                                    "apiVersions": ["*"],
                                    "operations": ["UPDATE"],
                                    "resources": ["previewenvironments/status"],
                                }
                            ]
                        },
                        "validations": [
                            {"expression": f"object.metadata.name != '{name}'", "message": "refused by the test"}
                        ],
                    },
                },
                {
                    "apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "ValidatingAdmissionPolicyBinding",
                    "metadata": {"name": policy},
                    "spec": {"policyName": policy, "validationActions": ["Deny"]},
                },
            ],
        }
    )
    probe = json.dumps({"status": {"message": "probe"}})
    wait_for(
        lambda: (
            kubectl.run(
                "patch", "pe", name, "--subresource=status", "--type=merge", "-p", probe, check=False
            ).returncode
            != 0
        ),
        timeout=30,
        what="the policy to refuse status writes",
    )
    return policy


def test_a_stale_failed_environment_keeps_its_finalizer_until_its_teardown_runs(
    operator: Process, kubectl: Kubectl
) -> None:
    """Deleted while Failed as Stale, its teardown failing at first: it is retried, never handed over
    to the retry job (which would let kopf release the finalizer and leave the namespace)."""
    name = unique("stale-delete")
    kubectl.apply(make_env(name, 111))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    stale = {
        "phase": "Failed",
        "reason": "Stale",
        "message": "Stuck in Updating (set by the test)",
        "permanent": False,
        "retries": 3,  # no automatic retry left: the retry job leaves it alone
        "failedAt": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    kubectl.run("patch", "pe", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": stale}))
    policy = _refuse_status_writes(kubectl, name)
    try:
        kubectl.run("delete", "pe", name, "--wait=false")
        wait_for(
            lambda: int(progress(kubectl, name, "destroy").get("retries") or 0) >= 2,
            timeout=60,
            what="the teardown to be retried (the object must keep its finalizer meanwhile)",
        )
        assert status(kubectl, name)["reason"] == "Stale"
        assert exists(kubectl, "namespace", namespace)
    finally:
        kubectl.run("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy, check=False)
    wait_for(lambda: not exists(kubectl, "pe", name), timeout=90, what="the teardown to finish once it can")
    assert not exists(kubectl, "namespace", namespace)


@pytest.fixture
def impatient_operator(operator: Process) -> Iterator[Process]:
    """The session's operator, restarted with a namespace delete timeout of 3 s."""
    operator.stop()
    env = {**operator.env, "EPHEMERA_NAMESPACE_DELETE_TIMEOUT": "3"}
    impatient = Process(operator.args, env, operator.log_path, operator.port).start()
    wait_for(lambda: http_ok(impatient, "/healthz"), timeout=60, what="operator /healthz")
    yield impatient
    impatient.stop()
    operator.start()
    wait_for(lambda: http_ok(operator, "/healthz"), timeout=60, what="operator /healthz")


def test_a_teardown_past_the_delete_timeout_says_what_holds_it(impatient_operator: Process, kubectl: Kubectl) -> None:
    name = unique("held")
    kubectl.apply(make_env(name, 112))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    set_finalizers(kubectl, namespace, [HOLD])
    kubectl.run("delete", "pe", name, "--wait=false")
    st = wait_for(
        lambda: (s := status(kubectl, name)).get("reason") == "DeletionStuck" and s,
        timeout=60,
        what="the teardown to report the stuck deletion",
    )
    assert "EPHEMERA_NAMESPACE_DELETE_TIMEOUT" in st["message"]
    assert namespace in st["message"]
    assert HOLD in st["message"]
    wait_for(lambda: "DeletionStuck" in events_of(kubectl, name), timeout=30, what="a DeletionStuck event")
    assert exists(kubectl, "pe", name)  # the teardown goes on waiting, holding the finalizer
    set_finalizers(kubectl, namespace, None)
    wait_for(lambda: not exists(kubectl, "pe", name), timeout=90, what="the object to go once released")
    assert not exists(kubectl, "namespace", namespace)


def test_an_environment_named_under_the_old_scheme_is_updated_and_torn_down(
    operator: Process, webhook: Process, kubectl: Kubectl
) -> None:
    """Made before the hash grew (object and namespace under the 8-hex name): a push reaches the same
    object, which keeps its namespace, and the close removes both; nothing under either name is left."""
    from tests.test_chart import paused
    from tests.test_webhook import pr_event

    repo, number = f"octo/legacy-{uuid.uuid4().hex[:6]}", 7
    legacy, current = legacy_environment_name(repo, number), environment_name(repo, number)
    assert legacy != current
    with paused(operator):
        # The object as the old webhook made it, and what the old operator made of it.
        opened = "2026-01-01T00:00:00Z"
        obj = make_env(legacy, number, repo=repo)
        obj["metadata"].update(
            labels=environment_labels(legacy, repo, number),
            annotations={UPDATED_AT: opened, DELIVERY: "legacy"},
            finalizers=[FINALIZER],
        )
        kubectl.apply(obj)
        body = kubectl.json("get", "pe", legacy)
        uid = body["metadata"]["uid"]
        # kopf's record of the last handled spec, as the old operator left it: no new handling at start.
        storage = kopf.AnnotationsDiffBaseStorage(prefix="ephemera.dev", key="last-handled-configuration")
        handled = kopf.Patch()
        storage.store(body=kopf.Body(body), patch=handled, essence=storage.build(body=kopf.Body(body)))
        kubectl.run("patch", "pe", legacy, "--type=merge", "-p", json.dumps(dict(handled)))
        spec = PreviewEnvironmentSpec.model_validate(obj["spec"])
        quota = children.resolve_quota(spec, Settings())
        made = [
            children.build_namespace(legacy, legacy, uid, spec),
            children.build_resource_quota(legacy, legacy, spec, quota),
            children.build_limit_range(legacy, legacy, spec, quota),
            children.build_network_policy(legacy, legacy, spec),
        ]
        for child in made:
            kubectl.apply(child)
        ready = {
            "phase": "Ready",
            "reason": "Ready",
            "message": f"Environment ready in namespace {legacy}",
            "namespace": legacy,
            "commit": SHA_A[:7],
            "observedGeneration": 1,
        }
        kubectl.run("patch", "pe", legacy, "--subresource=status", "--type=merge", "-p", json.dumps({"status": ready}))

    pushed = pr_event("synchronize", repo=repo, number=number, sha=SHA_B, updated_at="2026-01-02T00:00:00Z")
    answer = post_webhook(webhook.port, "pull_request", pushed, secret=WEBHOOK_SECRET)
    assert (answer.status, answer.body.get("result"), answer.body.get("name")) == (202, "updated", legacy), answer
    st = wait_for(
        lambda: (s := status(kubectl, legacy)).get("phase") == "Ready" and s.get("commit") == SHA_B[:7] and s,
        timeout=60,
        what="Ready at the pushed commit",
    )
    assert st["namespace"] == legacy
    assert not exists(kubectl, "pe", current)
    assert not exists(kubectl, "namespace", current)

    closed = pr_event("closed", repo=repo, number=number, sha=SHA_B, updated_at="2026-01-03T00:00:00Z")
    answer = post_webhook(webhook.port, "pull_request", closed, secret=WEBHOOK_SECRET)
    assert (answer.status, answer.body.get("result")) == (202, "deleted"), answer
    wait_for(lambda: not exists(kubectl, "pe", legacy), timeout=90, what="the old environment to be torn down")
    for name in (legacy, current):
        assert not exists(kubectl, "namespace", name)
        assert not exists(kubectl, "pe", name)
