"""The intake's guards on a PR event's way to its write, answered from watched mirrors: what the API
server is asked per event, and that the guards still hold."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import ControlPlane
from devtools.support import Kubectl, wait_for
from ephemera.api.models import API_VERSION, KIND
from ephemera.api.naming import (
    FINALIZER,
    NAME_HASH_BITS,
    NAME_HASH_LABEL,
    environment_labels,
    environment_name,
    legacy_environment_name,
)
from ephemera.intake.events import PullRequestEvent, parse_pull_request
from ephemera.intake.mirror import UNKNOWN, Mirror
from ephemera.intake.pullrequests import Intake, Policies
from ephemera.intake.tombstones import Tombstones, config_map_name
from ephemera.kube import ENVIRONMENTS, TEMPLATES, Kube, KubeError, load_api_client
from ephemera.policy import Policy
from tests.test_webhook import pr_event

STATE = "ephemera-intake-state"


class Counted(Kube):
    """The real adapter, counting the requests the intake's own thread makes (not the mirrors')."""

    def __init__(self, kubeconfig: Path) -> None:
        super().__init__(load_api_client(kubeconfig))
        self.thread = threading.current_thread()
        self.requests: list[tuple[str, str]] = []

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        if threading.current_thread() is self.thread and TEMPLATES not in path:
            self.requests.append((method, path))
        return super()._request(method, path, **kwargs)


@pytest.fixture
def kube(control_plane: ControlPlane, crd: Path, kubectl: Kubectl) -> Iterator[Counted]:
    if kubectl.run("get", "namespace", STATE, check=False).returncode != 0:
        kubectl.run("create", "namespace", STATE)
    client = Counted(control_plane.kubeconfig)
    yield client
    client.close()


@pytest.fixture
def mirrored(kube: Counted) -> Iterator[Intake]:
    """An intake as the webhook runs it: both mirrors started, and live."""
    subject = intake(kube)
    mirrors = [subject.tombstones.mirrored(), subject.mirrored()]
    for mirror in mirrors:
        mirror.start()
    wait_for(lambda: all(m.live for m in mirrors), timeout=30, what="the mirrors' first lists")
    yield subject
    for mirror in mirrors:
        mirror.stop()


def event(action: str, repo: str, number: int, updated_at: str, sha: str = "c" * 40) -> PullRequestEvent:
    data = pr_event(action, repo=repo, number=number, sha=sha, updated_at=updated_at)
    for side in ("head", "base"):  # the PR's own repository: not a fork's
        data["pull_request"][side]["repo"]["full_name"] = repo
    return parse_pull_request(data)


def intake(kube: Kube) -> Intake:
    tombstones = Tombstones(kube, namespace=STATE, retention=3600)
    return Intake(kube, tombstones, prefix="pr", policies=Policies(Policy(), kube))


def test_a_new_pr_costs_one_request_once_the_mirrors_are_live(kube: Counted, mirrored: Intake) -> None:
    repo, number = f"octo/mirror-{uuid.uuid4().hex[:6]}", 5

    outcome = mirrored.handle(event("opened", repo, number, "2026-01-01T00:00:00Z"), "d-1")

    assert (outcome.action, outcome.name) == ("created", environment_name(repo, number))
    assert kube.requests == [("POST", ENVIRONMENTS)]
    made = kube.get_environment(environment_name(repo, number))
    assert made is not None
    assert NAME_HASH_LABEL in made["metadata"]["labels"]


def test_without_live_mirrors_the_guards_ask_the_api_server(kube: Counted) -> None:
    repo, number = f"octo/mirror-{uuid.uuid4().hex[:6]}", 6
    subject = intake(kube)
    subject.tombstones.mirrored()  # made, never started: not live
    subject.mirrored()

    outcome = subject.handle(event("opened", repo, number, "2026-01-01T00:00:00Z"), "d-2")

    assert outcome.action == "created"
    assert [method for method, _ in kube.requests] == ["GET", "GET", "POST"], kube.requests


def test_a_close_another_replica_records_reaches_the_mirror_and_stops_a_replay(kube: Counted, mirrored: Intake) -> None:
    repo, number = f"octo/mirror-{uuid.uuid4().hex[:6]}", 7
    Tombstones(kube, namespace=STATE, retention=3600).add(repo, number, "2026-01-01T00:05:00Z")  # the other replica
    wait_for(
        lambda: mirrored.tombstones.closed_at(repo, number) == "2026-01-01T00:05:00Z",
        timeout=30,
        what="the close in the mirror",
    )
    kube.requests.clear()

    replayed = mirrored.handle(event("opened", repo, number, "2026-01-01T00:00:00Z"), "d-3")
    reopened = mirrored.handle(event("reopened", repo, number, "2026-01-01T00:06:00Z"), "d-4")

    assert (replayed.action, reopened.action) == ("ignored", "created"), (replayed, reopened)
    assert "closed" in replayed.reason
    # The replay's read of its object (the careful path: older than the close), the reopen's create;
    # no read of the closes.
    assert kube.requests == [("GET", f"{ENVIRONMENTS}/{environment_name(repo, number)}"), ("POST", ENVIRONMENTS)]


@pytest.mark.usefixtures("operator_paused")  # else the operator writes its object between a read and a write
def test_an_object_under_a_legacy_name_is_found_from_the_mirror(kube: Counted, mirrored: Intake) -> None:
    repo, number = f"octo/mirror-{uuid.uuid4().hex[:6]}", 8
    legacy = legacy_environment_name(repo, number)
    kube.create_environment(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": legacy,
                "labels": environment_labels(legacy, repo, number),  # an earlier version's: no name-hash label
                "finalizers": [FINALIZER],
            },
            "spec": {"repository": repo, "pullRequest": number, "commitSha": "a" * 40, "branch": "main"},
        }
    )
    mirror = mirrored.legacy
    assert mirror is not None
    wait_for(lambda: mirror.get(legacy) not in (None, UNKNOWN), timeout=30, what="the object in the mirror")
    kube.requests.clear()

    pushed = mirrored.handle(event("synchronize", repo, number, "2026-01-01T00:01:00Z", sha="d" * 40), "d-5")

    assert (pushed.action, pushed.name) == ("updated", legacy), pushed
    # The careful path's read of the object it patches, and the patch; the name came from the mirror.
    assert kube.requests == [("GET", f"{ENVIRONMENTS}/{legacy}"), ("PATCH", f"{ENVIRONMENTS}/{legacy}")]
    assert kube.get_environment(environment_name(repo, number)) is None  # no second object under the new name


@pytest.mark.usefixtures("operator_paused")  # else the operator writes its object between a read and a write
def test_an_object_made_before_the_label_gets_it_on_its_next_event(kube: Counted, mirrored: Intake) -> None:
    repo, number = f"octo/mirror-{uuid.uuid4().hex[:6]}", 9
    name = environment_name(repo, number)
    kube.create_environment(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "labels": environment_labels(name, repo, number), "finalizers": [FINALIZER]},
            "spec": {"repository": repo, "pullRequest": number, "commitSha": "a" * 40, "branch": "main"},
        }
    )

    pushed = mirrored.handle(event("synchronize", repo, number, "2026-01-01T00:01:00Z", sha="d" * 40), "d-6")

    assert (pushed.action, pushed.name) == ("updated", name), pushed
    obj = kube.get_environment(name)
    assert obj is not None
    assert obj["metadata"]["labels"][NAME_HASH_LABEL] == NAME_HASH_BITS


class Breakable(Counted):
    """The real adapter, whose mirrors' lists and watches fail while `cut` is set, as when the
    connection to the API server drops or a watch's version has gone (410)."""

    def __init__(self, kubeconfig: Path) -> None:
        super().__init__(kubeconfig)
        self.cut = threading.Event()

    def snapshot(self, path: str, what: str, selector: str) -> tuple[list[Any], str]:
        if self.cut.is_set():
            raise KubeError(f"listing {what}: Kubernetes API unreachable", status=0)
        return super().snapshot(path, what, selector)

    def watch(self, path: str, what: str, selector: str, version: str, seconds: int) -> Iterator[tuple[str, Any]]:
        for item in super().watch(path, what, selector, version, seconds):
            if self.cut.is_set():  # the event that came is lost with the connection
                raise KubeError(f"watching {what}: the connection dropped", status=0)
            yield item


