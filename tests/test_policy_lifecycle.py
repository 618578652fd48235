"""The lifecycle policy on the real API server: expiry (TTL, keep, extend, push and wake revive it) and
the caps (a queue per repository, priority first, provisions in flight), with the operator run with
a TTL and caps of a few seconds and objects."""

from __future__ import annotations

import datetime
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import ControlPlane
from devtools.fakegithub import FakeGitHub
from devtools.postgres import Postgres
from devtools.support import Kubectl, Process, fixture_payload, post_webhook, process_env, wait_for
from ephemera.admission import Limits, plan
from ephemera.api.naming import (
    EXPIRES_AT_ANNOTATION,
    KEEP_ANNOTATION,
    KEEP_LABEL_ANNOTATION,
    PRIORITY_LABEL,
    WAKE_ANNOTATION,
    environment_name,
)
from ephemera.kube import Kube
from ephemera.ledger import Counts, Entry, Ledger
from tests.conftest import WEBHOOK_SECRET, http_ok
from tests.test_backstop import cli
from tests.test_github import comments
from tests.test_operator import SHA_B, exists, make_env, status, wait_phase
from tests.test_plugin import plugin

TTL = 6
PER_REPOSITORY = 2
IN_FLIGHT = 2
POLICY = {
    "EPHEMERA_POLICY_TTL": str(TTL),
    "EPHEMERA_POLICY_INTERVAL": "1",
    "EPHEMERA_POLICY_MAX_ENVIRONMENTS_PER_REPOSITORY": str(PER_REPOSITORY),
    "EPHEMERA_POLICY_MAX_PROVISIONS_IN_FLIGHT": str(IN_FLIGHT),
}
INSTALLATION = 4242
KEEP = {KEEP_ANNOTATION: "true"}  # the cap tests' objects must not expire meanwhile


@pytest.fixture(scope="module")
def policy_operator(operator: Process) -> Iterator[Process]:
    """The session's operator, restarted with a TTL of seconds and small caps."""
    operator.stop()
    proc = Process(operator.args, {**operator.env, **POLICY}, operator.log_path, operator.port).start()
    wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="operator /healthz")
    yield proc
    proc.stop()
    operator.start()
    wait_for(lambda: http_ok(operator, "/healthz"), timeout=60, what="operator /healthz")


