"""The backstop against the real API server and the local GitHub: lost events repaired, nothing
deleted on a failed or short listing, failed deliveries redelivered once, and the App's installation
lifecycle (uninstall, suspension, removal, transfer, rename) carried to the environments."""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.controlplane import ControlPlane
from devtools.fakegithub import FakeGitHub, Fault, Server
from devtools.support import Kubectl, Process, fixture_payload, post_webhook, process_env, wait_for
from ephemera import backstop as backstop_module
from ephemera.api.naming import CLOSED_REASON_ANNOTATION as CLOSED_REASON
from ephemera.api.naming import (
    FINALIZER,
    ORIGIN_ANNOTATION,
    RENAMED_TO_ANNOTATION,
    TEARDOWN_AFTER_ANNOTATION,
    TEARDOWN_REASON_ANNOTATION,
    environment_name,
)
from ephemera.backstop import ORIGIN, Backstop, Listing, compare
from ephemera.config import Settings
from ephemera.intake import installations
from ephemera.intake.tombstones import Tombstones
from ephemera.kube import Kube, KubeError, Obj, load_api_client
from ephemera.redelivery import CONFIG_MAP, Redeliverer
from tests.conftest import WEBHOOK_SECRET, db_upgrade, http_ok

STATE = "ephemera-backstop-state"
SHA = "9f2c6d1a" * 5
# The webhook fixture runs with the default grace.
GRACE = float(Settings.model_fields["backstop_teardown_grace"].default)


@pytest.fixture(scope="module")
def gh() -> Iterator[FakeGitHub]:
    """A GitHub of its own: the backstop lists every installation, and counts of calls must be ours."""
    server = Server(FakeGitHub())
    fake = server.start()
    yield fake
    server.stop()


@pytest.fixture(scope="module")
def kube(crd: Path, kube: Kube, kubectl: Kubectl) -> Kube:
    """conftest's client, with the CRD installed and the namespace of the backstop's ConfigMaps."""
    if kubectl.run("get", "namespace", STATE, check=False).returncode != 0:
        kubectl.run("create", "namespace", STATE)
    return kube


def settings(gh: FakeGitHub, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "github_api_url": gh.url(""),
        "github_app_id": gh.app_id,
        "github_private_key": gh.private_key_pem,
        "webhook_namespace": STATE,
        "backstop_teardown_grace": GRACE,
        **overrides,
    }
    return Settings(**values)


def account() -> str:
    return f"org-{uuid.uuid4().hex[:8]}"


def deleting(kube: Kube, name: str) -> bool:
    obj = kube.get_environment(name)
    return obj is None or bool(obj["metadata"].get("deletionTimestamp"))


def live(kube: Kube, repository: str) -> dict[int, Obj]:
    return {
        o["spec"]["pullRequest"]: o
        for o in kube.list_environments()
        if o["spec"]["repository"] == repository and not o["metadata"].get("deletionTimestamp")
    }


# The PR reconciler ---------------------------------------------------------------------------------


def test_an_opened_lost_in_an_outage_gets_its_environment_from_the_backstop(gh: FakeGitHub, kube: Kube) -> None:
    """The `opened` never reached the webhook (503s during an API server outage); the PR is open on
    GitHub. One pass makes the environment the webhook would have made, marked as the backstop's."""
    owner = account()
    gh.installation(601, owner)
    repo = f"{owner}/shop"
    gh.pull_request(repo, 7, sha=SHA, ref="feature/x", author="alice", title="Add a cart")
    backstop = Backstop(settings(gh), kube)

    report = backstop.run()

    obj = kube.get_environment(environment_name(repo, 7))
    assert obj is not None, report
    assert obj["spec"] == {
        "repository": repo,
        "pullRequest": 7,
        "commitSha": SHA,
        "branch": "feature/x",
        "author": "alice",
        "title": "Add a cart",
        "installationId": 601,
    }
    assert obj["metadata"]["annotations"][ORIGIN_ANNOTATION] == ORIGIN
    assert obj["metadata"]["finalizers"] == [FINALIZER]
    assert report.created >= 1
    assert report.deleted == 0
    # A second pass finds nothing to repair.
    again = backstop.run()
    assert again.created == 0
    assert again.deleted == 0


