"""What Ephemera tells a PR about each state, built from the transition alone: the commit status, the
check run, the sticky comment and the Deployment's status. Pure functions (no I/O, no clock): the outbox
(`outbox.py`) decides when and sends them, and records each one's key in `status.reported`, so that a
state is reported once.

What a failure names (pod messages, Events, a template's URL) may carry text from the PR, so it reaches
GitHub only inside code spans and blocks (`markdown.py`); the closing reason is one of a fixed set,
never the annotation's text.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any

from ephemera.api.models import DESTROYED, Phase, TransitionPhase, parse_phase
from ephemera.api.naming import CLOSED_REASON_ANNOTATION
from ephemera.github.markdown import code, fenced, link, safe_url
from ephemera.transitions import Transition

# What a teardown comment may say about why: the annotation's value picks one of these, never itself
# reaches the comment (anyone who may patch the object may write it). "deleted": no annotation (the
# object was deleted directly); "unknown": an annotation that is none of the others.
TEARDOWN_REASONS = {
    "merged": "the PR was merged",
    "closed": "the PR was closed",
    "converted-to-draft": "the PR was converted to draft",
    "opt-in-label-removed": "the PR's opt-in label was removed",
    "approval-needed": "a new push from the fork needs approval again (a writer re-applies the approval label)",
    "policy": "the policy no longer admits the PR",
    "deleted": "the environment was deleted",
    "unknown": "the environment was deleted",
}
# Each report's state by phase; a phase that is not named here leaves that report as it is.
COMMIT_STATES: dict[TransitionPhase, tuple[str, str]] = {
    Phase.PROVISIONING: ("pending", "Preview environment is being provisioned"),
    Phase.UPDATING: ("pending", "Preview environment is being updated"),
    Phase.READY: ("success", "Preview environment is ready"),
    Phase.FAILED: ("failure", "Preview environment failed"),
    Phase.QUEUED: ("pending", "Preview environment is queued"),
}
DEPLOYMENT_STATES: dict[TransitionPhase, str] = {
    Phase.PROVISIONING: "in_progress",
    Phase.UPDATING: "in_progress",
    Phase.READY: "success",
    Phase.FAILED: "failure",
    Phase.DESTROYING: "inactive",
    Phase.QUEUED: "queued",
    Phase.EXPIRED: "inactive",
}
# A check run's status, or its conclusion once completed. Destroying completes an open run as
# `cancelled` (see check_run_state); other phases leave the commit's check run as it is.
CHECK_RUN_STATES: dict[TransitionPhase, str] = {
    Phase.PROVISIONING: "in_progress",
    Phase.UPDATING: "in_progress",
    Phase.READY: "success",
    Phase.FAILED: "failure",
}
CHECK_RUN_TITLES: dict[TransitionPhase, str] = {
    Phase.PROVISIONING: "Provisioning the preview",
    Phase.UPDATING: "Updating the preview",
    Phase.READY: "Preview ready",
    Phase.FAILED: "Preview failed",
}
CHECK_RUN_CANCELLED_TITLE = "Preview torn down"
# The teardown: what ends an open check run and turns the comment into a teardown notice.
TEARDOWN_PHASES: frozenset[TransitionPhase] = frozenset({Phase.DESTROYING, DESTROYED})
PROBLEMS_SHOWN = 10  # objects a failure section lists (status.problems holds at most as many)
ICONS: dict[TransitionPhase, str] = {
    Phase.READY: "🟢",
    Phase.FAILED: "🔴",
    Phase.DESTROYING: "⚪",
    Phase.PROVISIONING: "🟡",
    Phase.UPDATING: "🟡",
    Phase.QUEUED: "⏳",
    Phase.EXPIRED: "💤",
}
# How an Expired preview comes back, on the PR.
REVIVE = "**To bring it back:** push a commit, or comment `/preview wake` (someone with write access)."


def closed_reason(annotations: dict[str, str]) -> str:
    """The teardown's reason as one of TEARDOWN_REASONS' keys, whatever the annotation holds."""
    raw = annotations.get(CLOSED_REASON_ANNOTATION)
    if raw is None:
        return "deleted"
    reason = raw.strip().lower().replace(" ", "-").replace("_", "-")
    return reason if reason in TEARDOWN_REASONS and reason != "unknown" else "unknown"


def marker(repository: str, pr: int) -> str:
    """The hidden marker that finds Ephemera's one comment on a PR again."""
    return f"<!-- ephemera:preview {repository.lower()}#{pr} -->"


