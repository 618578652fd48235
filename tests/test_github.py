"""GitHub reporting through a GitHub App, against the local GitHub API server."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from pydantic import SecretStr

from devtools.controlplane import ControlPlane
from devtools.fakegithub import FakeGitHub, Fault, recorded
from devtools.support import Kubectl, Process, wait_for
from ephemera.api.models import Phase
from ephemera.api.naming import CLOSED_REASON_ANNOTATION as CLOSED_REASON
from ephemera.config import GITHUB_SECONDARY_RATE_LIMIT_DELAY, Settings
from ephemera.github.client import GitHubAuth, NotInstalled
from ephemera.github.outbox import Reporter
from ephemera.github.reports import closed_reason, marker
from ephemera.kube import Kube, load_api_client
from ephemera.transitions import Transition
from tests.test_operator import SHA_A, SHA_B, make_env, status, wait_phase

INSTALLATION = 4242


def repo_name() -> str:
    return f"octo/gh-{uuid.uuid4().hex[:6]}"


def statuses(github: FakeGitHub, repo: str, sha: str) -> list[str]:
    return [s["state"] for s in github.statuses.get(f"{repo}@{sha}", [])]


def comments(github: FakeGitHub, repo: str, pr: int) -> list[dict[str, Any]]:
    issue_url = github.url(f"/repos/{repo}/issues/{pr}")
    return [c for c in github.comments.values() if c["issue_url"] == issue_url]


def deployments(github: FakeGitHub, repo: str) -> list[dict[str, Any]]:
    return [d for d in github.deployments.values() if d["repository"] == repo]


def deployment_states(github: FakeGitHub, deployment_id: int) -> list[str]:
    return [s["state"] for s in github.deployment_statuses[deployment_id]]


def settled(states: list[str], first: str = "pending") -> bool:
    """`first` then `success`, or `success` alone when the first state was overtaken before it was posted
    (newest wins): never backwards, never twice."""
    return states in ([first, "success"], ["success"])


def reported(kubectl: Kubectl, name: str) -> dict[str, Any]:
    data: dict[str, Any] = status(kubectl, name).get("reported") or {}
    return data


def test_full_lifecycle_reports_in_order(operator: Process, kubectl: Kubectl, github: FakeGitHub) -> None:
    repo, name = repo_name(), f"gh-life-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(name, 1, repo=repo, installationId=INSTALLATION))
    wait_phase(kubectl, name, "Ready")
    wait_for(lambda: settled(statuses(github, repo, SHA_A)), timeout=30, what="statuses for A")
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=30, what="comment")

    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    wait_for(lambda: settled(statuses(github, repo, SHA_B)), timeout=60, what="statuses for B")
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_B}", timeout=30, what="comment at B")

    kubectl.run("annotate", "pe", name, "ephemera.dev/closed-reason=merged")
    kubectl.run("delete", "pe", name, "--wait=true", "--timeout=90s")
    wait_for(
        lambda: "merged" in (comments(github, repo, 1) or [{"body": ""}])[0]["body"], timeout=30, what="closing comment"
    )
    found = comments(github, repo, 1)
    assert len(found) == 1, "one sticky comment per PR"
    assert found[0]["edits"] >= 2  # edited in place: at least the new commit and the teardown
    assert "torn down" in found[0]["body"]
    assert "<!-- ephemera:preview" in found[0]["body"]
    # Statuses carry the context and never go backwards.
    assert settled(statuses(github, repo, SHA_A))
    assert {s["context"] for s in github.statuses[f"{repo}@{SHA_A}"]} == {"ephemera/preview"}
    deps = deployments(github, repo)
    assert [(d["sha"], d["environment"], d["transient_environment"]) for d in deps] == [
        (SHA_A, "pr-1", True),
        (SHA_B, "pr-1", True),
    ]
    assert settled(deployment_states(github, deps[0]["id"]), first="in_progress")
    wait_for(
        lambda: (
            deployment_states(github, deps[1]["id"])[-2:] == ["success", "inactive"]
            and settled(deployment_states(github, deps[1]["id"])[:-1], first="in_progress")
        ),
        timeout=30,
        what="the last deployment to go inactive on teardown",
    )
    # The remaining GitHub rate limit, as GitHub's headers said, and the reports by kind and outcome.
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    remaining = re.search(r"^ephemera_github_rate_limit_remaining (\S+)$", text, re.M)
    assert remaining is not None
    assert 0 < float(remaining.group(1)) < 5000
    assert re.search(r"^ephemera_github_rate_limit_limit 5000\.0$", text, re.M)  # what the alert divides by
    assert 'ephemera_github_reports_total{kind="comment",outcome="success"}' in text
    # Every call carried an installation token of the App's installation, but the App's question (with
    # its JWT) of which installation covers the repository: asked once.
    assert {c.installation for c in github.calls if f"/repos/{repo}/" in c.path and c.installation} == {INSTALLATION}
    assert [c.installation for c in github.calls if c.path == f"/repos/{repo}/installation"] == [None]


def test_outages_and_rate_limits_are_recovered_without_duplicates(
    operator: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repo, name = repo_name(), f"gh-outage-{uuid.uuid4().hex[:6]}"
    github.inject(Fault(method="POST", path=f"/repos/{repo}/statuses/.*", status=502, count=3))
    github.rate_limit(path=f"/repos/{repo}/issues/.*", retry_after=1, count=2)
    github.inject(Fault(method="POST", path=f"/repos/{repo}/deployments", status=None, delay=2, count=1))
    kubectl.apply(make_env(name, 2, repo=repo, installationId=INSTALLATION))
    # GitHub failing never holds the environment back.
    wait_phase(kubectl, name, "Ready", timeout=30)
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=90, what="reports")
    assert len(comments(github, repo, 2)) == 1
    assert statuses(github, repo, SHA_A)[-1] == "success"
    assert statuses(github, repo, SHA_A).count("success") == 1
    assert len(deployments(github, repo)) == 1


def test_expired_tokens_are_renewed(operator: Process, kubectl: Kubectl, github: FakeGitHub) -> None:
    # An installation of the test's own: with the shared one, whatever else the operator reported for it
    # after the expiry (another test's environment being torn down) took the 401 and the new token first.
    unique = uuid.uuid4().hex[:6]
    installation, account = 800_000 + int(unique, 16) % 100_000, f"token-{unique}"
    github.installation(installation, account)
    warm, repo, name = f"{account}/warm", f"{account}/shop", f"gh-token-{unique}"
    kubectl.apply(make_env(f"{name}-warm", 3, repo=warm, installationId=installation))
    wait_for(
        lambda: reported(kubectl, f"{name}-warm").get("comment") == f"Ready@{SHA_A}",
        timeout=60,
        what="a token in the cache and every report of the warm-up done",
    )
    before = len(github.calls)
    github.expire_tokens(installation)  # the operator's cached installation token now answers 401
    kubectl.apply(make_env(name, 3, repo=repo, installationId=installation))
    # The refused call is retried with a fresh token; a pending overtaken meanwhile by Ready is never posted.
    wait_for(lambda: statuses(github, repo, SHA_A)[-1:] == ["success"], timeout=60, what="the success status")
    calls = github.calls[before:]
    # Refused on whichever of the installation's repositories used the old token first (a 401 names no
    # installation), then a new token asked for.
    refused = [c.at for c in calls if c.status == 401 and c.path.startswith(f"/repos/{account}/")]
    renewed = [c.at for c in calls if c.path == f"/app/installations/{installation}/access_tokens" and c.status == 201]
    assert refused, "a call was refused with the expired token"
    assert [at for at in renewed if at >= refused[0]], "a new token was asked for once the old one was refused"
    assert statuses(github, repo, SHA_A).count("success") == 1


def test_restart_mid_report_posts_nothing_twice(operator: Process, kubectl: Kubectl, github: FakeGitHub) -> None:
    repo, name = repo_name(), f"gh-restart-{uuid.uuid4().hex[:6]}"
    # Hold the first comment in flight, so the operator dies while reporting.
    # (1 s: a request in flight at a crash lands soon after it, as GitHub's do, before the restart is up.)
    github.inject(Fault(method="POST", path=f"/repos/{repo}/issues/4/comments", status=None, delay=1, count=1))
    kubectl.apply(make_env(name, 4, repo=repo, installationId=INSTALLATION))
    wait_phase(kubectl, name, "Ready")
    wait_for(
        lambda: any(c.path == f"/repos/{repo}/deployments" for c in github.calls),
        timeout=30,
        interval=0.02,
        what="reporting to be under way",
    )
    operator.restart()
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="reports")
    wait_for(lambda: len(comments(github, repo, 4)) == 1, timeout=10, what="the held comment to land")
    assert len(comments(github, repo, 4)) == 1
    assert statuses(github, repo, SHA_A).count("success") == 1
    assert len(deployments(github, repo)) == 1


def test_without_installation_reporting_is_skipped(operator: Process, kubectl: Kubectl, github: FakeGitHub) -> None:
    repo, name = repo_name(), f"gh-none-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(name, 5, repo=repo))
    wait_phase(kubectl, name, "Ready")
    assert not [c for c in github.calls if f"/repos/{repo}/" in c.path]
    wait_for(lambda: "GitHub reporting skipped" in operator.log() and name in operator.log(), timeout=30)


# Hardening (issue 14) --------------------------------------------------------------------------------------


def metrics(operator: Process) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def metric(text: str, sample: str) -> float:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def as_user(github: FakeGitHub, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A call to the local GitHub server with a user's plain token, as a person (not Ephemera) makes it."""
    request = urllib.request.Request(
        github.url(path),
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def user_comment(github: FakeGitHub, token: str, repo: str, pr: int, body: str) -> int:
    created: dict[str, Any] = as_user(github, token, "POST", f"/repos/{repo}/issues/{pr}/comments", {"body": body})
    return int(created["id"])


def transition(repo: str, pr: int, *, installation: int | None = None, **status: Any) -> Transition:
    """A Ready transition of an object that need not exist (its report is then recorded nowhere)."""
    spec: dict[str, Any] = {"repository": repo, "pullRequest": pr, "commitSha": SHA_A, "branch": "feature/x"}
    if installation is not None:
        spec["installationId"] = installation
    return Transition(
        name=f"gh-inproc-{uuid.uuid4().hex[:6]}",
        uid=str(uuid.uuid4()),
        generation=1,
        spec=spec,
        old_phase=Phase.PROVISIONING,
        phase=Phase.READY,
        reason="Ready",
        message="Preview environment is ready",
        at="2026-11-29T11:00:00Z",
        status={"phase": "Ready", "namespace": f"pr-{pr}-inproc", **status},
        # Older than the reporter's settling time, so that it is reported at once.
        occurred=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5),
    )