def test_a_lost_closed_tears_the_environment_down_and_is_remembered(gh: FakeGitHub, kube: Kube) -> None:
    owner = account()
    gh.installation(602, owner)
    repo = f"{owner}/shop"
    gh.pull_request(repo, 8, sha=SHA)
    gh.pull_request(repo, 9, sha=SHA)
    backstop = Backstop(settings(gh), kube)
    backstop.run()
    name = environment_name(repo, 8)
    assert kube.get_environment(name) is not None
    closed = gh.close_pull(repo, 8, merged=True)  # its `closed` event is lost

    report = backstop.run()

    assert report.deleted == 1
    obj = kube.get_environment(name)
    assert obj is None or obj["metadata"]["annotations"][CLOSED_REASON] == "merged"
    assert deleting(kube, name)
    assert not deleting(kube, environment_name(repo, 9))  # the open one stays
    # Remembered as the webhook remembers a close: a late `opened` cannot resurrect it.
    tombstones = Tombstones(kube, namespace=STATE, retention=3600)
    assert tombstones.closed_at(repo, 8) == closed["updated_at"]
    assert [c.path for c in gh.calls_to("GET", rf"/repos/{repo}/pulls/\d+")] == [f"/repos/{repo}/pulls/8"]


def test_a_pr_closed_after_the_listing_is_not_resurrected(gh: FakeGitHub, kube: Kube) -> None:
    """The listing saw the PR open; its close (and tombstone) landed before the backstop's create."""
    owner = account()
    gh.installation(603, owner)
    repo = f"{owner}/shop"
    listed = gh.pull_request(repo, 4, sha=SHA, updated_at="2026-01-01T10:00:00Z")
    Tombstones(kube, namespace=STATE, retention=3600).add(repo, 4, "2026-01-01T10:05:00Z")
    backstop = Backstop(settings(gh), kube)
    assert listed["state"] == "open"

    report = backstop.run()

    assert report.created == 0
    assert kube.get_environment(environment_name(repo, 4)) is None


def test_a_failed_or_short_listing_deletes_nothing(gh: FakeGitHub, kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backstop_module, "PAGE_SIZE", 30)  # two pages from 32 PRs
    owner = account()
    gh.installation(604, owner)
    repo = f"{owner}/shop"
    for number in range(1, 33):
        gh.pull_request(repo, number, sha=SHA)
    backstop = Backstop(settings(gh), kube)
    backstop.run()
    assert len(live(kube, repo)) == 32

    # A 500 on the second page: the listing is partial, so no environment of the repository is judged.
    gh.pull_listing_fault(repo, page=2, status=500)
    report = backstop.run()
    assert not report.complete
    assert report.deleted == 0
    assert len(live(kube, repo)) == 32
    assert gh.calls_to("GET", rf"/repos/{repo}/pulls/\d+") == []

    # An empty second page (200, no more links): PRs 31 and 32 look closed, so each is fetched alone;
    # GitHub says open, and nothing is deleted.
    gh.pull_listing_fault(repo, page=2, status=200)
    report = backstop.run()
    assert report.deleted == 0
    assert len(live(kube, repo)) == 32
    assert sorted(c.path for c in gh.calls_to("GET", rf"/repos/{repo}/pulls/\d+")) == [
        f"/repos/{repo}/pulls/31",
        f"/repos/{repo}/pulls/32",
    ]

    # An empty listing altogether, and the one-by-one fetches failing: still nothing deleted.
    gh.pull_listing_fault(repo, page=1, status=200)
    gh.inject(Fault(method="GET", path=rf"/repos/{repo}/pulls/\d+", status=500, count=32))
    report = backstop.run()
    assert report.deleted == 0
    assert not report.complete
    assert len(live(kube, repo)) == 32


