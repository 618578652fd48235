"""The outbox: send each environment's state to its PR (commit status, check run, sticky comment,
Deployment), as built by `reports.py`, off the reconcile path and with retries.

A transition listener hands the newest state of each object to a queue; workers report it off the
reconcile path, in threads (PyGithub is synchronous). Only the newest state of an object is ever
reported, failures are retried with backoff (honouring Retry-After and X-RateLimit-Reset, and waiting
at least a minute after a secondary rate limit), and what was reported is recorded in the object's
`status.reported`, in one write per report. After a restart the reports still owed are first checked
against GitHub itself (what a report cut short posted but did not record), so nothing is posted twice.

The object's spec is written by whoever may create PreviewEnvironments, so nothing in it is trusted
to choose where or what the App posts: the installation must really cover the repository (asked of
GitHub, cached), and only comments written by Ephemera itself are ever edited. A step GitHub refuses
(403, 422) is dropped alone: the other reports of that state still go out.

The check run (named after the status context) is an App's alone: GitHub refuses check runs to other
tokens, so with EPHEMERA_GITHUB_TOKEN it is skipped (said once in the log). There is one per commit
and attempt: made in progress (or straight away completed), completed in place, and made anew when
a completed commit is provisioned again (a retry), as GitHub's own re-runs do; never reopened.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from github import GithubException
from github.Issue import Issue
from github.IssueComment import IssueComment
from github.Repository import Repository
from prometheus_client import Counter

from ephemera import backoff
from ephemera.api.models import DESTROYED
from ephemera.config import Settings
from ephemera.github import ratelimit, reports
from ephemera.github.client import GitHubAuth, Identity, NoCredentials, NotInstalled
from ephemera.kube import Kube, KubeError
from ephemera.metrics import REGISTRY
from ephemera.transitions import Transition

log = logging.getLogger(__name__)

REPORTS = Counter(
    "ephemera_github_reports", "GitHub reports by kind and outcome.", ["kind", "outcome"], registry=REGISTRY
)
MAX_ATTEMPTS = 12
SETTLE = 1.0  # seconds a new state waits, in case a newer one overtakes it
# Words in a 403/429 that mean a secondary rate limit (today's message and the older "abuse" one,
# and the documentation links GitHub sends with each).
SECONDARY_RATE_LIMIT = ("secondary rate limit", "abuse detection", "secondary-rate-limits", "abuse-rate-limits")


class RetryLater(Exception):
    """A report to try again: after `delay` seconds, or, when `backoff` is set, after a full-jitter
    backoff from `delay` doubled per attempt (up to EPHEMERA_GITHUB_RETRY_MAX_DELAY); never sooner
    than `floor` seconds."""

    def __init__(self, delay: float, why: str, *, backoff: bool = True, floor: float = 0.0) -> None:
        super().__init__(why)
        self.delay = delay
        self.backoff = backoff
        self.floor = floor

    def wait(self, attempt: int, max_delay: float) -> float:
        """Seconds to wait before attempt number `attempt` + 1 (`attempt` >= 1 failed so far)."""
        delay = self.delay
        if self.backoff:
            delay = backoff.delay(attempt - 1, delay, max_delay)
        return max(delay, self.floor)


def secondary_rate_limit(err: GithubException) -> bool:
    """Whether a 403/429 is GitHub's secondary rate limit, as its message and documentation link say."""
    data = err.data if isinstance(err.data, dict) else {}
    said = f"{data.get('message', '')} {data.get('documentation_url', '')}".lower()
    return err.status in (403, 429) and any(words in said for words in SECONDARY_RATE_LIMIT)


def _retry(err: GithubException, max_delay: float, secondary_delay: float) -> RetryLater | None:
    """When to try again, as GitHub says (Retry-After, X-RateLimit-Reset) or by backoff; None if never."""
    headers = {k.lower(): v for k, v in (err.headers or {}).items()}
    why = f"GitHub answered {err.status}"
    if err.status in (403, 429):
        if "retry-after" in headers:
            return RetryLater(min(float(headers["retry-after"]), max_delay), why, backoff=False)
        if headers.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in headers:
            wait = min(max(1.0, float(headers["x-ratelimit-reset"]) - time.time()), max_delay)
            return RetryLater(wait, why, backoff=False)
        if secondary_rate_limit(err):
            # GitHub: "wait for at least one minute before retrying", then longer; a short
            # EPHEMERA_GITHUB_RETRY_MAX_DELAY must not bring the next request sooner.
            return RetryLater(secondary_delay, f"{why}: secondary rate limit", floor=secondary_delay)
        if err.status == 429:
            return RetryLater(1.0, why)
        return None  # a plain 403: the App lacks a permission
    if err.status == 401 or err.status >= 500:
        return RetryLater(1.0, why)
    return None