@pytest.fixture(scope="module")
def github_webhook(
    crd: Path, control_plane: ControlPlane, github: FakeGitHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """`ephemera webhook` as the App's: it asks the local GitHub who may write."""
    tmp = tmp_path_factory.mktemp("policy-webhook")
    env = process_env(
        control_plane.kubeconfig,
        tmp,
        EPHEMERA_WEBHOOK_SECRET=WEBHOOK_SECRET,
        EPHEMERA_GITHUB_API_URL=github.url(""),
        EPHEMERA_GITHUB_APP_ID=str(github.app_id),
        EPHEMERA_GITHUB_PRIVATE_KEY=github.private_key_pem,
    )
    proc = Process(["webhook"], env, tmp / "webhook.log", int(env["EPHEMERA_WEBHOOK_PORT"])).start()
    wait_for(lambda: http_ok(proc, "/readyz"), timeout=60, what="webhook /readyz")
    yield proc
    proc.stop()


def repo_name(prefix: str) -> str:
    return f"octo/{prefix}-{uuid.uuid4().hex[:6]}"


def environment(
    name: str,
    pr: int,
    repo: str,
    *,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    body = make_env(name, pr, repo=repo, installationId=INSTALLATION)
    body["metadata"].update(annotations=annotations or {}, labels=labels or {})
    return body


def obj(kubectl: Kubectl, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.json("get", "pe", name)
    return found


def comment_text(github: FakeGitHub, repo: str, pr: int) -> str:
    return "\n".join(str(c.get("body")) for c in comments(github, repo, pr))


# Expiry -------------------------------------------------------------------------------------------


def test_an_idle_environment_expires_and_a_push_revives_it(
    policy_operator: Process, kubectl: Kubectl, github: FakeGitHub, control_plane: ControlPlane, postgres: Postgres
) -> None:
    repo, name = repo_name("ttl"), f"ttl-{uuid.uuid4().hex[:6]}"
    kubectl.apply(environment(name, 1, repo))
    ready = wait_phase(kubectl, name, "Ready")
    namespace = ready["namespace"]
    # The TTL counts from the first commit's provision: status.expiresAt says when.
    activity = datetime.datetime.fromisoformat(ready["lastActivityAt"])
    expires = datetime.datetime.fromisoformat(ready["expiresAt"])
    assert (expires - activity).total_seconds() == TTL

    expired = wait_phase(kubectl, name, "Expired", timeout=60)
    assert expired["reason"] == "Idle"
    assert expired["expiresAt"] == ready["expiresAt"]
    assert "/preview wake" in expired["message"]
    wait_for(lambda: not exists(kubectl, "namespace", namespace), timeout=60, what="the namespace to go")
    assert exists(kubectl, "pe", name)  # the object stays, so the PR keeps its place
    # The PR says so, and how to bring it back.
    wait_for(lambda: "Expired" in comment_text(github, repo, 1), timeout=30, what="the Expired comment")
    assert "push a commit, or comment `/preview wake`" in comment_text(github, repo, 1)
    # Both listings show it.
    listed = plugin(control_plane, "list", "--repository", repo)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert row.split()[3] == "Expired"
    assert f"expired {ready['expiresAt']}" in row
    env = {"EPHEMERA_DATABASE_URL": postgres.url, "KUBECONFIG": str(control_plane.kubeconfig)}
    wait_for(
        lambda: any(
            r["name"] == name and r["phase"] == "Expired" and r["policy"].startswith("expired")
            for r in json.loads(cli(env, "environments", "list", "-o", "json").stdout or "[]")
        ),
        timeout=30,
        what="the Expired record",
    )

    # A push brings it back: a namespace again, and the TTL counts from the push.
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    revived = wait_phase(kubectl, name, "Ready", timeout=60)
    assert revived["commit"] == SHA_B[:7]
    assert revived["lastActivityAt"] > ready["lastActivityAt"]
    assert revived["expiresAt"] > ready["expiresAt"]
    assert exists(kubectl, "namespace", namespace)


def test_keep_and_extend_hold_off_the_expiry(policy_operator: Process, kubectl: Kubectl) -> None:
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).replace(microsecond=0)
    extended_to = later.isoformat().replace("+00:00", "Z")
    names = {kind: f"{kind}-{uuid.uuid4().hex[:6]}" for kind in ("label", "annotation", "extended", "template", "idle")}
    # One repository each: the cap of two per repository stays out of the way.
    kubectl.apply(environment(names["label"], 1, repo_name("keep"), annotations={KEEP_LABEL_ANNOTATION: "true"}))
    kubectl.apply(environment(names["annotation"], 2, repo_name("keep"), annotations=KEEP))
    kubectl.apply(
        environment(names["extended"], 3, repo_name("keep"), annotations={EXPIRES_AT_ANNOTATION: extended_to})
    )
    # A repository whose PreviewTemplate says its previews never expire (policy.ttlSeconds: 0).
    template, forever = f"forever-{uuid.uuid4().hex[:6]}", repo_name("forever")
    kubectl.apply(
        {
            "apiVersion": "ephemera.dev/v1alpha1",
            "kind": "PreviewTemplate",
            "metadata": {"name": template},
            "spec": {"repositories": [forever], "policy": {"ttlSeconds": 0}},
        }
    )
    kubectl.apply(environment(names["template"], 4, forever))
    kinds = ("label", "annotation", "extended", "template")
    pinned = {kind: wait_phase(kubectl, names[kind], "Ready") for kind in kinds}
    # An idle one made after them: by the round that expires it, the others were past their TTL too.
    kubectl.apply(environment(names["idle"], 5, repo_name("keep")))
    idle = wait_phase(kubectl, names["idle"], "Ready")
    assert all(st["lastActivityAt"] <= idle["lastActivityAt"] for st in pinned.values())
    wait_phase(kubectl, names["idle"], "Expired", timeout=60)
    for kind in ("label", "annotation", "template"):
        st = status(kubectl, names[kind])
        assert st["phase"] == "Ready", kind
        assert "expiresAt" not in st, kind  # kept, or no TTL: no expiry to show
    kubectl.run("delete", "previewtemplate", template)
    st = wait_for(
        lambda: (s := status(kubectl, names["extended"])).get("expiresAt") == extended_to and s,
        timeout=30,
        what="the extension in status.expiresAt",
    )
    assert st["phase"] == "Ready"

    # Unpinned, it expires like any other.
    kubectl.run("annotate", "pe", names["annotation"], f"{KEEP_ANNOTATION}-")
    wait_phase(kubectl, names["annotation"], "Expired", timeout=60)


def comment_event(repo: str, pr: int, login: str, body: str, created_at: str) -> dict[str, Any]:
    """GitHub's issue_comment example, re-aimed at a PR of `repo` and a commenter."""
    event = fixture_payload("issue_comment", "created.with-installation.payload.json")
    event["repository"]["full_name"] = repo
    event["issue"]["number"] = pr
    event["issue"]["pull_request"] = {"url": f"https://api.github.com/repos/{repo}/pulls/{pr}"}
    event["comment"].update(body=body, created_at=created_at)
    event["comment"]["user"]["login"] = login
    event["installation"]["id"] = INSTALLATION
    return event


def test_wake_by_a_writer_revives_and_by_anyone_else_changes_nothing(
    policy_operator: Process, github_webhook: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repo = repo_name("wake")
    name = environment_name(repo, 5)  # the webhook finds the PR's object by its name
    kubectl.apply(environment(name, 5, repo))
    wait_phase(kubectl, name, "Expired", timeout=60)
    github.collaborator(repo, "writer", "write")
    github.collaborator(repo, "reader", "triage")

    def send(login: str, body: str, created_at: str) -> dict[str, Any]:
        answer = post_webhook(
            github_webhook.port, "issue_comment", comment_event(repo, 5, login, body, created_at), secret=WEBHOOK_SECRET
        )
        assert answer.status == 202, answer.body
        return answer.body

    refused = send("reader", "/preview wake", "2026-01-01T00:00:01Z")
    assert refused["result"] == "ignored"
    assert "no write access" in refused["reason"]
    chatter = send("writer", "Looks good to me", "2026-01-01T00:00:02Z")
    assert chatter["result"] == "ignored"
    assert "not a command" in chatter["reason"]
    forged = post_webhook(
        github_webhook.port,
        "issue_comment",
        comment_event(repo, 5, "writer", "/preview wake", "2026-01-01T00:00:03Z"),
        secret="not-the-secret-at-all",
    )
    assert forged.status == 401
    malformed = comment_event(repo, 5, "writer", "/preview wake", "2026-01-01T00:00:03Z")
    del malformed["comment"]["user"]
    refused_body = post_webhook(github_webhook.port, "issue_comment", malformed, secret=WEBHOOK_SECRET)
    assert refused_body.status == 422
    assert refused_body.body["error"] == "invalid issue_comment event"
    assert "comment.user" in refused_body.body["detail"]
    assert WAKE_ANNOTATION not in (obj(kubectl, name)["metadata"].get("annotations") or {})
    assert status(kubectl, name)["phase"] == "Expired"

    woken = send("writer", "/preview wake", "2026-01-01T00:00:04Z")
    assert woken == {"result": "updated", "name": name, "reason": "wake requested by writer"}
    st = wait_phase(kubectl, name, "Ready", timeout=60)
    assert st["wakeRequest"] == "2026-01-01T00:00:04Z"
    assert exists(kubectl, "namespace", st["namespace"])
    # The same delivery again (GitHub's redelivery) is not a second wake.
    again = send("writer", "/preview wake", "2026-01-01T00:00:04Z")
    assert again["result"] == "ignored"


# Caps and fairness --------------------------------------------------------------------------------


def test_the_cap_queues_the_third_pr_and_admits_in_order_across_a_restart(
    policy_operator: Process, kubectl: Kubectl, github: FakeGitHub, control_plane: ControlPlane
) -> None:
    repo = repo_name("cap")
    names = [f"cap{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    for pr, name in enumerate(names[:2], 1):
        kubectl.apply(environment(name, pr, repo, annotations=KEEP))
    for name in names[:2]:
        wait_phase(kubectl, name, "Ready")
    kubectl.apply(environment(names[2], 3, repo, annotations=KEEP))
    third = wait_phase(kubectl, names[2], "Queued")
    assert third["reason"] == "RepositoryLimit"
    assert third["queuePosition"] == 1
    assert "namespace" not in third
    assert not exists(kubectl, "namespace", environment_name(repo, 3))
    kubectl.apply(environment(names[3], 4, repo, annotations=KEEP))
    assert wait_phase(kubectl, names[3], "Queued")["queuePosition"] == 2
    # The PR shows its place.
    wait_for(
        lambda: "Position in the queue:** 2" in comment_text(github, repo, 4), timeout=30, what="the queue comment"
    )
    listed = plugin(control_plane, "list", "--repository", repo).stdout
    assert "queued #1" in next(line for line in listed.splitlines() if line.startswith(names[2]))

    # The queue is the objects: a restarted operator finds it as it was.
    policy_operator.stop()
    policy_operator.start()
    wait_for(lambda: http_ok(policy_operator, "/healthz"), timeout=60, what="operator /healthz")

    kubectl.run("delete", "pe", names[0], "--wait=false")
    wait_phase(kubectl, names[2], "Ready", timeout=60)
    fourth = wait_for(
        lambda: (s := status(kubectl, names[3])).get("queuePosition") == 1 and s,
        timeout=30,
        what="the fourth PR to move up",
    )
    assert fourth["phase"] == "Queued"
    # An update of a live environment is never held back by the cap.
    kubectl.run("patch", "pe", names[1], "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    assert wait_for(lambda: status(kubectl, names[1]).get("commit") == SHA_B[:7], timeout=60, what="the update")
    assert status(kubectl, names[3])["phase"] == "Queued"

    kubectl.run("delete", "pe", names[1], "--wait=false")
    wait_phase(kubectl, names[3], "Ready", timeout=60)


def test_a_priority_pr_goes_ahead_of_the_queue(policy_operator: Process, kubectl: Kubectl) -> None:
    repo = repo_name("prio")
    names = [f"prio{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    for pr, name in enumerate(names[:2], 1):
        kubectl.apply(environment(name, pr, repo, annotations=KEEP))
    for name in names[:2]:
        wait_phase(kubectl, name, "Ready")
    kubectl.apply(environment(names[2], 3, repo, annotations=KEEP))
    wait_phase(kubectl, names[2], "Queued")
    kubectl.apply(environment(names[3], 4, repo, annotations=KEEP, labels={PRIORITY_LABEL: "true"}))
    assert wait_phase(kubectl, names[3], "Queued")["queuePosition"] == 1
    wait_for(lambda: status(kubectl, names[2]).get("queuePosition") == 2, timeout=30, what="the first to move back")

    kubectl.run("delete", "pe", names[0], "--wait=false")
    wait_phase(kubectl, names[3], "Ready", timeout=60)
    assert status(kubectl, names[2])["phase"] == "Queued"


class PhaseWatch:
    """Every status change of PreviewEnvironments, as the API server orders them: the most objects
    ever in Provisioning at once, and every (name, phase, reason) seen."""

    def __init__(self, kube: Kube, names: set[str]) -> None:
        self.kube = kube
        self.names = names
        self.phases: dict[str, str] = {}
        self.seen: set[tuple[str, str, str]] = set()
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import kubernetes

        api = kubernetes.client.CustomObjectsApi(self.kube.api_client)
        watch = kubernetes.watch.Watch()
        for event in watch.stream(
            api.list_cluster_custom_object, "ephemera.dev", "v1alpha1", "previewenvironments", timeout_seconds=120
        ):
            body = event["object"]
            name = body["metadata"]["name"]
            if name in self.names:
                st = body.get("status") or {}
                self.phases[name] = str(st.get("phase"))
                self.seen.add((name, str(st.get("phase")), str(st.get("reason"))))
                self.most = max(self.most, sum(1 for p in self.phases.values() if p == "Provisioning"))
            if self._stop.is_set():
                watch.stop()

    def __enter__(self) -> PhaseWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()


def test_provisions_in_flight_never_exceed_the_cap(policy_operator: Process, kubectl: Kubectl, kube: Kube) -> None:
    names = [f"burst{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    burst = {
        "apiVersion": "v1",
        "kind": "List",
        # One repository each: only the cap on provisions in flight applies.
        "items": [environment(name, 1, repo_name("burst"), annotations=KEEP) for name in names],
    }
    with PhaseWatch(kube, set(names)) as watched:
        kubectl.apply(burst)
        wait_for(lambda: all(watched.phases.get(name) == "Ready" for name in names), timeout=120, what="all six Ready")
    assert watched.most <= IN_FLIGHT, f"{watched.most} provisions in flight at once"
    assert any(phase == "Queued" and reason == "ProvisionsInFlight" for _, phase, reason in watched.seen)


# The decision itself, without a cluster ------------------------------------------------------------


def entry(name: str, repository: str = "octo/a", *, created: str = "2026-01-01T00:00:00Z", **fields: Any) -> Entry:
    return Entry(name=name, uid=name, phase="Queued", repository=repository, created=created, **fields)


def test_plan_passes_over_a_full_repository_and_stops_at_the_cluster_cap() -> None:
    waiting = sorted(
        [
            entry("a1", "octo/a"),
            entry("b1", "octo/b", created="2026-01-01T00:00:01Z"),
            entry("b2", "octo/b", created="2026-01-01T00:00:02Z"),
            entry("c1", "octo/c", created="2026-01-01T00:00:03Z", priority=True),
        ],
        key=Entry.order,
    )
    assert [e.name for e in waiting] == ["c1", "a1", "b1", "b2"]
    counts = Counts(live=3, by_repository={"octo/a": 2, "octo/c": 1}, in_flight=0)
    admitted, holds = plan(waiting, counts, Limits(total=5, per_repository=2))
    assert admitted == ["c1", "b1"]  # a1's repository is full; the cluster is full after b1
    assert holds["a1"].reason == "RepositoryLimit"
    assert holds["b2"].reason == "ClusterLimit"
    assert plan(waiting, Counts(0, {}, 3), Limits(in_flight=3))[0] == []
    assert plan(waiting, Counts(0, {}, 0), Limits())[0] == ["c1", "a1", "b1", "b2"]  # 0: no limit


def test_a_listing_drops_what_the_watch_never_said_was_gone() -> None:
    ledger = Ledger()

    def body(name: str, phase: str) -> dict[str, Any]:
        meta = {"name": name, "uid": name, "creationTimestamp": "2026-01-01T00:00:00Z"}
        return {"metadata": meta, "spec": {"repository": "octo/a"}, "status": {"phase": phase}}

    ledger.prime([body("gone", "Ready"), body("kept", "Ready")])
    started = time.monotonic()
    ledger.observe("ADDED", body("new", "Provisioning"))  # seen after the listing began
    assert ledger.resync([body("kept", "Ready")], started) == 1
    assert sorted(e.name for e in ledger.entries()) == ["kept", "new"]
    assert ledger.counts().live == 2
