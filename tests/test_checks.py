"""The PR's check run (named after the status context) and the comment's failure section, against the
local GitHub server: through the operator on the real control plane, and in-process for the reporter's
own rules (one run per commit and attempt, never reopened; skipped with a plain token; attacker text
only inside code)."""

from __future__ import annotations

import datetime
import json
import logging
import re
import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from devtools.controlplane import ControlPlane
from devtools.fakegithub import FakeGitHub, Fault
from devtools.support import Kubectl, Process, wait_for
from ephemera.api.models import parse_phase
from ephemera.config import Settings
from ephemera.github.client import GitHubAuth
from ephemera.github.markdown import code, fenced, link
from ephemera.github.outbox import Reporter
from ephemera.github.reports import comment_body, reported_is_current
from ephemera.kube import Kube, load_api_client
from ephemera.transitions import Transition
from tests.test_apps import put_template, templates, web  # noqa: F401 (templates is a fixture)
from tests.test_github import INSTALLATION, app_settings, comments, reported, statuses
from tests.test_operator import SHA_A, SHA_B, make_env, status, unique, wait_phase

CONTEXT = "ephemera/preview"


def check_runs(github: FakeGitHub, repo: str, sha: str) -> list[dict[str, Any]]:
    """The commit's check runs, oldest first."""
    runs = [r for r in github.check_runs.values() if r["repository"] == repo and r["head_sha"] == sha]
    return sorted(runs, key=lambda r: int(r["id"]))


def newest(github: FakeGitHub, repo: str, sha: str) -> dict[str, Any]:
    runs = check_runs(github, repo, sha)
    return runs[-1] if runs else {}


def check_run_posts(github: FakeGitHub, repo: str) -> list[Any]:
    return [c for c in github.calls if c.path.startswith(f"/repos/{repo}/check-runs") and c.method != "GET"]


def outside_code(markdown: str) -> str:
    """What GitHub renders as Markdown: the text without its fenced code blocks and code spans (by
    CommonMark's rules: a fence of 3+ backticks closes at a line of at least as many; a run of n
    backticks opens a span that the next run of exactly n closes)."""
    kept, fence = [], ""
    for line in markdown.split("\n"):
        opening = re.match(r"(`{3,})[^`]*$", line)
        if not fence and opening:
            fence = opening.group(1)
        elif fence:
            if re.fullmatch(rf"{fence}`*\s*", line):
                fence = ""
        else:
            kept.append(line)
    text, out, i = "\n".join(kept), [], 0
    while True:
        start = re.compile(r"`+").search(text, i)
        if start is None:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i : start.start()])
        close = next((m for m in re.finditer(r"`+", text[start.end() :]) if len(m.group()) == len(start.group())), None)
        if close is None:
            out.append(start.group())  # a lone run is literal backticks
            i = start.end()
        else:
            i = start.end() + close.end()


# Through the operator ------------------------------------------------------------------------------------