def test_a_listing_that_times_out_deletes_nothing(gh: FakeGitHub, kube: Kube) -> None:
    owner = account()
    gh.installation(607, owner)
    repo = f"{owner}/slow"
    gh.pull_request(repo, 1, sha=SHA)
    Backstop(settings(gh), kube).run()
    gh.close_pull(repo, 1)
    gh.inject(Fault(method="GET", path=rf"/repos/{repo}/pulls", status=None, delay=3))

    report = Backstop(settings(gh, github_timeout=1), kube).run()

    assert not report.complete
    assert report.deleted == 0
    assert not deleting(kube, environment_name(repo, 1))
    assert any("slow's open PRs" in problem for problem in report.problems), report.problems


def test_a_low_rate_limit_leaves_the_listing_to_the_next_pass(gh: FakeGitHub, kube: Kube) -> None:
    """Below the floor, no repository is listed (statuses and comments need the budget), so none is
    judged: nothing is created, checked or deleted, and the pass does not count as a success."""
    owner = account()
    gh.installation(606, owner)
    repo = f"{owner}/shop"
    gh.pull_request(repo, 2, sha=SHA)
    gh.rate_remaining = backstop_module.RATE_FLOOR - 1
    try:
        report = Backstop(settings(gh), kube).run()
    finally:
        gh.rate_remaining = 5000
    assert not report.complete
    assert report.created == 0
    assert report.deleted == 0
    assert gh.calls_to("GET", rf"/repos/{repo}/pulls(/\d+)?") == []
    assert kube.get_environment(environment_name(repo, 2)) is None
    assert Backstop(settings(gh), kube).run().created >= 1  # the next pass, with the budget back


def test_token_mode_lists_the_configured_repositories(gh: FakeGitHub, kube: Kube) -> None:
    repo = f"{account()}/site"
    gh.pull_request(repo, 3, sha=SHA)
    token = gh.user_token("ephemera-bot")
    cfg = settings(gh, github_app_id=None, github_private_key=None, github_token=token, backstop_repositories=[repo])

    report = Backstop(cfg, kube).run()

    assert report.created == 1
    obj = kube.get_environment(environment_name(repo, 3))
    assert obj is not None
    assert "installationId" not in obj["spec"]


def test_draft_prs_follow_the_webhook_rule(gh: FakeGitHub, kube: Kube) -> None:
    owner = account()
    gh.installation(605, owner)
    repo = f"{owner}/shop"
    gh.pull_request(repo, 5, sha=SHA, draft=True)

    Backstop(settings(gh, webhook_draft_prs=False), kube).run()
    assert kube.get_environment(environment_name(repo, 5)) is None

    Backstop(settings(gh), kube).run()
    assert kube.get_environment(environment_name(repo, 5)) is not None


def test_compare_judges_only_complete_listings() -> None:
    env = {"metadata": {"name": "a"}, "spec": {"repository": "o/r", "pullRequest": 1}}
    pr = {"number": 2}
    now = datetime.datetime.now(datetime.UTC)
    partial = compare([Listing("o/r", None, {2: pr}, complete=False)], [env], now)
    assert partial.check == []
    assert [p for _, p in partial.create] == [pr]
    complete = compare([Listing("O/R", None, {2: pr}, complete=True)], [env], now)
    assert [c.pull_request for c in complete.check] == [1]
    assert compare([], [env], now).check == []


# Redelivery ----------------------------------------------------------------------------------------


