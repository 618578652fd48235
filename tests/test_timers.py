"""Cleanup and retries as periodic jobs, with intervals shortened to seconds, on the real control plane."""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import REPO_ROOT, ControlPlane
from devtools.postgres import Postgres
from devtools.support import Kubectl, Process, wait_for
from ephemera.api.naming import (
    MANAGED_BY_LABEL,
    OWNER_UID_ANNOTATION,
    REPOSITORY_ANNOTATION,
    environment_labels,
    environment_name,
    legacy_environment_name,
)
from ephemera.children import owner_reference
from ephemera.config import Settings
from ephemera.environments import Environments
from ephemera.kube import METADATA, Kube
from ephemera.operator.jobs import is_active
from ephemera.retries import retry_due_ones
from ephemera.sweeps import Sweeper, made_by_ephemera
from ephemera.transitions import Transitions
from tests.conftest import http_ok, operator_with
from tests.test_operator import SHA_B, events_of, exists, make_env, status, wait_phase
from tests.test_records import history

HOLD = "example.com/hold"
SHORT = {
    "EPHEMERA_STALE_THRESHOLD": "4",
    "EPHEMERA_SWEEP_INTERVAL": "1",
    "EPHEMERA_RETRY_BACKOFF": "1",
    "EPHEMERA_RETRY_MAX_ATTEMPTS": "3",
    "EPHEMERA_RETRY_WINDOW": "300",
    "EPHEMERA_PURGE_INTERVAL": "1",
    "EPHEMERA_RECORD_RETENTION": "3",
}


@pytest.fixture(scope="module")
def fast_operator(operator: Process) -> Iterator[Process]:
    """The session's operator, restarted with every interval and threshold in seconds."""
    yield from operator_with(operator, SHORT)


@pytest.fixture
def soft_limited(fast_operator: Process) -> Iterator[Process]:
    """The module's operator with a soft time limit of 2 s and the stale threshold out of reach: the
    Warning comes from a handler's try past the limit, and a stale sweep before the first such try
    would fail the provision unwarned (at 4 s it came 1.7 s after it)."""
    yield from operator_with(fast_operator, {"EPHEMERA_SOFT_TIME_LIMIT": "2", "EPHEMERA_STALE_THRESHOLD": "600"})


def stays(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Assert that `check` holds throughout `seconds` (the observation window of a cap)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.2)