def failure_section(t: Transition, *, detail: bool) -> str:
    """Why the environment failed, as Markdown: its reason and the failing objects with their causes
    (status.problems), each in a code span; the message in a code block when there is no list (or
    with `detail`). Nothing here is rendered as Markdown: pod messages and Events may quote the PR."""
    problems = [p for p in t.status.get("problems") or [] if isinstance(p, dict)]
    lines = [f"**Why it failed:** {code(t.reason or 'Failed', 80)}"]
    if problems:
        lines.append("")
        for problem in problems[:PROBLEMS_SHOWN]:
            what = code(f"{problem.get('kind', '')} {problem.get('name', '')}", 200)
            lines.append(
                f"- {what}: {code(str(problem.get('reason', '')), 80)}: {code(str(problem.get('message', '')))}"
            )
        if len(problems) > PROBLEMS_SHOWN:
            lines.append(f"- and {len(problems) - PROBLEMS_SHOWN} more")
    if detail or not problems:
        lines += ["", fenced(t.message)]
    else:
        lines += ["", "Fix the PreviewTemplate (or the image), then push or retry."]
    return "\n".join(lines)


def comment_body(t: Transition) -> str:
    spec, status = t.spec, t.status
    sha = str(spec["commitSha"])
    url = str(status.get("url") or "")
    if t.phase in TEARDOWN_PHASES:
        title = f"⚪ Preview environment torn down: {TEARDOWN_REASONS[closed_reason(t.annotations)]}"
        what = "is being removed" if t.phase is Phase.DESTROYING else "has been removed"
        summary = f"The environment for commit `{sha[:7]}` in namespace `{status.get('namespace', '-')}` {what}."
    elif t.phase is Phase.FAILED:
        title = f"{ICONS[Phase.FAILED]} Preview environment: {Phase.FAILED}"
        summary = failure_section(t, detail=False)
    elif t.phase is Phase.QUEUED:
        title = f"{ICONS[Phase.QUEUED]} Preview environment: {Phase.QUEUED}"
        position = status.get("queuePosition")
        summary = t.message
        if isinstance(position, int):
            summary = f"**Position in the queue:** {position}\n\n{summary}"
    elif t.phase is Phase.EXPIRED:
        title = f"{ICONS[Phase.EXPIRED]} Preview environment: {Phase.EXPIRED}"
        summary = f"{t.message}\n\n{REVIVE}"
    else:
        title = f"{ICONS.get(t.phase, '')} Preview environment: {t.phase}".strip()
        summary = t.message
        if t.phase is Phase.READY and url:
            summary += f"\n\n**Open the preview:** {link(url)}"
    rows = [
        ("Phase", f"**{t.phase}**"),
        ("Namespace", f"`{status.get('namespace') or '-'}`"),
        ("Commit", f"`{sha[:7]}`"),
        ("Updated", t.at),
    ]
    if url:
        rows.append(("URL", link(url)))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"{marker(str(spec['repository']), int(spec['pullRequest']))}\n### {title}\n\n"
        f"| | |\n|---|---|\n{table}\n\n{summary}\n"
    )


def check_run_output(t: Transition, state: str) -> dict[str, str]:
    """The check run's title and summary for `state` (a CHECK_RUN_STATES value, or `cancelled`)."""
    sha = str(t.spec["commitSha"])
    namespace = code(str(t.status.get("namespace") or "-"), 80)
    url = str(t.status.get("url") or "")
    if state == "cancelled":
        title = CHECK_RUN_CANCELLED_TITLE
        summary = f"The environment for commit `{sha[:7]}` was torn down before it was ready."
    elif state == "in_progress":
        title = CHECK_RUN_TITLES.get(t.phase, "Preview in progress")
        doing = "updated" if t.phase is Phase.UPDATING else "provisioned"
        summary = f"The preview of commit `{sha[:7]}` is being {doing} in namespace {namespace}."
    elif state == "success":
        title = CHECK_RUN_TITLES[Phase.READY]
        where = f"at {link(url)}" if url else f"in namespace {namespace}"
        summary = f"The preview of commit `{sha[:7]}` is ready {where}."
    else:
        reason = re.sub(r"[^A-Za-z0-9]", "", t.reason)[:60]
        title = f"{CHECK_RUN_TITLES[Phase.FAILED]}: {reason}" if reason else CHECK_RUN_TITLES[Phase.FAILED]
        summary = f"The preview of commit `{sha[:7]}` in namespace {namespace} failed.\n\n" + failure_section(
            t, detail=True
        )
    return {"title": title, "summary": summary}


@dataclass(frozen=True)
class Payload:
    """One report: the arguments of the API call that posts it, and the key `status.reported` keeps
    once it is posted (the same key means the same report: it is not posted again)."""

    key: str
    fields: dict[str, Any]


def commit_state(phase: TransitionPhase, *, permanent: bool) -> tuple[str, str] | None:
    """The commit status's state and description for `phase`, or None for a phase that posts none.

    A failure that will be retried is an `error` (GitHub: it may pass), one that will not a `failure`."""
    known = COMMIT_STATES.get(phase)
    if known is None:
        return None
    state, description = known
    if phase is Phase.FAILED and not permanent:
        state = "error"
    return state, description


