"""GitHub reporting through a GitHub App, against the local GitHub API server."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from tests.fakegithub import FakeGitHub, Fault
from tests.support import Kubectl, Process, wait_for
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
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{operator.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    remaining = re.search(r"^ephemera_github_rate_limit_remaining (\S+)$", text, re.M)
    assert remaining is not None
    assert 0 < float(remaining.group(1)) < 5000
    assert 'ephemera_github_reports_total{kind="comment",outcome="success"}' in text
    # Every call carried an installation token of the App's installation.
    assert {c.installation for c in github.calls if f"/repos/{repo}/" in c.path} == {INSTALLATION}


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
    warm, repo, name = repo_name(), repo_name(), f"gh-token-{uuid.uuid4().hex[:6]}"
    kubectl.apply(make_env(f"{name}-warm", 3, repo=warm, installationId=INSTALLATION))
    wait_for(
        lambda: reported(kubectl, f"{name}-warm").get("comment") == f"Ready@{SHA_A}",
        timeout=60,
        what="a token in the cache and every report of the warm-up done",
    )
    github.tokens.clear()  # the operator's cached installation token now answers 401
    kubectl.apply(make_env(name, 3, repo=repo, installationId=INSTALLATION))
    # The refused call is retried with a fresh token; a pending overtaken meanwhile by Ready is never posted.
    wait_for(lambda: statuses(github, repo, SHA_A)[-1:] == ["success"], timeout=60, what="the success status")
    refused = [c for c in github.calls if c.status == 401 and c.path.startswith(f"/repos/{repo}/")]
    assert refused, "the first call was refused with the old token"
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