def test_a_crash_loop_fails_with_its_cause_on_the_pr_and_a_retry_of_the_fixed_template_succeeds(
    operator: Process,
    kubectl: Kubectl,
    github: FakeGitHub,
    templates: list[str],  # noqa: F811
) -> None:
    repo = f"octo/check-{uuid.uuid4().hex[:6]}"
    template = unique("check")
    spec: dict[str, Any] = {"repositories": [repo], "url": "https://{{ host }}/"}
    put_template(kubectl, templates, template, resources=[web(simulate="crash-loop")], **spec)
    name = unique("check")
    kubectl.apply(make_env(name, 21, repo=repo, installationId=INSTALLATION))

    failed = wait_phase(kubectl, name, "Failed", timeout=120)
    assert failed["reason"] == "RolloutFailed"
    problems = failed["problems"]
    assert problems, "the failing objects, structured, on the object"
    assert {p["kind"] for p in problems} == {"Pod"}
    assert {p["reason"] for p in problems} == {"CrashLoopBackOff"}
    assert all(p["name"].startswith("web-") and "container web" in p["message"] for p in problems)

    # The check run of the commit: completed as a failure, its summary naming the pods and the cause.
    wait_for(
        lambda: reported(kubectl, name).get("checkRun") == f"failure@{SHA_A}", timeout=60, what="the failure reported"
    )
    run = newest(github, repo, SHA_A)
    assert (run["name"], run["status"], run["conclusion"]) == (CONTEXT, "completed", "failure")
    assert run["output"]["title"] == "Preview failed: RolloutFailed"
    summary = run["output"]["summary"]
    for problem in problems:
        assert problem["name"] in summary
    assert "CrashLoopBackOff" in summary
    assert "container web" in summary
    assert run["installation"] == INSTALLATION
    # The comment's failure section says the same.
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Failed@{SHA_A}", timeout=60, what="the comment")
    (comment,) = comments(github, repo, 21)
    assert "Why it failed" in comment["body"]
    assert "CrashLoopBackOff" in comment["body"]
    assert problems[0]["name"] in comment["body"]

    # Fixed, then retried: Ready with the URL, and the commit's check run (a new attempt's) a success.
    put_template(kubectl, templates, template, resources=[web()], **spec)
    kubectl.run("annotate", "pe", name, f"ephemera.dev/retry={uuid.uuid4().hex[:6]}", "--overwrite")
    ready = wait_phase(kubectl, name, "Ready", timeout=120)
    assert "problems" not in ready, "the failure's problems go with it"
    url = ready["url"]
    wait_for(
        lambda: reported(kubectl, name).get("checkRun") == f"success@{SHA_A}", timeout=60, what="the success reported"
    )
    run = newest(github, repo, SHA_A)
    assert (run["status"], run["conclusion"], run["details_url"]) == ("completed", "success", url)
    assert f"<{url}>" in run["output"]["summary"]
    runs = check_runs(github, repo, SHA_A)
    assert 2 <= len(runs) <= 3, "one per attempt (the first, the retry, and a re-apply of the edited template)"
    assert [r["conclusion"] for r in runs][-1:] == ["success"]
    assert "failure" in [r["conclusion"] for r in runs]  # the failed attempt keeps its conclusion
    assert {r["name"] for r in runs} == {CONTEXT}
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the comment")
    (comment,) = comments(github, repo, 21)
    assert f"**Open the preview:** <{url}>" in comment["body"]
    assert "Why it failed" not in comment["body"]


