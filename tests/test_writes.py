"""What the operator writes to a PreviewEnvironment, counted write by write (issue 19 part 1): a new
environment's Ready rides in kopf's own patch with its record of the handled spec, a step that is
over at once (Provisioning, Updating) is announced but not written, and objects an older operator
handled (its record in an annotation) are not taken for new ones."""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from typing import Any

import kopf
import kubernetes
import pytest
import urllib3

from devtools.fakegithub import FakeGitHub
from devtools.postgres import Postgres
from devtools.support import Kubectl, Process, wait_for
from ephemera import children
from ephemera.api.models import GROUP, PLURAL, VERSION, PreviewEnvironmentSpec
from ephemera.api.naming import FINALIZER, environment_name
from ephemera.config import Settings
from ephemera.kube import Kube
from tests.test_chart import paused
from tests.test_github import reported
from tests.test_operator import (
    HOLD,
    SHA_A,
    SHA_B,
    events_of,
    make_env,
    progress,
    set_finalizers,
    status,
    wait_phase,
)
from tests.test_records import phases

INSTALLATION = 4242
LEGACY_DIFFBASE = "ephemera.dev/last-handled-configuration"


class Versions:
    """Every version of one PreviewEnvironment the API server stores from now on, in order: a watch
    from a listing's resourceVersion, so that none is missed however late the watch connects."""

    def __init__(self, kube: Kube, name: str) -> None:
        self.api = kubernetes.client.CustomObjectsApi(kube.api_client)
        self.selector = f"metadata.name={name}"
        listed = self.api.list_cluster_custom_object(GROUP, VERSION, PLURAL, field_selector=self.selector)
        self.since = listed["metadata"]["resourceVersion"]
        self.bodies: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        watch = kubernetes.watch.Watch()
        with contextlib.suppress(urllib3.exceptions.HTTPError):  # the control plane goes at the session's end
            self._follow(watch)

    def _follow(self, watch: kubernetes.watch.Watch) -> None:
        for event in watch.stream(
            self.api.list_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            field_selector=self.selector,
            resource_version=self.since,
            timeout_seconds=300,
        ):
            self.bodies.append(event["object"])
            if self._stop.is_set():
                watch.stop()

    def stop(self) -> None:
        self._stop.set()

    def phases(self) -> list[str | None]:
        return [(body.get("status") or {}).get("phase") for body in self.bodies]


def new_env(name: str, pr: int, repo: str, **spec: Any) -> dict[str, Any]:
    """An object as the webhook makes it: with the operator's finalizer from birth (no finalizer patch)."""
    obj = make_env(name, pr, repo=repo, **spec)
    obj["metadata"]["finalizers"] = [FINALIZER]
    return obj


def diffbase(body: dict[str, Any]) -> dict[str, Any] | None:
    """kopf's record of the last handled spec, where this operator keeps it (status.kopf)."""
    found = ((body.get("status") or {}).get("kopf") or {}).get("last-handled-configuration")
    return json.loads(found) if found else None


def moved(body: dict[str, Any]) -> bool:
    """Whether the older operator's record of the handled spec moved to status.kopf, at the push's commit."""
    gone = LEGACY_DIFFBASE not in (body["metadata"].get("annotations") or {})
    return gone and (diffbase(body) or {}).get("spec", {}).get("commitSha") == SHA_B


def test_a_new_environment_costs_one_write_to_ready_and_one_per_report(
    operator: Process, kubectl: Kubectl, kube: Kube, github: FakeGitHub, postgres: Postgres
) -> None:
    repo, name = f"octo/writes-{uuid.uuid4().hex[:6]}", f"writes-{uuid.uuid4().hex[:6]}"
    versions = Versions(kube, name)
    try:
        kube.create_environment(new_env(name, 1, repo, installationId=INSTALLATION))
        wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="reports")
        # The create, then Ready with kopf's record in one status write, then the report's record.
        wait_for(lambda: len(versions.bodies) >= 3, timeout=30, what="the three versions")
        assert versions.phases() == [None, "Ready", "Ready"], versions.phases()
        created, ready, recorded = versions.bodies
        assert (diffbase(ready) or {}).get("spec") == created["spec"]
        assert ready["metadata"].get("annotations", {}) == created["metadata"].get("annotations", {})
        assert (ready["metadata"]["generation"], ready["status"]["observedGeneration"]) == (1, 1)
        assert ready["status"]["lastActivityAt"]  # the lifecycle policy's stamp of the step, written with Ready
        assert "reported" not in ready["status"]
        assert recorded["status"]["reported"]["comment"] == f"Ready@{SHA_A}"

        # A push: the spec change, then Ready at the new commit with the new record (Updating is not written).
        kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
        wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_B}", timeout=60, what="reports")
        wait_for(lambda: len(versions.bodies) >= 6, timeout=30, what="the three versions of the push")
        assert versions.phases()[3:] == ["Ready", "Ready", "Ready"], versions.phases()
        pushed, updated = versions.bodies[3], versions.bodies[4]
        assert (pushed["metadata"]["generation"], pushed["status"]["observedGeneration"]) == (2, 1)
        assert (updated["status"]["commit"], updated["status"]["observedGeneration"]) == (SHA_B[:7], 2)
        assert (diffbase(updated) or {}).get("spec", {}).get("commitSha") == SHA_B
    finally:
        versions.stop()
    # The steps that were not written are announced all the same: the records hold every phase.
    wait_for(
        lambda: phases(postgres.url, name) == ["Provisioning", "Ready", "Updating", "Ready"],
        timeout=30,
        what="the records of every phase",
    )
    kubectl.run("delete", "pe", name, "--wait=false")