def commit_status(t: Transition, context: str) -> Payload | None:
    """The commit status of `t`'s commit under `context`, or None when its phase posts none."""
    decided = commit_state(t.phase, permanent=bool(t.status.get("permanent")))
    if decided is None:
        return None
    state, description = decided
    fields: dict[str, Any] = {"state": state, "description": description[:140], "context": context}
    if t.status.get("url"):
        fields["target_url"] = str(t.status["url"])
    return Payload(f"{state}@{t.spec['commitSha']}", fields)


def check_run_state(phase: TransitionPhase, *, open_run: bool) -> str | None:
    """The check run's status (or conclusion) for `phase`; None leaves the run as it is. A teardown
    completes a run still in progress (`open_run`) as `cancelled`: it must not stay in progress."""
    state = CHECK_RUN_STATES.get(phase)
    if state is None and phase in TEARDOWN_PHASES and open_run:
        return "cancelled"
    return state


def check_run(t: Transition, state: str, now: datetime.datetime) -> Payload:
    """The check run's fields for `state` (from check_run_state), completed at `now` unless in progress."""
    fields: dict[str, Any] = {"output": check_run_output(t, state)}
    if state == "in_progress":
        fields["status"] = "in_progress"
    else:
        fields.update(status="completed", conclusion=state, completed_at=now)
    details = safe_url(str(t.status.get("url") or ""))
    if details:
        fields["details_url"] = details
    return Payload(f"{state}@{t.spec['commitSha']}", fields)


def superseded_check_run(old_sha: str, new_sha: str, now: datetime.datetime) -> dict[str, Any]:
    """The fields that complete an earlier commit's run left in progress by a push (`cancelled`)."""
    summary = f"Commit `{old_sha[:7]}` was superseded by `{new_sha[:7]}` before its preview was ready."
    return {
        "status": "completed",
        "conclusion": "cancelled",
        "completed_at": now,
        "output": {"title": "Preview superseded", "summary": summary},
    }


def deployment_state(phase: TransitionPhase) -> str | None:
    """The Deployment's state for `phase`, or None for a phase that posts none."""
    return DEPLOYMENT_STATES.get(phase)


def deployment(t: Transition) -> dict[str, Any]:
    """The Deployment of `t`'s commit to the PR's environment (made once per commit)."""
    sha = str(t.spec["commitSha"])
    return {
        "ref": sha,
        "environment": deployment_environment(t.spec),
        "description": f"Preview of {sha[:7]}",
        "auto_merge": False,
        "required_contexts": [],
        "transient_environment": True,
        "production_environment": False,
    }


def deployment_environment(spec: dict[str, Any]) -> str:
    """The GitHub environment of the PR's Deployments."""
    return f"pr-{spec['pullRequest']}"


def deployment_status(t: Transition, state: str, deployment_id: int) -> Payload:
    """The status of Deployment `deployment_id` for `state` (from deployment_state)."""
    fields: dict[str, Any] = {"state": state, "description": t.message[:140], "auto_inactive": True}
    if t.status.get("url"):
        fields["environment_url"] = str(t.status["url"])
    return Payload(f"{state}@{deployment_id}", fields)


def comment(t: Transition) -> Payload:
    """The PR's one sticky comment for `t`."""
    return Payload(f"{t.phase}@{t.spec['commitSha']}", {"body": comment_body(t)})


def reported_is_current(status: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether `status.reported` already reflects the object's phase in every report (checked at
    start-up, with no API call): the commit status, the deployment's status, the comment, and the
    check run where one was ever made for the object (never with a plain token)."""
    reported = status.get("reported") or {}
    try:
        phase = parse_phase(str(status.get("phase")))
    except ValueError:
        return True  # no phase (or one this version does not know): nothing it would report
    sha = spec.get("commitSha")
    commit = commit_state(phase, permanent=bool(status.get("permanent")))
    deployed_state = deployment_state(phase)
    if commit is None and deployed_state is None:
        return True
    if reported.get("checkRunId"):
        check = check_run_state(phase, open_run=reported.get("checkRun") == f"in_progress@{sha}")
        if check is not None and reported.get("checkRun") != f"{check}@{sha}":
            return False
    if commit is not None and reported.get("commitStatus") != f"{commit[0]}@{sha}":
        return False
    deployed = str(reported.get("deploymentState", ""))
    if (
        deployed_state is not None
        and reported.get("deploymentSha") == sha
        and not deployed.startswith(f"{deployed_state}@")
    ):
        return False
    return bool(reported.get("comment") == f"{phase}@{sha}")