def hold_namespace(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("patch", "namespace", namespace, "--type=merge", "-p", json.dumps({"metadata": {"finalizers": [HOLD]}}))


def release_namespace(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("patch", "namespace", namespace, "--type=merge", "-p", json.dumps({"metadata": {"finalizers": None}}))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _terminating_update(kubectl: Kubectl, name: str, pr: int) -> str:
    """An Updating environment that cannot finish: its namespace is held in Terminating."""
    kubectl.apply(make_env(name, pr, repo="octo/timers"))
    namespace: str = wait_phase(kubectl, name, "Ready")["namespace"]
    hold_namespace(kubectl, namespace)
    kubectl.run("delete", "namespace", namespace, "--wait=false")
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    return namespace


def test_stale_update_fails_then_retry_succeeds_once_the_cause_is_gone(
    fast_operator: Process, kubectl: Kubectl
) -> None:
    name = unique("stale")
    namespace = _terminating_update(kubectl, name, 501)
    held = kubectl.json("get", "namespace", namespace)["metadata"]["uid"]
    failed = wait_for(
        lambda: (s := status(kubectl, name)).get("phase") == "Failed" and s.get("retries") and s,
        timeout=60,
        what="Failed as stale, then an automatic retry counted",
    )
    # Released at once: each retry against the held namespace fails at its first try, a retry job round
    # (1 s) apart, and the third is the last (EPHEMERA_RETRY_MAX_ATTEMPTS); what else is asserted of the
    # failure is read after.
    release_namespace(kubectl, namespace)
    assert failed["permanent"] is False
    wait_for(lambda: "Stale" in events_of(kubectl, name), timeout=30, what="a Stale event")
    # The next retry re-creates the namespace under its name as soon as the old one is gone (0.4 s later
    # in a run that failed here, between two polls of its absence): the new one is told by its uid.
    st = wait_for(
        lambda: (s := status(kubectl, name)).get("phase") == "Ready" and s.get("commit") == SHA_B[:7] and s,
        timeout=60,
        what="Ready at the new commit once the namespace was released",
    )
    assert st["namespace"] == namespace
    fresh = kubectl.json("get", "namespace", namespace)["metadata"]
    assert fresh["uid"] != held, "Ready while the old namespace was still there"
    assert not fresh.get("deletionTimestamp")


def _handler_lines(operator: Process, name: str, text: str) -> int:
    return sum(1 for line in operator.log().splitlines() if name in line and text in line)


def test_a_slow_provision_is_warned_once_past_the_soft_time_limit(soft_limited: Process, kubectl: Kubectl) -> None:
    name = unique("soft")
    namespace = _terminating_update(kubectl, name, 507)
    try:
        wait_for(lambda: "SoftTimeLimit" in events_of(kubectl, name), timeout=30, what="the soft limit's Warning")
        tries = _handler_lines(soft_limited, name, "failed temporarily")
        wait_for(
            lambda: _handler_lines(soft_limited, name, "failed temporarily") >= tries + 2,
            timeout=30,
            what="two more tries past the limit",
        )
        assert _handler_lines(soft_limited, name, "(soft time limit)") == 1
        assert status(kubectl, name)["phase"] == "Updating"  # warned, and still at it
    finally:
        release_namespace(kubectl, namespace)
    wait_phase(kubectl, name, "Ready", timeout=60)
    kubectl.run("delete", "pe", name, "--wait=false")


def test_retries_stop_at_the_cap(fast_operator: Process, kubectl: Kubectl) -> None:
    name = unique("cap")
    namespace = _terminating_update(kubectl, name, 502)
    wait_for(
        lambda: status(kubectl, name).get("retries") == 3 and status(kubectl, name).get("phase") == "Failed",
        timeout=90,
        what="three automatic retries",
    )
    # Past the next backoff (8 s at attempt 3) nothing more is tried.
    stays(lambda: status(kubectl, name).get("retries") == 3, 10, "no fourth automatic retry")
    assert status(kubectl, name)["phase"] == "Failed"
    release_namespace(kubectl, namespace)


def test_manual_retry_of_a_permanent_failure(fast_operator: Process, kubectl: Kubectl, tmp_path: Any) -> None:
    name = unique("manual")
    namespace = environment_name("octo/timers", 503)
    kubectl.run("create", "namespace", namespace)
    kubectl.apply(make_env(name, 503, repo="octo/timers"))
    st = wait_phase(kubectl, name, "Failed")
    assert st["permanent"] is True
    stays(lambda: not status(kubectl, name).get("retries"), 4, "permanent failures are not retried")
    kubectl.run("delete", "namespace", namespace, "--wait=true", "--timeout=60s")
    env = {**os.environ, **fast_operator.env}
    result = subprocess.run(
        [sys.executable, "-m", "ephemera.cli", "environments", "retry", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    st = wait_phase(kubectl, name, "Ready")
    assert st["retryRequest"]
    # The same through kubectl: a new value of the annotation re-runs provisioning (a no-op when Ready).
    kubectl.run("annotate", "pe", name, "ephemera.dev/retry=again", "--overwrite")
    wait_for(lambda: status(kubectl, name).get("retryRequest") == "again", timeout=30, what="the kubectl retry")
    wait_phase(kubectl, name, "Ready")


def test_stuck_deletion_is_retried_and_explained(fast_operator: Process, kubectl: Kubectl) -> None:
    name = unique("stuck")
    kubectl.apply(make_env(name, 504, repo="octo/timers"))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    hold_namespace(kubectl, namespace)
    kubectl.run("delete", "pe", name, "--wait=false")
    st = wait_for(
        lambda: (s := status(kubectl, name)).get("reason") == "DeletionStuck" and s,
        timeout=60,
        what="the sweep to explain the stuck deletion",
    )
    assert HOLD in st["message"]
    assert "ResourceQuota/ephemera-quota" in st["message"] or "remaining objects" in st["message"]
    release_namespace(kubectl, namespace)
    wait_for(lambda: not exists(kubectl, "pe", name), timeout=60, what="the object to go once released")


def test_ready_without_namespace_is_recreated_after_a_missed_event(fast_operator: Process, kubectl: Kubectl) -> None:
    name = unique("missed")
    kubectl.apply(make_env(name, 505, repo="octo/timers"))
    namespace = wait_phase(kubectl, name, "Ready")["namespace"]
    fast_operator.kill()  # the deletion below is never seen as it happens
    kubectl.run("delete", "namespace", namespace, "--wait=true", "--timeout=60s")
    fast_operator.start()
    wait_for(lambda: exists(kubectl, "namespace", namespace), timeout=60, what="the sweep to re-create it")
    wait_phase(kubectl, name, "Ready")


def test_orphan_namespaces_go_and_foreign_ones_stay(fast_operator: Process, kubectl: Kubectl) -> None:
    repo = f"octo/orphan-{uuid.uuid4().hex[:6]}"
    orphan, spoofed, other = environment_name(repo, 1), unique("spoofed"), unique("other-team")
    dead = str(uuid.uuid4())
    for ns, labels, notes, owners in (
        # As the operator made it, for an object that is gone.
        (
            orphan,
            environment_labels(orphan, repo, 1),
            {OWNER_UID_ANNOTATION: dead, REPOSITORY_ANNOTATION: repo},
            [owner_reference(orphan, dead)],
        ),
        (spoofed, {MANAGED_BY_LABEL: "ephemera"}, {}, []),  # the label alone is no proof of ownership
        (other, {"team": "payments"}, {OWNER_UID_ANNOTATION: str(uuid.uuid4())}, []),
    ):
        meta = {"name": ns, "labels": labels, "annotations": notes, "ownerReferences": owners}
        kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    wait_for(lambda: not exists(kubectl, "namespace", orphan) or _terminating(kubectl, orphan), timeout=90)
    assert exists(kubectl, "namespace", spoofed)
    assert not _terminating(kubectl, spoofed)
    assert exists(kubectl, "namespace", other)
    assert not _terminating(kubectl, other)


def _terminating(kubectl: Kubectl, namespace: str) -> bool:
    result = kubectl.run("get", "namespace", namespace, "-o", "json", check=False)
    return result.returncode == 0 and bool(json.loads(result.stdout)["metadata"].get("deletionTimestamp"))


def test_purge_removes_old_records(fast_operator: Process, kubectl: Kubectl, postgres: Postgres) -> None:
    name = unique("purge")
    kubectl.apply(make_env(name, 506, repo="octo/timers"))
    wait_phase(kubectl, name, "Ready")
    wait_for(lambda: history(postgres.url, name), timeout=30, what="the records to exist")
    kubectl.run("delete", "pe", name, "--wait=true", "--timeout=60s")
    # Retention is 3 s here: once destroyed, the records go at the next purge.
    wait_for(lambda: not history(postgres.url, name), timeout=60, what="the purge")


def _sweeper(kube: Kube, selector: str, **settings: Any) -> Sweeper:
    """The operator's sweeps, run here against the real API server over the namespaces `selector` picks."""
    return Sweeper(Environments(kube, Settings(**settings), Transitions()), selector=selector)


def _made_namespace(name: str, repo: str, pr: int, uid: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    refs = [owner] if owner is not None else []
    meta = {
        "name": name,
        "labels": environment_labels(name, repo, pr),
        "annotations": {OWNER_UID_ANNOTATION: uid, REPOSITORY_ANNOTATION: repo},
        "ownerReferences": refs,
    }
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def test_only_namespaces_with_every_mark_of_ephemera_are_judged_as_orphans() -> None:
    repo, uid = "octo/marks", str(uuid.uuid4())
    name = environment_name(repo, 4)
    made = _made_namespace(name, repo, 4, uid, owner_reference("pe-4", uid))
    assert made_by_ephemera(made, "pr") == ("pe-4", uid)
    legacy = legacy_environment_name(repo, 4)
    assert made_by_ephemera(_made_namespace(legacy, repo, 4, uid, owner_reference("pe-4", uid)), "pr") == ("pe-4", uid)

    def without(change: Callable[[dict[str, Any]], None]) -> tuple[str, str] | None:
        variant = json.loads(json.dumps(made))
        change(variant["metadata"])
        return made_by_ephemera(variant, "pr")

    assert without(lambda m: m.update(name="team-payments")) is None  # a name Ephemera would not give
    assert without(lambda m: m.update(name=environment_name(repo, 5))) is None  # another PR's name
    assert without(lambda m: m["labels"].pop(MANAGED_BY_LABEL)) is None
    assert without(lambda m: m["annotations"].pop(OWNER_UID_ANNOTATION)) is None
    assert without(lambda m: m["annotations"].pop(REPOSITORY_ANNOTATION)) is None
    assert without(lambda m: m.update(ownerReferences=[])) is None
    assert without(lambda m: m["ownerReferences"][0].update(uid=str(uuid.uuid4()))) is None
    assert without(lambda m: m["ownerReferences"][0].update(kind="ConfigMap")) is None
    assert without(lambda m: m["ownerReferences"].append(owner_reference("other", uid))) is None
    assert made_by_ephemera(made, "preview") is None  # another prefix: not this operator's


def test_the_orphan_sweep_leaves_namespaces_ephemera_did_not_make(crd: Path, kubectl: Kubectl, kube: Kube) -> None:
    """Each namespace lacks one proof of being an orphan of Ephemera's; the sweep deletes none of them."""
    tag = uuid.uuid4().hex[:6]
    repo = f"octo/not-orphans-{tag}"
    owner_name = unique("owner")
    kubectl.apply(make_env(owner_name, 1, repo=repo))
    live_uid = kubectl.json("get", "pe", owner_name)["metadata"]["uid"]
    live = owner_reference(owner_name, live_uid)
    dead_uid = str(uuid.uuid4())
    cases = {
        # Labelled and marked, but under a name Ephemera never gives (and owned by nothing).
        f"team-{tag}": _made_namespace(f"team-{tag}", repo, 2, dead_uid),
        # Ephemera's name, label and mark, but no owner reference.
        environment_name(repo, 3): _made_namespace(environment_name(repo, 3), repo, 3, dead_uid),
        # Owned by a live PreviewEnvironment, with a mark naming another (gone) uid.
        environment_name(repo, 4): _made_namespace(environment_name(repo, 4), repo, 4, dead_uid, live),
        # Every mark, of a PreviewEnvironment this sweeper has not seen, that the API still has.
        environment_name(repo, 5): _made_namespace(environment_name(repo, 5), repo, 5, live_uid, live),
    }
    for namespace in cases.values():
        namespace["metadata"]["labels"]["test.ephemera.dev/case"] = tag
        kubectl.apply(namespace)
    threshold = 1.0

    def old_enough() -> bool:
        now = datetime.datetime.now(datetime.UTC)
        listed = kubectl.json("get", "namespaces", "-l", f"test.ephemera.dev/case={tag}")["items"]
        ages = [now - datetime.datetime.fromisoformat(ns["metadata"]["creationTimestamp"]) for ns in listed]
        return len(ages) == len(cases) and all(age.total_seconds() > threshold + 1 for age in ages)

    wait_for(old_enough, timeout=30, what="the namespaces to be older than the stale threshold")
    sweeper = _sweeper(kube, f"{MANAGED_BY_LABEL}=ephemera,test.ephemera.dev/case={tag}", stale_threshold=threshold)
    report = sweeper.sweep({})
    assert report.orphans == 0
    for name in cases:
        assert exists(kubectl, "namespace", name)
        assert not _terminating(kubectl, name), f"{name} was deleted"
    kubectl.run("delete", "namespaces", "-l", f"test.ephemera.dev/case={tag}", "--wait=false")
    kubectl.run("delete", "pe", owner_name, "--wait=false")


def test_an_empty_list_of_namespaces_reads_as_empty(crd: Path, kube: Kube) -> None:
    """The API server answers a metadata list that matches nothing with `"items": null`."""
    selector = f"ephemera.dev/nothing={uuid.uuid4().hex}"
    query = [("labelSelector", selector)]
    assert kube._request("GET", "/api/v1/namespaces", query=query, accept=METADATA).get("items") is None
    assert kube.list_namespaces(selector) == []


def test_sweeps_of_a_cluster_without_environments_succeed_quietly(
    crd: Path, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh install: no namespace carries Ephemera's label (here: a selector that matches none)."""
    sweeper = _sweeper(kube, f"{MANAGED_BY_LABEL}=ephemera,ephemera.dev/nothing={uuid.uuid4().hex}")
    with caplog.at_level(logging.WARNING):
        report = sweeper.sweep({})
        retried = retry_due_ones(sweeper.service, {}, logging.getLogger("test"))
    assert not report
    assert retried == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def _peering(kubectl: Kubectl, entries: dict[str, dict[str, Any]]) -> str:
    name = unique("peering")
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}, "status": entries}
    kubectl.run("create", "-f", "-", input=json.dumps(body))
    return name


def test_only_a_replica_with_a_live_entry_of_its_own_runs_the_jobs(kubectl: Kubectl, kube: Kube) -> None:
    """Active: its own kopf keep-alive is there and alive, and no live peer outranks it."""
    kubectl.run("apply", "-f", str(REPO_ROOT / "crds" / "clusterkopfpeerings.yaml"))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "crd/clusterkopfpeerings.kopf.dev")
    now = datetime.datetime.now(datetime.UTC)
    fresh, expired = now.isoformat(), (now - datetime.timedelta(minutes=5)).isoformat()

    def entry(priority: int, lastseen: str) -> dict[str, Any]:
        return {"priority": priority, "lifetime": 60, "lastseen": lastseen}

    # Its own entry missing (not written yet, or cleaned away): never active, whatever the others.
    missing = _peering(kubectl, {"b": entry(100, fresh)})
    assert not is_active(kube, missing, 200, "a")
    assert is_active(kube, missing, 100, "b")
    # The highest live priority runs them; an expired entry counts for nothing, its own included.
    both = _peering(kubectl, {"a": entry(200, fresh), "b": entry(100, fresh)})
    assert is_active(kube, both, 200, "a")
    assert not is_active(kube, both, 100, "b")
    dead_leader = _peering(kubectl, {"a": entry(200, expired), "b": entry(100, fresh)})
    assert not is_active(kube, dead_leader, 200, "a")
    assert is_active(kube, dead_leader, 100, "b")
    # Equal priorities: exactly one, the smaller identity.
    tie = _peering(kubectl, {"a": entry(100, fresh), "b": entry(100, fresh)})
    assert [is_active(kube, tie, 100, identity) for identity in ("a", "b")] == [True, False]
    # No peering object at all: nobody is known to be alive, this replica included.
    assert not is_active(kube, unique("no-peering"), 100, "a")
    assert is_active(kube, None, 0, "a")  # standalone
    kubectl.run("delete", "clusterkopfpeering", missing, both, dead_leader, tie)


def test_a_replica_under_peering_runs_the_jobs_under_its_own_entry(
    fast_operator: Process, kubectl: Kubectl, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """`ephemera operator` tells kopf the identity it looks for: its keep-alive is found, so it runs
    the operator-wide jobs (the phase gauge is one of them)."""
    from devtools.support import process_env
    from tests.conftest import db_upgrade
    from tests.test_chart import paused

    kubectl.run("apply", "-f", str(REPO_ROOT / "crds" / "clusterkopfpeerings.yaml"))
    peering = unique("jobs")
    kubectl.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}})
    env = process_env(control_plane.kubeconfig, tmp_path, EPHEMERA_PEERING=peering, EPHEMERA_PEERING_PRIORITY="5")
    db_upgrade(env)
    with paused(fast_operator):
        replica = Process(["operator"], env, tmp_path / "operator.log", int(env["EPHEMERA_OPERATOR_PORT"])).start()
        try:
            wait_for(lambda: http_ok(replica, "/healthz"), timeout=60, what="the replica")
            entries = wait_for(
                lambda: kubectl.json("get", "clusterkopfpeering", peering).get("status") or {},
                timeout=60,
                what="the replica's keep-alive",
            )
            assert [e["priority"] for e in entries.values()] == [5]
            wait_for(lambda: "ephemera_environments{" in _metrics(replica), timeout=60, what="the phase gauge job")
            # It says it is the active replica, until a live peer of a higher priority appears (the
            # alert on no active replica, and the alerts on the phase gauge, read this).
            wait_for(lambda: "\nephemera_operator_active 1.0" in _metrics(replica), timeout=30, what="active")
            leader = {"priority": 10, "lifetime": 60, "lastseen": datetime.datetime.now(datetime.UTC).isoformat()}
            kubectl.run(
                "patch", "clusterkopfpeering", peering, "--type=merge", "-p", json.dumps({"status": {"z": leader}})
            )
            wait_for(lambda: "\nephemera_operator_active 0.0" in _metrics(replica), timeout=30, what="standby")
        finally:
            replica.stop()
    kubectl.run("delete", "clusterkopfpeering", peering)


def _metrics(proc: Process) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/metrics", timeout=5) as response:
        return str(response.read().decode())