def test_a_failed_delivery_is_redelivered_once_and_a_successful_one_never(
    gh: FakeGitHub, kube: Kube, kubectl: Kubectl
) -> None:
    namespace = f"redeliver-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", namespace)
    cfg = settings(gh, backstop_namespace=namespace)
    failed = gh.hook_delivery("guid-failed", 503)
    gh.hook_delivery("guid-ok", 202)
    first = gh.hook_delivery("guid-later-ok", 503)
    gh.hook_delivery("guid-later-ok", 202)  # GitHub's own redelivery, asked by someone, succeeded
    gh.redelivery_status = 503  # the webhook is still down: the redelivery fails too

    def redeliver() -> int:
        return Redeliverer(cfg, kube, Backstop(cfg, kube).auth, namespace=namespace).run()

    assert redeliver() == 1
    posts = [c.path for c in gh.calls_to("POST", r"/app/hook/deliveries/\d+/attempts")]
    assert posts == [f"/app/hook/deliveries/{failed}/attempts"]
    assert first not in {int(p.split("/")[4]) for p in posts}

    # Again, and after a restart (a new Redeliverer reads the cursor from the cluster): none again,
    # although the redelivery failed as well.
    assert redeliver() == 0
    assert redeliver() == 0
    assert len(gh.calls_to("POST", r"/app/hook/deliveries/\d+/attempts")) == 1
    stored = kube.get_config_map(namespace, CONFIG_MAP)
    assert stored is not None
    assert int(stored["data"]["cursor"]) >= failed

    # A new failure after the cursor is redelivered; only that one. GitHub refusing the redelivery
    # request leaves the cursor where it was, so the next pass asks again.
    gh.redelivery_status = 202
    new = gh.hook_delivery("guid-new", 500)
    gh.inject(Fault(method="POST", path=rf"/app/hook/deliveries/{new}/attempts", status=502))
    assert redeliver() == 0
    assert kube.get_config_map(namespace, CONFIG_MAP)["data"]["cursor"] == stored["data"]["cursor"]  # type: ignore[index]
    assert redeliver() == 1
    assert gh.calls_to("POST", r"/app/hook/deliveries/\d+/attempts")[-1].path == f"/app/hook/deliveries/{new}/attempts"


# The installation lifecycle --------------------------------------------------------------------------


def _seed(gh: FakeGitHub, kube: Kube, installation: int, repos: list[str]) -> None:
    for repo in repos:
        gh.pull_request(repo, 1, sha=SHA)
    Backstop(settings(gh), kube).run()
    for repo in repos:
        assert kube.get_environment(environment_name(repo, 1)) is not None


def _annotations(kube: Kube, repo: str) -> dict[str, str]:
    obj = kube.get_environment(environment_name(repo, 1))
    assert obj is not None
    return dict(obj["metadata"].get("annotations") or {})


def _installation_event(action: str, installation: int) -> dict[str, Any]:
    name = {"deleted": "deleted", "suspend": "suspend", "unsuspend": "unsuspend"}[action]
    event = fixture_payload("installation", f"{name}.payload.json")
    event["installation"]["id"] = installation
    return event


def test_a_suspended_installation_is_torn_down_after_the_grace_unless_unsuspended(
    gh: FakeGitHub, kube: Kube, webhook: Process
) -> None:
    owner = account()
    gh.installation(611, owner)
    repos = [f"{owner}/a", f"{owner}/b"]
    _seed(gh, kube, 611, repos)

    gh.installations[611].suspended_at = "2026-01-01T00:00:00Z"
    answer = post_webhook(webhook.port, "installation", _installation_event("suspend", 611), secret=WEBHOOK_SECRET)
    assert answer.status == 202, answer.body
    assert answer.body["result"] == "marked", answer.body
    for repo in repos:
        assert _annotations(kube, repo)[TEARDOWN_REASON_ANNOTATION] == "installation-suspended"
    # Within the grace the backstop leaves them.
    Backstop(settings(gh), kube).run()
    assert not any(deleting(kube, environment_name(repo, 1)) for repo in repos)

    gh.installations[611].suspended_at = None
    answer = post_webhook(webhook.port, "installation", _installation_event("unsuspend", 611), secret=WEBHOOK_SECRET)
    assert answer.body["result"] == "unmarked", answer.body
    for repo in repos:
        assert TEARDOWN_AFTER_ANNOTATION not in _annotations(kube, repo)
    later = Backstop(settings(gh), kube, clock=lambda: time.time() + 2 * GRACE)
    assert later.run().torn_down == 0

    # Uninstalled: after the grace, gone (the App's installation is gone from GitHub as well).
    post_webhook(webhook.port, "installation", _installation_event("deleted", 611), secret=WEBHOOK_SECRET)
    del gh.installations[611]
    report = Backstop(settings(gh), kube, clock=lambda: time.time() + GRACE + 60).run()
    assert report.torn_down == 2
    assert report.created == 0
    for repo in repos:
        name = environment_name(repo, 1)
        assert deleting(kube, name)
        obj = kube.get_environment(name)
        assert obj is None or obj["metadata"]["annotations"][CLOSED_REASON] == "installation-deleted"