def test_a_push_completes_its_own_check_run_and_leaves_the_old_commits_alone(
    operator: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    repo, name = f"octo/check-{uuid.uuid4().hex[:6]}", unique("check-push")
    kubectl.apply(make_env(name, 22, repo=repo, installationId=INSTALLATION))
    wait_for(lambda: reported(kubectl, name).get("checkRun") == f"success@{SHA_A}", timeout=60, what="A's success")
    first = newest(github, repo, SHA_A)
    kubectl.run("patch", "pe", name, "--type=merge", "-p", json.dumps({"spec": {"commitSha": SHA_B}}))
    wait_for(lambda: reported(kubectl, name).get("checkRun") == f"success@{SHA_B}", timeout=60, what="B's success")
    (run_b,) = check_runs(github, repo, SHA_B)
    assert (run_b["status"], run_b["conclusion"]) == ("completed", "success")
    assert check_runs(github, repo, SHA_A) == [first]
    assert first["conclusion"] == "success"
    assert int(reported(kubectl, name)["checkRunId"]) == run_b["id"]


def test_restart_mid_check_run_makes_no_second_one(operator: Process, kubectl: Kubectl, github: FakeGitHub) -> None:
    repo, name = f"octo/check-{uuid.uuid4().hex[:6]}", unique("check-restart")
    # Hold the check run's creation in flight, and kill the operator while it is: the run lands on
    # GitHub, but the object never records it. The restarted operator must read it back.
    held = Fault(method="POST", path=f"/repos/{repo}/check-runs", status=None, delay=1, count=1)
    github.inject(held)
    kubectl.apply(make_env(name, 23, repo=repo, installationId=INSTALLATION))
    wait_phase(kubectl, name, "Ready")
    wait_for(lambda: held.count == 0, timeout=30, interval=0.02, what="the check run's creation in flight")
    operator.restart()
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the reports")
    wait_for(lambda: reported(kubectl, name).get("checkRun") == f"success@{SHA_A}", timeout=30, what="the check run")
    (run,) = check_runs(github, repo, SHA_A)
    assert (run["status"], run["conclusion"]) == ("completed", "success")
    assert int(reported(kubectl, name)["checkRunId"]) == run["id"]
    assert statuses(github, repo, SHA_A).count("success") == 1


def test_an_app_without_checks_permission_still_posts_the_other_reports(
    operator: Process, kubectl: Kubectl, github: FakeGitHub
) -> None:
    account = f"nochecks-{uuid.uuid4().hex[:6]}"
    repo, name = f"{account}/app", unique("check-denied")
    github.installation(
        7101, account, permissions={"statuses": "write", "pull_requests": "write", "deployments": "write"}
    )
    kubectl.apply(make_env(name, 24, repo=repo, installationId=7101))
    wait_for(lambda: reported(kubectl, name).get("comment") == f"Ready@{SHA_A}", timeout=60, what="the comment")
    assert statuses(github, repo, SHA_A)[-1] == "success"
    assert reported(kubectl, name).get("deploymentState", "").startswith("success@")
    assert check_runs(github, repo, SHA_A) == []
    assert "checkRun" not in reported(kubectl, name)
    refused = [c for c in github.calls if c.path == f"/repos/{repo}/check-runs"]
    assert refused
    assert {c.status for c in refused} == {403}
    assert "GitHub refused the check_run report (403)" in operator.log()


# The reporter in this process -----------------------------------------------------------------------------


def transition(
    repo: str, pr: int, phase: str, *, installation: int | None = INSTALLATION, sha: str = SHA_A, **status: Any
) -> Transition:
    """A transition of an object that need not exist (its report is then recorded nowhere)."""
    spec: dict[str, Any] = {"repository": repo, "pullRequest": pr, "commitSha": sha, "branch": "feature/x"}
    if installation is not None:
        spec["installationId"] = installation
    reasons = {"Failed": "RolloutFailed", "Provisioning": "RollingOut"}
    return Transition(
        name=f"check-inproc-{uuid.uuid4().hex[:6]}",
        uid=status.pop("uid", str(uuid.uuid4())),
        generation=1,
        spec=spec,
        old_phase=None,
        phase=parse_phase(phase),
        reason=status.pop("reason", reasons.get(phase, phase)),
        message=status.pop("message", f"{phase} for commit {sha[:7]}"),
        at="2026-11-29T12:00:00Z",
        status={"phase": phase, "namespace": f"pr-{pr}-inproc", **status},
        occurred=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5),
    )


@pytest.fixture
def reporter(control_plane: ControlPlane, github: FakeGitHub) -> Reporter:
    settings = app_settings(github)
    return Reporter(settings, Kube(load_api_client(control_plane.kubeconfig)), GitHubAuth(settings))