class LoopThread:
    """An event loop in a thread, for a Reporter run in this process (its workers are asyncio tasks)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def wait(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.wait(self.loop.shutdown_default_executor())  # reports still running in threads end first
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def app_settings(github: FakeGitHub, **overrides: Any) -> Settings:
    return Settings(
        github_api_url=github.url(""),
        github_app_id=github.app_id,
        github_private_key=SecretStr(github.private_key_pem),
        **overrides,
    )


def test_secondary_rate_limit_without_retry_after_is_retried(
    operator: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repo, name = repo_name(), f"gh-second-{uuid.uuid4().hex[:6]}"
    # Only the success status is limited: it is the one report that no later state would post again.
    github.secondary_rate_limit(path=f"/repos/{repo}/statuses/.*", method="POST", request_body='"success"')
    kubectl.apply(make_env(name, 6, repo=repo, installationId=INSTALLATION))
    wait_phase(kubectl, name, "Ready")
    wait_for(lambda: statuses(github, repo, SHA_A)[-1:] == ["success"], timeout=60, what="the success status")
    posts = [c for c in github.calls if c.method == "POST" and c.path == f"/repos/{repo}/statuses/{SHA_A}" and c.body]
    limited = [c for c in posts if c.status == 403]
    assert len(limited) == 1, "GitHub's secondary rate limit was hit once"
    retried = next(c for c in posts if c.at > limited[0].at)
    # The test operator waits 1 s (EPHEMERA_GITHUB_SECONDARY_RATE_LIMIT_DELAY), however short its other retries.
    assert retried.at - limited[0].at >= 1.0
    assert statuses(github, repo, SHA_A).count("success") == 1
    wait_for(lambda: reported(kubectl, name).get("commitStatus") == f"success@{SHA_A}", timeout=30, what="record")


@pytest.mark.parametrize("shape", ["today", "recorded"])
def test_secondary_rate_limit_waits_at_least_a_minute_by_default(
    control_plane: ControlPlane, github: FakeGitHub, shape: str
) -> None:
    repo = repo_name()
    path = f"/repos/{repo}/statuses/.*"
    if shape == "today":
        github.secondary_rate_limit(path=path, method="POST")
    else:  # the recorded 403 ("abuse detection mechanism"), without its Retry-After
        status_code, _headers, body = recorded("SpecificExceptions.testAuthenticatedRateLimitExceeded", 1)
        github.inject(Fault(method="POST", path=path, status=status_code, body=body))
    # A short cap on other retries must not bring a request sooner than GitHub's minute.
    settings = app_settings(github, github_retry_max_delay=5)
    assert settings.github_secondary_rate_limit_delay == GITHUB_SECONDARY_RATE_LIMIT_DELAY >= 60
    reporter = Reporter(settings, Kube(load_api_client(control_plane.kubeconfig)), GitHubAuth(settings))
    loop = LoopThread()
    try:
        loop.call(reporter.start)
        t = transition(repo, 7, installation=INSTALLATION)
        loop.call(reporter.listener, t)
        remaining = wait_for(lambda: loop.call(reporter.next_attempt, t.uid), timeout=30, what="a retry scheduled")
        due = time.time() + remaining
        (limited,) = [c for c in github.calls if c.path.startswith(f"/repos/{repo}/statuses/")]
        assert limited.status == 403
        assert due - limited.at >= GITHUB_SECONDARY_RATE_LIMIT_DELAY
    finally:
        loop.wait(reporter.stop())
        loop.close()


@pytest.mark.parametrize(
    ("code", "answer"),
    [
        (403, {"message": "Resource not accessible by integration", "documentation_url": "https://docs.github.com"}),
        (422, {"message": "Validation Failed", "errors": [{"resource": "Deployment", "code": "custom"}]}),
    ],
)
def test_a_refused_deployment_does_not_stop_the_comment_and_status(
    operator: Process, kubectl: Kubectl, github: FakeGitHub, code: int, answer: dict[str, Any]
) -> None:
    repo, name = repo_name(), f"gh-refused-{uuid.uuid4().hex[:6]}"
    refusal = Fault(method="POST", path=f"/repos/{repo}/deployments", status=code, body=answer, count=1000)
    github.inject(refusal)
    kubectl.apply(make_env(name, 8, repo=repo, installationId=INSTALLATION))
    wait_phase(kubectl, name, "Ready")
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the comment")
    assert statuses(github, repo, SHA_A)[-1] == "success"
    assert len(comments(github, repo, 8)) == 1
    assert deployments(github, repo) == []
    assert "deploymentId" not in reported(kubectl, name)
    assert f"GitHub refused the deployment report ({code})" in operator.log()
    refusal.count = 0


def test_a_comment_deleted_on_github_is_made_again(operator: Process, kubectl: Kubectl, github: FakeGitHub) -> None:
    repo, name = repo_name(), f"gh-deleted-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(name, 9, repo=repo, installationId=INSTALLATION))
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the comment")
    first = int(reported(kubectl, name)["commentId"])
    maintainer = github.user_token("a-maintainer")
    as_user(github, maintainer, "DELETE", f"/repos/{repo}/issues/comments/{first}")
    assert comments(github, repo, 9) == []

    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_B}", timeout=60, what="a new comment")
    (again,) = comments(github, repo, 9)
    assert again["id"] != first
    assert int(reported(kubectl, name)["commentId"]) == again["id"]
    assert "Ready" in again["body"]
    assert SHA_B[:7] in again["body"]


def test_a_users_comment_quoting_the_marker_is_left_alone(
    operator: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repo, name = repo_name(), f"gh-quote-{uuid.uuid4().hex[:6]}"
    quote = f"The bot's comment says:\n\n> {marker(repo, 10)}\n> ### Preview environment: Ready\n"
    theirs = user_comment(github, github.user_token("mallory"), repo, 10, quote)
    kubectl.apply(make_env(name, 10, repo=repo, installationId=INSTALLATION))
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the comment")
    assert github.comments[theirs]["body"] == quote
    assert github.comments[theirs]["edits"] == 0
    ours = [c for c in comments(github, repo, 10) if c["id"] != theirs]
    assert len(ours) == 1
    assert ours[0]["user"]["login"] == f"{github.app_slug}[bot]"
    assert ours[0]["performed_via_github_app"]["id"] == github.app_id
    assert int(reported(kubectl, name)["commentId"]) == ours[0]["id"]


def test_with_a_token_only_the_token_users_comments_are_edited(control_plane: ControlPlane, github: FakeGitHub) -> None:
    repo, pr = repo_name(), 11
    token = github.user_token("ephemera-ci")
    quote = f"Quoting the bot: {marker(repo, pr)}"
    theirs = user_comment(github, github.user_token("mallory"), repo, pr, quote)
    ours = user_comment(github, token, repo, pr, f"{marker(repo, pr)}\nan earlier report")
    settings = Settings(github_api_url=github.url(""), github_token=SecretStr(token))
    reporter = Reporter(settings, Kube(load_api_client(control_plane.kubeconfig)), GitHubAuth(settings))

    # Found by the marker: the token user's comment, not the older one that quotes it.
    reporter.report(transition(repo, pr))
    assert (github.comments[theirs]["body"], github.comments[theirs]["edits"]) == (quote, 0)
    assert github.comments[ours]["edits"] == 1
    assert "Ready" in github.comments[ours]["body"]
    # A comment id that names someone else's comment (status.reported is only as good as its writer).
    reporter.report(transition(repo, pr, reported={"commentId": theirs}))
    assert (github.comments[theirs]["body"], github.comments[theirs]["edits"]) == (quote, 0)
    assert github.comments[ours]["edits"] == 2
    assert len(comments(github, repo, pr)) == 2
    assert [c.status for c in github.calls if c.path == "/user"][-1:] == [200]
    # Its own comment, deleted by a maintainer while no report ran (say, the operator was restarting).
    as_user(github, github.user_token("a-maintainer"), "DELETE", f"/repos/{repo}/issues/comments/{ours}")
    reporter.report(transition(repo, pr, reported={"commentId": ours}))
    (made,) = [c for c in comments(github, repo, pr) if c["id"] != theirs]
    assert made["id"] != ours
    assert made["user"]["login"] == "ephemera-ci"


def test_the_installation_must_cover_the_repository(operator: Process, kubectl: Kubectl, github: FakeGitHub) -> None:
    account = f"victim-{uuid.uuid4().hex[:6]}"
    covered, other = f"{account}/app", f"{account}/other"
    github.installation(7001, account, {covered})
    before = metric(metrics(operator), 'ephemera_github_reports_total{kind="installation",outcome="refused"}')
    tag = uuid.uuid4().hex[:6]
    forged = {
        f"gh-forged-a-{tag}": make_env(f"gh-forged-a-{tag}", 12, repo=covered, installationId=INSTALLATION),
        f"gh-forged-b-{tag}": make_env(f"gh-forged-b-{tag}", 13, repo=other, installationId=7001),
    }
    legit = f"gh-legit-{tag}"
    for body in [*forged.values(), make_env(legit, 14, repo=covered, installationId=7001)]:
        kubectl.apply(body)
    wait_for(lambda: reported(kubectl, legit).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the legit one")
    kubectl.run("patch", "pe", legit, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    wait_for(lambda: reported(kubectl, legit).get("comment") == f"Ready@{SHA_B}", timeout=60, what="its new commit")
    for name in forged:
        wait_phase(kubectl, name, "Ready")
    wait_for(
        lambda: all(f"GitHub report for {n} refused, nothing posted" in operator.log() for n in forged),
        timeout=30,
        what="both forged objects' reports refused",
    )
    log = operator.log()
    assert f"installation {INSTALLATION} does not cover {covered} (the App's installation there is 7001)" in log
    assert f"the GitHub App is not installed on {other}" in log
    after = metric(metrics(operator), 'ephemera_github_reports_total{kind="installation",outcome="refused"}')
    assert after - before >= 2
    # Nothing reached GitHub for the forged objects: no status, comment or deployment, not even a refused one.
    assert [c.path for c in github.calls if c.path.startswith(f"/repos/{other}/")] == [f"/repos/{other}/installation"]
    assert not [c for c in github.calls if c.path.startswith(f"/repos/{covered}/issues/12")]
    assert {c.installation for c in github.calls if c.path.startswith(f"/repos/{covered}/") and c.installation} == {
        7001
    }
    # GitHub was asked once per repository: the answer is cached.
    assert len([c for c in github.calls if c.path == f"/repos/{covered}/installation"]) == 1


def test_installation_answers_expire(github: FakeGitHub) -> None:
    repo = f"solo-{uuid.uuid4().hex[:6]}/app"  # an account of its own: its installation changes below
    # The cache's clock is turned by hand: on a loaded machine two calls can be further apart than any TTL.
    now = [0.0]
    auth = GitHubAuth(app_settings(github, github_installation_cache_ttl=60), clock=lambda: now[0])

    def asked() -> int:
        return len([c for c in github.calls if c.path == f"/repos/{repo}/installation"])

    def refused() -> bool:
        try:
            auth.check_installation(INSTALLATION, repo)
        except NotInstalled:
            return True
        return False

    assert not refused()
    now[0] = 59.0
    assert not refused()
    assert asked() == 1
    now[0] = 61.0
    assert not refused()
    assert asked() == 2, "GitHub asked again once the answer expired"
    github.installation(7002, repo.split("/")[0], {f"{repo}-elsewhere"})  # the App's installation there changed
    assert not refused(), "the answer of 61 s is kept until 121 s"
    now[0] = 122.0
    assert refused(), "the new answer: the App is not installed on the repository"
    assert asked() == 3


def test_concurrent_reports_ask_for_a_repositorys_installation_once(github: FakeGitHub) -> None:
    repo = f"octo/gh-{uuid.uuid4().hex[:6]}"
    # A slow answer: every worker that reports on the repository meanwhile waits for it, none asks again.
    github.inject(Fault(method="GET", path=f"/repos/{repo}/installation", status=None, delay=0.5))
    auth = GitHubAuth(app_settings(github))

    at_once(lambda: auth.check_installation(INSTALLATION, repo))

    assert len([c for c in github.calls if c.path == f"/repos/{repo}/installation"]) == 1


def at_once(call: Callable[[], object], workers: int = 4) -> list[object]:
    """What `call` returned in each of `workers` threads started together (as the reporter's workers in
    a burst); fails with the first exception one of them raised (a thread's own would be lost)."""
    results: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(call())
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    return results


@pytest.mark.parametrize(
    ("annotation", "reason"),
    [
        ("merged", "merged"),
        ("closed", "closed"),
        ("converted to draft", "converted-to-draft"),
        ("converted-to-draft", "converted-to-draft"),
        (None, "deleted"),
        ("merged. [Claim your prize](https://evil.example)", "unknown"),
        ("", "unknown"),
    ],
)
def test_closed_reasons_are_a_fixed_set(annotation: str | None, reason: str) -> None:
    annotations = {} if annotation is None else {CLOSED_REASON: annotation}
    assert closed_reason(annotations) == reason


def test_the_closed_reason_annotation_never_reaches_the_comment(
    operator: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repo, name = repo_name(), f"gh-reason-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(name, 15, repo=repo, installationId=INSTALLATION))
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the comment")
    text = "merged. [Claim your prize](https://evil.example/phish) @everyone"
    kubectl.run("annotate", "pe", name, f"{CLOSED_REASON}={text}")
    kubectl.run("delete", "pe", name, "--wait=true", "--timeout=90s")
    wait_for(lambda: "torn down" in comments(github, repo, 15)[0]["body"], timeout=30, what="the teardown comment")
    body = comments(github, repo, 15)[0]["body"]
    assert "evil.example" not in body
    assert "Claim" not in body
    assert "torn down: the environment was deleted" in body


def test_concurrent_reports_ask_for_an_installations_token_once(github: FakeGitHub) -> None:
    installation = 900_000 + uuid.uuid4().int % 100_000  # an id no other test installs
    github.installation(installation, f"solo-{uuid.uuid4().hex[:6]}")
    tokens = f"/app/installations/{installation}/access_tokens"
    before = len(github.calls)
    # A slow answer: every worker that needs the token meanwhile waits for it, none asks for another.
    github.inject(Fault(method="POST", path=tokens, status=None, delay=0.5))
    auth = GitHubAuth(app_settings(github))

    clients = at_once(lambda: auth.client_for(installation))

    assert len(clients) == 4
    assert len({id(c) for c in clients}) == 1, "every worker got the one client"
    assert len([c for c in github.calls[before:] if c.path == tokens]) == 1