def test_a_provision_that_waits_says_provisioning_meanwhile(operator: Process, kubectl: Kubectl) -> None:
    """A step is only skipped when Ready follows at once: while kopf retries, the status says where it is."""
    name, pr = f"writes-wait-{uuid.uuid4().hex[:6]}", 120
    namespace = environment_name("octo-org/shop", pr)
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    set_finalizers(kubectl, namespace, [HOLD])
    kubectl.run("delete", "namespace", namespace, "--wait=false")
    try:
        kubectl.apply(make_env(name, pr))
        wait_for(
            lambda: int(progress(kubectl, name, "provision").get("retries") or 0) >= 1,
            timeout=60,
            what="a provision attempt that waits for the terminating namespace",
        )
        st = status(kubectl, name)
        assert (st.get("phase"), st.get("reason")) == ("Provisioning", "Provisioning"), st
    finally:
        set_finalizers(kubectl, namespace, None)
    wait_phase(kubectl, name, "Ready", timeout=90)
    kubectl.run("delete", "pe", name, "--wait=false")


@pytest.mark.parametrize("pushed", ["after the start", "while the operator was down"])
def test_an_environment_an_older_operator_handled_is_not_provisioned_again(
    pushed: str, operator: Process, kubectl: Kubectl, kube: Kube
) -> None:
    """Its record of the handled spec in an annotation, as operators before status.kopf left it: after
    the upgrade nothing is written to it until its spec changes, and then the record moves.

    A push while the operator was down is an update at its first sight of the object, where kopf runs
    the resume handler too: the update's Ready is written with its progress, and the record moves in a
    last patch of two requests (the annotation's removal, then the status): it is waited for whole."""
    repo, pr = f"octo/upgrade-{uuid.uuid4().hex[:6]}", 3
    name, namespace = f"writes-old-{uuid.uuid4().hex[:6]}", environment_name(repo, pr)
    with paused(operator):
        kube.create_environment(new_env(name, pr, repo))
        body = kopf.Body(kubectl.json("get", "pe", name))
        # What the older operator wrote: the essence without its own prefix's annotations, and its marker.
        storage = kopf.AnnotationsDiffBaseStorage(prefix="ephemera.dev", key="last-handled-configuration")
        essence = kopf.AnnotationsProgressStorage(prefix="ephemera.dev").clear(essence=storage.build(body=body))
        handled = kopf.Patch()
        storage.store(body=body, patch=handled, essence=essence)
        kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps(dict(handled)))
        uid = body["metadata"]["uid"]
        spec = PreviewEnvironmentSpec.model_validate(body["spec"])
        quota = children.resolve_quota(spec, Settings())
        for child in (
            children.build_namespace(namespace, name, uid, spec),
            children.build_resource_quota(namespace, name, spec, quota),
            children.build_limit_range(namespace, name, spec, quota),
            children.build_network_policy(namespace, name, spec),
            children.build_egress_policy(namespace, name, spec, Settings()),
        ):
            kubectl.apply(child)
        ready: dict[str, Any] = {"phase": "Ready", "reason": "Ready", "message": "ready", "namespace": namespace}
        ready |= {"commit": SHA_A[:7], "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}
        kubectl.run("patch", "pe", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": ready}))
        versions = Versions(kube, name)
        push = {"spec": {"commitSha": SHA_B}}
        if pushed == "while the operator was down":
            kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps(push))
    try:
        if pushed == "after the start":
            # Whatever the operator does with the object after its start, it does before it handles the push.
            kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps(push))
        wait_for(lambda: status(kubectl, name).get("commit") == SHA_B[:7], timeout=60, what="Ready at the push")
        wait_for(lambda: moved(versions.bodies[-1]), timeout=30, what="the older operator's record moved")
        # Handled as the push it is (an update, which says Updating), not as a new object.
        wait_for(lambda: "Updating" in events_of(kubectl, name), timeout=30, what="an Updating event")
        # Before the push, nothing the handlers write (the lifecycle policy may stamp its expiry).
        for version in versions.bodies:
            if version["metadata"]["generation"] == 1:
                st = version["status"]
                assert (st["message"], st["lastTransitionTime"]) == ("ready", "2026-01-01T00:00:00Z"), st
                assert "kopf" not in st, st
        assert "Provisioning" not in versions.phases(), versions.phases()
        last = versions.bodies[-1]
        assert (last["status"]["phase"], last["status"]["observedGeneration"]) == ("Ready", 2)
        assert moved(last)
        assert last["status"]["namespace"] == namespace
    finally:
        versions.stop()
    kubectl.run("delete", "pe", name, "--wait=false")