class Contended(Kube):
    """The real adapter; just before each of its patches of an environment another writer changes the
    object (a real write), so every patch that carries the version it read meets a real 409."""

    def patch_environment(self, name: str, patch: Obj, *, missing_ok: bool = True) -> None:
        other = {"metadata": {"annotations": {"test.ephemera.dev/other-writer": uuid.uuid4().hex}}}
        super().patch_environment(name, other)
        super().patch_environment(name, patch, missing_ok=missing_ok)


def test_a_mark_that_keeps_conflicting_fails_the_event_for_a_redelivery(
    gh: FakeGitHub, kube: Kube, control_plane: ControlPlane
) -> None:
    """After ATTEMPTS conflicts in a row the event fails (503: GitHub redelivers it), not answered as
    if there were nothing to mark (the teardown would be lost)."""
    owner = account()
    gh.installation(621, owner)
    repo = f"{owner}/a"
    _seed(gh, kube, 621, [repo])
    suspend = installations.InstallationEvent.model_validate(_installation_event("suspend", 621))
    contended = Contended(load_api_client(control_plane.kubeconfig))
    try:
        with pytest.raises(KubeError) as failed:
            installations.Lifecycle(contended, grace=GRACE).handle(suspend)
        assert (failed.value.status, failed.value.temporary) == (409, True)
        assert TEARDOWN_AFTER_ANNOTATION not in _annotations(kube, repo)
    finally:
        contended.close()
    # The redelivery, uncontended, marks it.
    assert installations.Lifecycle(kube, grace=GRACE).handle(suspend).action == "marked"
    assert _annotations(kube, repo)[TEARDOWN_REASON_ANNOTATION] == "installation-suspended"
    # Back as GitHub lists it, so that the module's later backstop passes find nothing to do here.
    unsuspend = installations.InstallationEvent.model_validate(_installation_event("unsuspend", 621))
    assert installations.Lifecycle(kube, grace=GRACE).handle(unsuspend).action == "unmarked"


def test_a_lost_unsuspend_is_found_by_the_listing(gh: FakeGitHub, kube: Kube, webhook: Process) -> None:
    """The installation was suspended and unsuspended, and only the `suspend` arrived: the first pass
    that lists the repository through that installation again cancels the teardown."""
    owner = account()
    gh.installation(615, owner)
    repo = f"{owner}/back"
    _seed(gh, kube, 615, [repo])
    gh.installations[615].suspended_at = "2026-01-01T00:00:00Z"
    post_webhook(webhook.port, "installation", _installation_event("suspend", 615), secret=WEBHOOK_SECRET)
    assert TEARDOWN_AFTER_ANNOTATION in _annotations(kube, repo)
    # Still suspended: GitHub lists the installation as such, the backstop leaves it be.
    assert Backstop(settings(gh), kube).run().unmarked == 0
    assert TEARDOWN_AFTER_ANNOTATION in _annotations(kube, repo)

    gh.installations[615].suspended_at = None  # its `unsuspend` is lost
    report = Backstop(settings(gh), kube, clock=lambda: time.time() + GRACE + 60).run()

    assert report.unmarked == 1
    assert report.torn_down == 0
    assert TEARDOWN_AFTER_ANNOTATION not in _annotations(kube, repo)
    assert not deleting(kube, environment_name(repo, 1))


def test_a_mark_made_after_the_pass_began_is_not_cancelled() -> None:
    """A listing from before the mark cannot say the installation is back."""
    now = datetime.datetime.now(datetime.UTC)
    listing = Listing("o/r", 7, {1: {"number": 1}}, complete=True)

    def marked(made: datetime.datetime) -> Obj:
        deadline = (made + datetime.timedelta(seconds=100)).isoformat()
        annotations = {TEARDOWN_AFTER_ANNOTATION: deadline, TEARDOWN_REASON_ANNOTATION: "installation-suspended"}
        spec = {"repository": "o/r", "pullRequest": 1, "installationId": 7}
        return {"metadata": {"name": "a", "annotations": annotations}, "spec": spec}

    before = compare([listing], [marked(now - datetime.timedelta(seconds=5))], now, grace=100)
    assert len(before.unmark) == 1
    after = compare([listing], [marked(now + datetime.timedelta(seconds=5))], now, grace=100)
    assert after.unmark == []
    assert after.teardown == []
    other = compare(
        [Listing("o/r", 8, {1: {}}, complete=True)], [marked(now - datetime.timedelta(seconds=5))], now, 100
    )
    assert other.unmark == []  # another installation's listing says nothing about this one