class Late(Counted):
    """The real adapter, whose mirrors' watches hold each event while `released` is clear: a watch
    that lags behind this process's own writes."""

    def __init__(self, kubeconfig: Path) -> None:
        super().__init__(kubeconfig)
        self.released = threading.Event()
        self.released.set()

    def watch(self, path: str, what: str, selector: str, version: str, seconds: int) -> Iterator[tuple[str, Any]]:
        for item in super().watch(path, what, selector, version, seconds):
            self.released.wait()
            yield item


@contextlib.contextmanager
def closes_mirrored(adapter: Counted) -> Iterator[tuple[Intake, Mirror]]:
    """An intake over `adapter`, the mirror of its closes started and live; after: stopped, `adapter` closed."""
    subject = intake(adapter)
    mirror = subject.tombstones.mirrored()
    mirror.start()
    try:
        wait_for(lambda: mirror.live, timeout=30, what="the mirror's first list")
        yield subject, mirror
    finally:
        mirror.stop()
        adapter.close()


def test_a_close_this_replica_records_stops_an_older_reopen_before_its_watch_brings_it(
    control_plane: ControlPlane, kube: Counted
) -> None:
    """A storm at one replica: the PR's close first (no environment yet), then the reopen before it.
    The close must stop the reopen though the replica's mirror has not seen it yet (seen in CI: the
    reopen created an environment for a closed PR)."""
    repo, number = f"octo/mirror-{uuid.uuid4().hex[:6]}", 11
    late = Late(control_plane.kubeconfig)
    with closes_mirrored(late) as (subject, mirror):
        late.released.clear()
        try:
            closed = subject.handle(event("closed", repo, number, "2026-01-01T00:05:00Z"), "d-8")
            reopened = subject.handle(event("reopened", repo, number, "2026-01-01T00:03:00Z"), "d-9")
            kept = subject.tombstones.unmirrored()  # while the watch holds the close
        finally:
            late.released.set()  # the watch catches up

        assert closed.action == "ignored", closed  # no environment: only the close is recorded
        assert reopened.action == "ignored", reopened
        assert "closed" in reopened.reason
        assert late.get_environment(environment_name(repo, number)) is None
        assert kept == 1
        # Kept until the mirror holds it; the next close this replica records drops it: none pile up.
        wait_for(lambda: mirror.get(config_map_name(repo)) not in (None, UNKNOWN), timeout=30, what="the close")
        subject.handle(event("closed", f"{repo}-other", number, "2026-01-01T00:05:00Z"), "d-10")
        assert subject.tombstones.unmirrored() <= 1  # the other repository's, if its watch is not there yet
        assert subject.tombstones.closed_at(repo, number) == "2026-01-01T00:05:00Z"