def test_one_check_run_per_commit_and_attempt_completed_in_place_never_reopened_nor_left_open(
    reporter: Reporter, github: FakeGitHub
) -> None:
    repo, uid, url = f"octo/check-{uuid.uuid4().hex[:6]}", str(uuid.uuid4()), "https://pr-31.preview.localhost/"
    reporter.report(transition(repo, 31, "Provisioning", uid=uid))
    (run,) = check_runs(github, repo, SHA_A)
    assert (run["name"], run["status"], run["conclusion"]) == (CONTEXT, "in_progress", None)
    assert run["output"]["title"] == "Provisioning the preview"
    assert run["external_id"] == uid

    reporter.report(transition(repo, 31, "Ready", uid=uid, url=url))
    (run,) = check_runs(github, repo, SHA_A)  # the same run, completed
    assert (run["status"], run["conclusion"], run["details_url"]) == ("completed", "success", url)
    assert run["output"]["summary"] == f"The preview of commit `{SHA_A[:7]}` is ready at <{url}>."
    posts = len(check_run_posts(github, repo))

    reporter.report(transition(repo, 31, "Ready", uid=uid, url=url))  # the same state again: nothing posted
    assert len(check_run_posts(github, repo)) == posts

    # Provisioned again (a retry): a completed run is never reopened; the new attempt gets its own.
    reporter.report(transition(repo, 31, "Provisioning", uid=uid))
    first, second = check_runs(github, repo, SHA_A)
    assert (first["status"], first["conclusion"]) == ("completed", "success")
    assert (second["status"], second["conclusion"]) == ("in_progress", None)
    # A push before it was ready: that run is completed (cancelled), the new commit gets its own.
    reporter.report(transition(repo, 31, "Updating", uid=uid, sha=SHA_B))
    assert [(r["status"], r["conclusion"]) for r in check_runs(github, repo, SHA_A)] == [
        ("completed", "success"),
        ("completed", "cancelled"),
    ]
    assert check_runs(github, repo, SHA_A)[1]["output"]["title"] == "Preview superseded"
    (run_b,) = check_runs(github, repo, SHA_B)
    assert (run_b["status"], run_b["output"]["title"]) == ("in_progress", "Updating the preview")
    # Torn down before it was ready: the open run is cancelled, not left in progress.
    reporter.report(transition(repo, 31, "Destroying", uid=uid, sha=SHA_B))
    (run_b,) = check_runs(github, repo, SHA_B)
    assert (run_b["status"], run_b["conclusion"]) == ("completed", "cancelled")
    assert run_b["output"]["title"] == "Preview torn down"
    # Runs are edited by id, never read first.
    assert not [c for c in github.calls if c.method == "GET" and c.path.startswith(f"/repos/{repo}/check-runs/")]


def test_a_run_left_in_progress_by_an_earlier_process_is_completed_in_place(
    control_plane: ControlPlane, github: FakeGitHub
) -> None:
    repo, uid = f"octo/check-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    settings = app_settings(github)

    def process() -> Reporter:
        return Reporter(settings, Kube(load_api_client(control_plane.kubeconfig)), GitHubAuth(settings))

    process().report(transition(repo, 36, "Provisioning", uid=uid))
    (run,) = check_runs(github, repo, SHA_A)
    recorded = {"checkRunId": run["id"], "checkRun": f"in_progress@{SHA_A}"}
    process().report(transition(repo, 36, "Ready", uid=uid, reported=recorded))  # as the object says
    (run,) = check_runs(github, repo, SHA_A)
    assert (run["status"], run["conclusion"]) == ("completed", "success")