def test_a_removed_repository_is_marked_and_re_adding_it_cancels(gh: FakeGitHub, kube: Kube, webhook: Process) -> None:
    owner = account()
    gh.installation(612, owner)
    kept, removed = f"{owner}/kept", f"{owner}/gone"
    _seed(gh, kube, 612, [kept, removed])
    event = fixture_payload("installation_repositories", "removed.payload.json")
    event["installation"]["id"] = 612
    event["repositories_removed"][0]["full_name"] = removed

    assert post_webhook(webhook.port, "installation_repositories", event, secret=WEBHOOK_SECRET).status == 202
    assert _annotations(kube, removed)[TEARDOWN_REASON_ANNOTATION] == "repository-removed"
    assert TEARDOWN_AFTER_ANNOTATION not in _annotations(kube, kept)

    added = copy.deepcopy(event)
    added.update(action="added", repositories_added=event["repositories_removed"], repositories_removed=[])
    assert post_webhook(webhook.port, "installation_repositories", added, secret=WEBHOOK_SECRET).status == 202
    assert TEARDOWN_AFTER_ANNOTATION not in _annotations(kube, removed)


def test_a_renamed_repository_keeps_its_environment_until_its_pr_closes(
    gh: FakeGitHub, kube: Kube, webhook: Process
) -> None:
    owner = account()
    gh.installation(613, owner)
    old, new = f"{owner}/old-name", f"{owner}/new-name"
    _seed(gh, kube, 613, [old])
    event = fixture_payload("repository", "renamed.payload.json")
    event["repository"]["full_name"] = new
    event["changes"]["repository"]["name"]["from"] = "old-name"

    assert post_webhook(webhook.port, "repository", event, secret=WEBHOOK_SECRET).body["result"] == "renamed"
    assert _annotations(kube, old)[RENAMED_TO_ANNOTATION] == new
    # GitHub now lists the PR under the new name: the backstop counts the old object as its environment.
    del gh.pulls[old.lower()]
    gh.pull_request(new, 1, sha=SHA)
    Backstop(settings(gh), kube).run()
    # Judged by this PR's objects, not the pass's totals: the module's local GitHub also holds other
    # tests' repositories, whose environments an earlier test may be tearing down while their PRs stay open.
    assert kube.get_environment(environment_name(new, 1)) is None
    assert not deleting(kube, environment_name(old, 1))
    assert gh.calls_to("GET", f"/repos/{new}/pulls")  # it was listed, under its new name
    # Its close (lost, or sent under the new name) is found under the new name.
    gh.close_pull(new, 1)
    assert Backstop(settings(gh), kube).run().deleted == 1
    assert deleting(kube, environment_name(old, 1))


def test_a_transferred_repository_is_marked(gh: FakeGitHub, kube: Kube, webhook: Process) -> None:
    owner = account()
    gh.installation(614, owner)
    repo = f"{owner}/moving"
    _seed(gh, kube, 614, [repo])
    event = fixture_payload("repository", "transferred.payload.json")
    event["repository"]["full_name"] = f"elsewhere-{owner}/moving"
    event["changes"]["owner"]["from"]["user"]["login"] = owner

    assert post_webhook(webhook.port, "repository", event, secret=WEBHOOK_SECRET).body["result"] == "marked"
    assert _annotations(kube, repo)[TEARDOWN_REASON_ANNOTATION] == "repository-transferred"


def test_a_malformed_installation_event_is_refused_and_changes_nothing(webhook: Process) -> None:
    event = fixture_payload("installation", "deleted.payload.json")
    event["installation"]["id"] = "not-a-number"
    answer = post_webhook(webhook.port, "installation", event, secret=WEBHOOK_SECRET)
    assert answer.status == 422
    assert "installation.id" in answer.body["detail"]