# Who posts (the App or the token's user), found when first needed.
Who = Callable[[], Identity]
# One step of a report: (repository, transition, what was reported, who posts) -> what it posted, if anything.
Step = Callable[[Repository, Transition, dict[str, Any], Who], dict[str, Any] | None]


class Refused(Exception):
    """GitHub refused a step for good (logged and counted); the report's other steps still run."""


@dataclass
class _Job:
    transition: Transition
    seq: int  # the order in which states arrived: a higher one is newer
    attempt: int = 0


class Reporter:
    """Queue transitions per object (newest wins) and report them with a few workers."""

    def __init__(self, settings: Settings, kube: Kube, auth: GitHubAuth, workers: int = 4) -> None:
        self.settings = settings
        self.kube = kube
        self.auth = auth
        self.workers = workers
        self._pending: dict[str, _Job] = {}  # uid -> the newest state not yet reported
        self._queued: set[str] = set()  # uids in the queue
        self._active: set[str] = set()  # uids being reported now: one report per object at a time
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._newest: dict[str, int] = {}  # uid -> seq of the newest state seen
        self._waiting: dict[str, list[float]] = {}  # uid -> when retries are due (loop time)
        self._known: dict[str, dict[str, Any]] = {}  # uid -> what was reported (mirrors status.reported)
        self._own_comments: dict[str, int] = {}  # uid -> id of its comment, known to be Ephemera's
        self._unsure: set[str] = set()  # uids resumed after a restart: read GitHub before posting
        self._checks_skipped = threading.Event()  # said once: check runs need an App
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # Called from handler threads -------------------------------------------------------------------

    def listener(self, transition: Transition) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._arrive, transition)

    def _arrive(self, transition: Transition) -> None:
        if transition.resumed:
            self._unsure.add(transition.uid)
        job = _Job(transition, next(self._seq))
        self._newest[transition.uid] = job.seq
        self._enqueue(job)

    def _enqueue(self, job: _Job) -> None:
        uid = job.transition.uid
        if job.seq < self._newest.get(uid, -1):
            return  # superseded: the newer state is (or was) reported instead
        self._pending[uid] = job
        self._schedule(uid)

    def _schedule(self, uid: str) -> None:
        if uid in self._pending and uid not in self._queued and uid not in self._active:
            self._queued.add(uid)
            self._queue.put_nowait(uid)

    # The loop ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._worker(), name=f"github-reporter-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            uid = await self._queue.get()
            job = self._pending.get(uid)
            if job is not None and job.attempt == 0:
                # A state that lasts under SETTLE seconds (Provisioning, usually) is overtaken before it is
                # posted: one report instead of two, and fewer writes to the object.
                wait = SETTLE - (datetime.datetime.now(datetime.UTC) - job.transition.occurred).total_seconds()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._queued.discard(uid)
            job = self._pending.pop(uid, None)
            if job is None:
                continue
            self._active.add(uid)
            try:
                await asyncio.to_thread(self.report, job.transition)
            except RetryLater as later:
                job.attempt += 1
                if job.attempt >= MAX_ATTEMPTS:
                    log.error("giving up reporting %s to GitHub: %s", job.transition.name, later)
                    continue
                delay = later.wait(job.attempt, self.settings.github_retry_max_delay)
                log.warning("GitHub report for %s retried in %.1f s: %s", job.transition.name, delay, later)
                self._later(job, delay)
            except Exception:
                # Not a GitHub answer we know: retried like a 5xx, so that no report is dropped.
                log.exception("GitHub report for %s failed unexpectedly", job.transition.name)
                job.attempt += 1
                if job.attempt < MAX_ATTEMPTS:
                    self._later(job, backoff.delay(job.attempt, 1.0, self.settings.github_retry_max_delay))
            finally:
                self._active.discard(uid)
                self._schedule(uid)  # a newer state that arrived meanwhile
                self._forget(uid)

    def _later(self, job: _Job, delay: float) -> None:
        """Try `job` again after `delay` seconds (unless a newer state supersedes it meanwhile)."""
        assert self._loop is not None
        when = self._loop.time() + delay
        self._waiting.setdefault(job.transition.uid, []).append(when)
        self._loop.call_at(when, self._retry, job, when)

    def _retry(self, job: _Job, when: float) -> None:
        uid = job.transition.uid
        self._waiting[uid].remove(when)
        if not self._waiting[uid]:
            del self._waiting[uid]
        self._enqueue(job)
        self._forget(uid)

    def next_attempt(self, uid: str) -> float | None:
        """Seconds until the object's next scheduled retry, if one is (call it in the reporter's loop)."""
        assert self._loop is not None
        due = self._waiting.get(uid)
        return min(due) - self._loop.time() if due else None

    def _forget(self, uid: str) -> None:
        """Drop what is kept about an object once nothing about it is queued, running or waiting."""
        if uid not in self._pending and uid not in self._active and uid not in self._waiting:
            self._newest.pop(uid, None)

    # One report (in a worker thread) ---------------------------------------------------------------------

    def report(self, t: Transition) -> None:
        """Bring the PR up to date with `t`; raise RetryLater for what may pass."""
        spec = t.spec
        repository, installation_id = str(spec["repository"]), spec.get("installationId")
        try:
            try:
                self.auth.check_installation(installation_id, repository)
            except GithubException as err:
                self._raise_retry("installation", err, spec)
                return
            client = self.auth.client_for(installation_id)
        except NoCredentials as why:
            REPORTS.labels("all", "skipped").inc()
            log.info("GitHub reporting skipped for %s: %s", t.name, why, extra={"repository": repository})
            return
        except NotInstalled as why:
            REPORTS.labels("installation", "refused").inc()
            log.error(
                "GitHub report for %s refused, nothing posted: %s (spec.installationId and spec.repository "
                "must name an installation of the App that covers the repository)",
                t.name,
                why,
                extra={"repository": repository, "pr": spec["pullRequest"]},
            )
            return
        except GithubException as err:
            self._raise_retry("token", err, spec)
            return
        except requests.RequestException as err:
            raise RetryLater(5, f"GitHub unreachable: {err}") from err
        reported = self._reported(t)
        repo = client.get_repo(repository)  # lazy: the client is

        def who() -> Identity:  # asked only by the comment step: who we are matters only there
            return self.auth.identity(installation_id, repository, client)

        done: dict[str, Any] = {}  # what this report posted: recorded on the object in one write
        checks: tuple[Step, ...] = (self._check_run,)
        unsure: tuple[Step, ...] = (self._reconcile, self._reconcile_check_run)
        if not self.auth.uses_installation(installation_id):
            checks, unsure = (), (self._reconcile,)
            if not self._checks_skipped.is_set():
                self._checks_skipped.set()
                log.info(
                    "GitHub check runs skipped: GitHub accepts them only from a GitHub App, and %s reports with "
                    "EPHEMERA_GITHUB_TOKEN; commit statuses, comments and deployments still go out",
                    t.name,
                )
        try:
            steps = (self._commit_status, *checks, self._deployment, self._comment)
            for step in (unsure if t.uid in self._unsure else ()) + steps:
                try:
                    self._step(step, repo, t, client, who, reported, done)
                except Refused:
                    continue  # logged and counted: the other reports still go out
            self._unsure.discard(t.uid)
        finally:
            if done:
                self._record(t, done)
        if t.phase is DESTROYED:
            self._known.pop(t.uid, None)  # the object is gone: nothing more to report
            self._own_comments.pop(t.uid, None)

    def _step(
        self,
        step: Step,
        repo: Repository,
        t: Transition,
        client: Any,
        who: Who,
        reported: dict[str, Any],
        done: dict[str, Any],
    ) -> None:
        """Run one step of a report; what it posted (or found) goes into `reported` and `done`."""
        kind, spec = step.__name__.lstrip("_"), t.spec
        try:
            update = step(repo, t, reported, who)
        except GithubException as err:
            REPORTS.labels(kind, "error").inc()
            self._raise_retry(kind, err, spec)
            raise Refused(kind) from err  # not retried: this step is dropped for this state
        except requests.RequestException as err:
            REPORTS.labels(kind, "error").inc()
            raise RetryLater(5, f"GitHub unreachable: {err}") from err
        finally:
            self._observe_rate_limit(client)
        if update:
            REPORTS.labels(kind, "success").inc()
            reported.update(update)
            done.update(update)

    def _raise_retry(self, kind: str, err: GithubException, spec: dict[str, Any]) -> None:
        if err.status == 401:
            self.auth.invalidate(spec.get("installationId"))
        later = _retry(err, self.settings.github_retry_max_delay, self.settings.github_secondary_rate_limit_delay)
        if later is None:
            REPORTS.labels(kind, "refused").inc()
            log.error(
                "GitHub refused the %s report (%s): %s; not retried",
                kind,
                err.status,
                err.data,
                extra={"repository": spec["repository"], "pr": spec["pullRequest"]},
            )
            return
        raise RetryLater(later.delay, f"{kind}: {later}", backoff=later.backoff, floor=later.floor)

    def _observe_rate_limit(self, client: Any) -> None:
        # What the last answer's X-RateLimit-* headers said; `client.rate_limiting` would make a request.
        requester = getattr(client, "_Github__requester", None)
        ratelimit.observe(getattr(requester, "rate_limiting", (-1, -1)))

    def _reported(self, t: Transition) -> dict[str, Any]:
        """What was reported already: known here since the first report, else what the object said
        when the transition was made (a restarted operator's first reports are `resumed`: see _reconcile)."""
        known = self._known.get(t.uid)
        if known is None:
            known = self._known[t.uid] = dict(t.status.get("reported") or {})
        return known

    def _record(self, t: Transition, update: dict[str, Any]) -> None:
        try:
            self.kube.patch_environment_status(t.name, {"reported": update})
        except KubeError as err:
            log.warning("could not record the GitHub report on %s: %s", t.name, err)

    # The four reports ----------------------------------------------------------------------------------

    def _reconcile(self, repo: Repository, t: Transition, reported: dict[str, Any], who: Who) -> dict[str, Any] | None:
        """Read back from GitHub what was posted for this commit: after a restart, a report cut short
        may have posted a status or created a deployment without recording it on the object."""
        sha = str(t.spec["commitSha"])
        found: dict[str, Any] = {}
        for status in repo.get_commit(sha).get_statuses():  # newest first
            if status.context == self._context:
                found["commitStatus"] = f"{status.state}@{sha}"
                break
        for deployment in repo.get_deployments(
            sha=sha, environment=reports.deployment_environment(t.spec)
        ):  # newest first
            found.update(deploymentId=deployment.id, deploymentSha=sha)
            latest = next(iter(deployment.get_statuses()), None)
            if latest is not None:
                found["deploymentState"] = f"{latest.state}@{deployment.id}"
            break
        return found

    def _reconcile_check_run(
        self, repo: Repository, t: Transition, reported: dict[str, Any], who: Who
    ) -> dict[str, Any] | None:
        """Read back the commit's newest check run of this App (a report cut short may have made one)."""
        sha = str(t.spec["commitSha"])
        runs = repo.get_commit(sha).get_check_runs(check_name=self._context, filter="all")
        ours = [run for run in runs if run.app is not None and run.app.id == self.settings.github_app_id]
        if not ours:
            return None
        newest = max(ours, key=lambda run: run.id)
        state = newest.conclusion if newest.status == "completed" else newest.status
        return {"checkRunId": newest.id, "checkRun": f"{state}@{sha}"}

    def _check_run(self, repo: Repository, t: Transition, reported: dict[str, Any], who: Who) -> dict[str, Any] | None:
        """The commit's check run: one per commit and attempt, completed in place, never reopened."""
        sha = str(t.spec["commitSha"])
        recorded = str(reported.get("checkRun") or "")
        open_id = int(reported.get("checkRunId") or 0) if recorded == f"in_progress@{sha}" else 0
        state = reports.check_run_state(t.phase, open_run=bool(open_id))
        if state is None:
            return None
        run = reports.check_run(t, state, datetime.datetime.now(datetime.UTC))
        if recorded == run.key:
            return None
        earlier, _, earlier_sha = recorded.partition("@")
        if earlier == "in_progress" and earlier_sha != sha and reported.get("checkRunId"):
            self._supersede(repo, t, int(reported["checkRunId"]), earlier_sha)
        if open_id:
            try:
                repo.get_check_run(open_id).edit(**run.fields)  # lazy: a PATCH, without reading the run first
                return {"checkRun": run.key}
            except GithubException as err:
                if err.status not in (404, 410):
                    raise
                log.info("check run %d of %s is gone on GitHub; a new one is made", open_id, t.name)
        made = repo.create_check_run(name=self._context, head_sha=sha, external_id=t.uid, **run.fields)
        return {"checkRunId": made.id, "checkRun": run.key}

    def _supersede(self, repo: Repository, t: Transition, run_id: int, old_sha: str) -> None:
        """Complete an earlier commit's run left in progress by a push (`cancelled`), so that it does
        not stay in progress on that commit forever. Best effort: the new commit's run matters more."""
        fields = reports.superseded_check_run(old_sha, str(t.spec["commitSha"]), datetime.datetime.now(datetime.UTC))
        try:
            repo.get_check_run(run_id).edit(**fields)
        except GithubException as err:
            log.warning(
                "could not complete check run %d of %s (superseded): %s %s", run_id, t.name, err.status, err.data
            )

    def _commit_status(
        self, repo: Repository, t: Transition, reported: dict[str, Any], who: Who
    ) -> dict[str, Any] | None:
        status = reports.commit_status(t, self._context)
        if status is None or reported.get("commitStatus") == status.key:
            return None
        repo.get_commit(str(t.spec["commitSha"])).create_status(**status.fields)
        return {"commitStatus": status.key}

    @property
    def _context(self) -> str:
        return self.settings.github_status_context

    def _deployment(self, repo: Repository, t: Transition, reported: dict[str, Any], who: Who) -> dict[str, Any] | None:
        state = reports.deployment_state(t.phase)
        if state is None:
            return None
        sha = str(t.spec["commitSha"])
        update: dict[str, Any] = {}
        deployment_id = reported.get("deploymentId")
        if reported.get("deploymentSha") != sha or not deployment_id:
            if state == "inactive":
                return None  # nothing was deployed for this commit: nothing to deactivate
            deployment = repo.create_deployment(**reports.deployment(t))
            deployment_id = deployment.id
            update = {"deploymentId": deployment_id, "deploymentSha": sha}
            # Known at once: a retry of the status below must not create a second deployment.
            reported.update(update)
        status = reports.deployment_status(t, state, int(deployment_id))
        if reported.get("deploymentState") == status.key:
            return update or None
        repo.get_deployment(int(deployment_id)).create_status(**status.fields)
        return {**update, "deploymentState": status.key}

    def _comment(self, repo: Repository, t: Transition, reported: dict[str, Any], who: Who) -> dict[str, Any] | None:
        wanted = reports.comment(t)
        if reported.get("comment") == wanted.key:
            return None
        issue = repo.get_issue(int(t.spec["pullRequest"]))
        found = self._existing_comment(issue, t, reported, who)
        comment = None
        if found is not None:
            comment_id, comment = found
            try:
                comment.edit(**wanted.fields)
            except GithubException as err:
                if err.status not in (404, 410):
                    raise
                log.info("comment %d on %s was deleted on GitHub; a new one is made", comment_id, t.name)
                comment = None
        if comment is None:
            comment = issue.create_comment(**wanted.fields)
        self._own_comments[t.uid] = comment.id
        return {"commentId": comment.id, "comment": wanted.key}

    def _existing_comment(
        self, issue: Issue, t: Transition, reported: dict[str, Any], who: Who
    ) -> tuple[int, IssueComment] | None:
        """Ephemera's comment on the PR (its id and a handle to it), if it has one; None to make one."""
        comment_id = int(reported.get("commentId") or 0)
        if comment_id and self._own_comments.get(t.uid) == comment_id:
            # Made or checked by this process: not read again (an edit answers 404 if it was deleted).
            return comment_id, issue.get_comment(comment_id)
        me = who()
        if comment_id:
            comment = self._own_comment(issue, comment_id, me, t)
            if comment is not None:
                return comment_id, comment
        # Ours, found by the marker: someone else's comment that quotes the marker is left alone.
        tag = reports.marker(str(t.spec["repository"]), int(t.spec["pullRequest"]))
        for listed in issue.get_comments():
            if tag in (listed.body or "") and _wrote(me, listed):
                return listed.id, listed
        return None

    def _own_comment(self, issue: Issue, comment_id: int, who: Identity, t: Transition) -> IssueComment | None:
        """The comment Ephemera made earlier, if it still exists and is still its own."""
        comment = issue.get_comment(comment_id)
        try:
            ours = _wrote(who, comment)  # reads the comment (lazy until now)
        except GithubException as err:
            if err.status not in (404, 410):
                raise
            # Deleted on GitHub: it would answer 404 forever. Forget it; a new one is made.
            log.info("comment %d on %s was deleted on GitHub; a new one is made", comment_id, t.name)
            return None
        if not ours:
            log.warning("comment %d on %s was not written by Ephemera (%s); it is left alone", comment_id, t.name, who)
            return None
        return comment


def _wrote(who: Identity, comment: IssueComment) -> bool:
    """Whether Ephemera wrote `comment` (a comment got by id is read here; a listed one is not read again)."""
    user = comment.user
    app = comment.performed_via_github_app
    return who.wrote(user.login if user is not None else None, app.id if app is not None else None)