def test_a_close_missed_by_a_broken_watch_still_stops_a_replay(control_plane: ControlPlane, kube: Counted) -> None:
    repo, number = f"octo/mirror-{uuid.uuid4().hex[:6]}", 10
    broken = Breakable(control_plane.kubeconfig)
    with closes_mirrored(broken) as (subject, mirror):
        broken.cut.set()
        # Another replica records the close; its event is lost with this mirror's watch.
        Tombstones(kube, namespace=STATE, retention=3600).add(repo, number, "2026-01-01T00:05:00Z")
        wait_for(lambda: not mirror.live, timeout=30, what="the mirror to stop answering")
        broken.requests.clear()

        replayed = subject.handle(event("opened", repo, number, "2026-01-01T00:00:00Z"), "d-7")

        assert replayed.action == "ignored", replayed
        assert "closed" in replayed.reason
        closes = f"/api/v1/namespaces/{STATE}/configmaps/"
        assert any(method == "GET" and path.startswith(closes) for method, path in broken.requests), broken.requests

        broken.cut.clear()  # the API server is back: the mirror lists again and holds the close
        wait_for(lambda: mirror.live, timeout=30, what="the mirror live again")
        assert subject.tombstones.closed_at(repo, number) == "2026-01-01T00:05:00Z"
