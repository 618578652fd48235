"""Cleanup and retries as kopf timers, with intervals shortened to seconds, on the real control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ephemera.devtools.controlplane import REPO_ROOT
from ephemera.naming import MANAGED_BY_LABEL, OWNER_UID_ANNOTATION, environment_name
from tests.conftest import http_ok
from tests.postgres import Postgres
from tests.support import Kubectl, Process, wait_for
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
    "EPHEMERA_SOFT_TIME_LIMIT": "2",
}


@pytest.fixture(scope="module")
def fast_operator(operator: Process) -> Iterator[Process]:
    """The session's operator, restarted with every interval and threshold in seconds."""
    operator.stop()
    fast = Process(operator.args, {**operator.env, **SHORT}, operator.log_path, operator.port).start()
    wait_for(lambda: http_ok(fast, "/healthz"), timeout=60, what="operator /healthz")
    yield fast
    fast.stop()
    operator.start()
    wait_for(lambda: http_ok(operator, "/healthz"), timeout=60, what="operator /healthz")


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
    st = wait_for(
        lambda: (s := status(kubectl, name)).get("phase") == "Failed" and s.get("retries") and s,
        timeout=60,
        what="Failed as stale, then an automatic retry counted",
    )
    assert st["permanent"] is False
    wait_for(lambda: "Stale" in events_of(kubectl, name), timeout=30, what="a Stale event")
    assert "SoftTimeLimit" in events_of(kubectl, name)  # warned before the sweep gave up on it
    release_namespace(kubectl, namespace)
    wait_for(lambda: not exists(kubectl, "namespace", namespace), timeout=60, what="the old namespace to go")
    st = wait_phase(kubectl, name, "Ready", timeout=60)
    assert st["commit"] == SHA_B[:7]
    assert exists(kubectl, "namespace", namespace)


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
    orphan, spoofed, other = unique("orphan"), unique("spoofed"), unique("other-team")
    for ns, labels, notes in (
        (orphan, {MANAGED_BY_LABEL: "ephemera"}, {OWNER_UID_ANNOTATION: str(uuid.uuid4())}),
        (spoofed, {MANAGED_BY_LABEL: "ephemera"}, {}),  # the label alone is no proof of ownership
        (other, {"team": "payments"}, {OWNER_UID_ANNOTATION: str(uuid.uuid4())}),
    ):
        meta = {"name": ns, "labels": labels, "annotations": notes}
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