def test_with_a_plain_token_check_runs_are_skipped_with_one_log_line(
    control_plane: ControlPlane, github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    repo = f"octo/check-{uuid.uuid4().hex[:6]}"
    settings = Settings(github_api_url=github.url(""), github_token=SecretStr(github.user_token("ephemera-ci")))
    reporter = Reporter(settings, Kube(load_api_client(control_plane.kubeconfig)), GitHubAuth(settings))
    with caplog.at_level(logging.INFO, logger="ephemera.github.outbox"):
        reporter.report(transition(repo, 32, "Ready", installation=None))
        reporter.report(transition(repo, 33, "Failed", installation=None))
    assert not [c for c in github.calls if c.path.startswith(f"/repos/{repo}/check-runs")], "refused to tokens"
    skipped = [r for r in caplog.records if "check runs skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert statuses(github, repo, SHA_A) == ["success", "error"]  # the other reports still go out
    assert len(comments(github, repo, 32)) == len(comments(github, repo, 33)) == 1


HOSTILE = "x`` [Claim your prize](https://evil.example/p) @everyone <img src=x onerror=alert(1)> | ``` :tada:\n# H"


def test_failure_text_reaches_github_only_inside_code(reporter: Reporter, github: FakeGitHub) -> None:
    repo = f"octo/check-{uuid.uuid4().hex[:6]}"
    problems = [
        {"kind": "Pod", "name": "web-1", "reason": "CrashLoopBackOff", "message": f"container web: {HOSTILE}"},
        {"kind": "Job", "name": "migrate", "reason": HOSTILE, "message": HOSTILE},
    ]
    bad_url = "https://evil.example/|[a](https://evil.example)"
    t = transition(
        repo, 34, "Failed", problems=problems, message=f"The app cannot become ready: {HOSTILE}", url=bad_url
    )
    reporter.report(t)
    (run,) = check_runs(github, repo, SHA_A)
    (comment,) = comments(github, repo, 34)
    assert run["details_url"] is None, "only a plain URL is handed to GitHub as the details URL"
    for text in (run["output"]["summary"], comment["body"]):
        assert "CrashLoopBackOff" in text
        assert "web-1" in text
        assert "migrate" in text
        rendered = outside_code(text)
        for bad in ("evil.example", "@everyone", "<img", ":tada:", "# H", "Claim"):
            assert bad not in rendered, (bad, rendered)
    table_rows = [line for line in comment["body"].split("\n") if line.startswith("| URL")]
    assert len(table_rows) == 1
    assert table_rows[0].count("|") - table_rows[0].count("\\|") == 3


def test_markdown_helpers_keep_text_as_text() -> None:
    assert code("a `b` c") == "``a `b` c``"
    assert code("`x`") == "`` `x` ``"
    assert code("line\nbreak\u202e") == "`line break`"
    assert code("") == "` `"
    assert fenced("```\nstill text") == "````text\n```\nstill text\n````"
    assert link("https://pr-1.preview.localhost/") == "<https://pr-1.preview.localhost/>"
    assert link("javascript:alert(1)") == "`javascript:alert(1)`"
    assert link("https://a/|b") == "`https://a/\\|b`"
    for text in ("[a](https://evil.example)", "@everyone", "<b>x</b>", "``` x"):
        assert outside_code(code(text)) == ""
        assert outside_code(fenced(text)) == ""


def test_a_ready_comment_links_the_url_and_a_check_run_state_outdated_is_resumed() -> None:
    url = "https://pr-5.preview.localhost/"
    body = comment_body(transition("octo/shop", 5, "Ready", url=url))
    assert f"| URL | <{url}> |" in body
    assert f"**Open the preview:** <{url}>" in body
    current = {
        "commitStatus": f"success@{SHA_A}",
        "deploymentSha": SHA_A,
        "deploymentState": "success@1",
        "comment": f"Ready@{SHA_A}",
    }
    spec = {"commitSha": SHA_A}
    assert reported_is_current({"phase": "Ready", "reported": current}, spec)  # no check run ever (a token)
    with_run = {**current, "checkRunId": 9, "checkRun": f"in_progress@{SHA_A}"}
    assert not reported_is_current({"phase": "Ready", "reported": with_run}, spec)
    assert reported_is_current({"phase": "Ready", "reported": {**with_run, "checkRun": f"success@{SHA_A}"}}, spec)


def test_status_problems_are_checked_by_the_crd(kubectl: Kubectl, operator: Process) -> None:
    name = unique("check-crd")
    kubectl.apply(make_env(name, 35, repo=f"octo/check-{uuid.uuid4().hex[:6]}"))
    wait_phase(kubectl, name, "Ready")
    too_many = {"status": {"problems": [{"kind": "Pod", "name": f"p{i}", "reason": "R"} for i in range(11)]}}
    result = kubectl.run(
        "patch", "pe", name, "--subresource=status", "--type=merge", "-p", json.dumps(too_many), check=False
    )
    assert result.returncode != 0
    assert "must have at most 10 items" in result.stderr
    no_reason = {"status": {"problems": [{"kind": "Pod", "name": "p"}]}}
    result = kubectl.run(
        "patch", "pe", name, "--subresource=status", "--type=merge", "-p", json.dumps(no_reason), check=False
    )
    assert result.returncode != 0
    assert "reason" in result.stderr
    assert "problems" not in status(kubectl, name)