# The operator runs it --------------------------------------------------------------------------------


# A second operator beside the session's would race it for the environment: whichever provisions it
# records it (in its own database) and reports it (to its own GitHub); the session's won in a run.
@pytest.mark.usefixtures("operator_paused")
def test_the_operator_runs_the_backstop_and_exposes_its_metrics(
    gh: FakeGitHub, kube: Kube, control_plane: ControlPlane, tmp_path: Path
) -> None:
    owner = account()
    gh.installation(620, owner)
    repo = f"{owner}/shop"
    gh.pull_request(repo, 11, sha=SHA)
    env = process_env(
        control_plane.kubeconfig,
        tmp_path,
        EPHEMERA_BACKSTOP_ENABLED="true",
        EPHEMERA_PR_RESYNC_INTERVAL="2",
        EPHEMERA_WEBHOOK_NAMESPACE=STATE,
        EPHEMERA_GITHUB_API_URL=gh.url(""),
        EPHEMERA_GITHUB_APP_ID=str(gh.app_id),
        EPHEMERA_GITHUB_PRIVATE_KEY=gh.private_key_pem,
    )
    db_upgrade(env)
    proc = Process(["operator"], env, tmp_path / "operator.log", int(env["EPHEMERA_OPERATOR_PORT"])).start()
    try:
        wait_for(lambda: http_ok(proc, "/healthz"), timeout=60, what="operator /healthz")
        name = environment_name(repo, 11)
        wait_for(lambda: kube.get_environment(name), timeout=60, what="the backstop's environment")

        def metrics() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/metrics", timeout=5) as response:
                lines = response.read().decode().splitlines()
            return {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in lines
                if line.startswith("ephemera_backstop")
            }

        found = wait_for(
            lambda: (m := metrics()).get("ephemera_backstop_last_success_timestamp_seconds", 0) > 0 and m,
            timeout=60,
            what="a successful pass",
        )
        assert found['ephemera_backstop_repairs_total{kind="created"}'] >= 1
        # The environment's reports and the backstop's passes share the process's one token.
        wait_for(
            lambda: any(c.path.startswith(f"/repos/{repo}/statuses/") for c in gh.calls),
            timeout=60,
            what="the environment's commit status",
        )
        assert len([c for c in gh.calls if c.path == "/app/installations/620/access_tokens"]) == 1

        # `ephemera environments list` says who made it, once the operator has recorded it.
        def listed() -> list[dict[str, Any]]:
            result = cli(env, "environments", "list", "-o", "json")
            rows: list[dict[str, Any]] = json.loads(result.stdout) if result.returncode == 0 else []
            return [row for row in rows if row["name"] == name]

        (row,) = wait_for(listed, timeout=60, what="the environment's record")
        assert row["origin"] == ORIGIN
        table = cli(env, "environments", "list").stdout.splitlines()
        assert table[0].split()[-1] == "ORIGIN"
        assert next(line for line in table if line.startswith(name)).split()[-1] == ORIGIN
    finally:
        proc.stop()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ephemera.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backstop_run_makes_one_pass_from_the_command_line(
    gh: FakeGitHub, kube: Kube, control_plane: ControlPlane, tmp_path: Path
) -> None:
    owner = account()
    gh.installation(621, owner)
    repo = f"{owner}/cli"
    gh.pull_request(repo, 12, sha=SHA)
    env = process_env(
        control_plane.kubeconfig,
        tmp_path,
        EPHEMERA_WEBHOOK_NAMESPACE=STATE,
        EPHEMERA_BACKSTOP_NAMESPACE=STATE,
        EPHEMERA_GITHUB_API_URL=gh.url(""),
        EPHEMERA_GITHUB_APP_ID=str(gh.app_id),
        EPHEMERA_GITHUB_PRIVATE_KEY=gh.private_key_pem,
    )

    result = cli(env, "backstop", "run")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["created"] >= 1
    obj = kube.get_environment(environment_name(repo, 12))
    assert obj is not None
    assert obj["metadata"]["annotations"][ORIGIN_ANNOTATION] == ORIGIN
