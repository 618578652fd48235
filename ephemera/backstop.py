"""The backstop: the cluster converges on GitHub's list of open PRs, whatever events were lost.

A pass lists the open PRs of every repository the App is installed on (or, with a plain token, of
EPHEMERA_BACKSTOP_REPOSITORIES), compares them with the PreviewEnvironments (`compare`, a pure
function) and repairs the difference through the webhook's own intake, so that an object is made,
named, annotated and guarded by the closed-PR records exactly as a `pull_request` event would:

- an open PR with no environment gets one (an `opened` was lost);
- an environment whose PR is not in a complete listing is checked by fetching that PR alone, and
  deleted only if GitHub says `state: closed` (a `closed` was lost). A failed, partial or empty
  listing never counts as "closed": only a PR that GitHub reports closed, one by one, is deleted;
- an environment marked by the webhook for teardown (the App was uninstalled, suspended or removed
  from the repository, or the repository was transferred) is deleted once its deadline passes.

It also asks GitHub to redeliver failed webhook deliveries (`redelivery.py`).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
from github import Github, GithubException, RateLimitExceededException
from github.Installation import Installation
from github.PaginatedList import PaginatedList
from github.Repository import Repository
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from ephemera.api.models import parse_time
from ephemera.api.naming import (
    CLOSED_REASON_ANNOTATION,
    ORIGIN_ANNOTATION,
    RENAMED_TO_ANNOTATION,
    TEARDOWN_AFTER_ANNOTATION,
    TEARDOWN_REASON_ANNOTATION,
    shard_of,
)
from ephemera.config import Settings
from ephemera.github import ratelimit
from ephemera.github.client import GitHubAuth, NoCredentials
from ephemera.intake.events import PullRequestEvent
from ephemera.intake.pullrequests import GitHubUnavailable, Intake
from ephemera.intake.tombstones import Tombstones, default_namespace
from ephemera.kube import Kube, KubeError, Obj
from ephemera.metrics import REGISTRY
from ephemera.redelivery import Redeliverer
from ephemera.shards import selector

log = logging.getLogger(__name__)

ORIGIN = "backstop"
# The delivery annotation of what the backstop writes: no GitHub delivery caused it.
DELIVERY = "backstop"
# Below this many requests left in the hour, a pass stops listing and leaves the rest to the next
# one: the reporter's statuses and comments need the same budget.
RATE_FLOOR = 200
PAGE_SIZE = 100

REPAIRS = Counter(
    "ephemera_backstop_repairs",
    "Repairs the backstop made: environments created for open PRs, deleted for closed PRs or torn down "
    "after the App lost the repository, and failed deliveries redelivered.",
    ["kind"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "ephemera_backstop_last_success_timestamp_seconds",
    "When the last backstop pass that listed every repository completed (Unix time); 0 before the first.",
    registry=REGISTRY,
)
for _kind in ("created", "deleted", "torn_down", "redelivered"):
    REPAIRS.labels(_kind)


@dataclass
class Listing:
    """The open PRs of one repository, as GitHub listed them; `complete` only if every page came."""

    repository: str
    installation_id: int | None
    open: dict[int, dict[str, Any]] = field(default_factory=dict)  # number -> the PR's JSON
    complete: bool = False


@dataclass(frozen=True)
class Check:
    """An environment whose PR was not listed as open: ask GitHub about that PR alone."""

    name: str
    repository: str  # spec.repository: what the object and its closed-PR record are keyed by
    current: str  # the repository's name on GitHub now (after a rename)
    pull_request: int
    installation_id: int | None


@dataclass
class Plan:
    create: list[tuple[Listing, dict[str, Any]]] = field(default_factory=list)
    check: list[Check] = field(default_factory=list)
    teardown: list[Obj] = field(default_factory=list)
    unmark: list[Obj] = field(default_factory=list)


@dataclass
class Report:
    created: int = 0
    deleted: int = 0
    torn_down: int = 0
    unmarked: int = 0
    redelivered: int = 0
    refused: int = 0  # open PRs without an environment that the policy refuses one
    complete: bool = True
    problems: list[str] = field(default_factory=list)

    def incomplete(self, problem: str) -> None:
        """Something was not compared or repaired: the pass is not complete, and this says why."""
        self.complete = False
        self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "deleted": self.deleted,
            "tornDown": self.torn_down,
            "unmarked": self.unmarked,
            "redelivered": self.redelivered,
            "refused": self.refused,
            "complete": self.complete,
            "problems": self.problems,
        }


def _current(obj: Obj) -> str:
    """The repository's name on GitHub: the rename the webhook recorded, else spec.repository."""
    annotations = obj["metadata"].get("annotations") or {}
    return str(annotations.get(RENAMED_TO_ANNOTATION) or obj["spec"]["repository"])


def compare(listings: list[Listing], environments: list[Obj], now: datetime.datetime, grace: float = 0.0) -> Plan:
    """What to repair: open PRs without an environment, environments whose PR must be checked (their
    repository was listed completely and the PR was not in it), and teardowns whose deadline passed.

    An environment in a repository whose listing failed or is partial is never checked: a missing
    answer says nothing about its PR. A teardown mark is cancelled instead when the environment's
    own installation listed its repository in a pass that began after the mark was made (`now` is
    the pass's start; a mark is made `grace` seconds before its deadline): the installation is back
    and covers the repository again, though its `unsuspend` or `added` event was lost."""
    plan = Plan()
    have: set[tuple[str, int]] = set()
    listed = {listing.repository.lower(): listing for listing in listings}
    for obj in environments:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        if meta.get("deletionTimestamp") or "repository" not in spec or "pullRequest" not in spec:
            continue
        current = _current(obj)
        have.add((current.lower(), int(spec["pullRequest"])))
        have.add((str(spec["repository"]).lower(), int(spec["pullRequest"])))
        listing = listed.get(current.lower())
        deadline = parse_time((meta.get("annotations") or {}).get(TEARDOWN_AFTER_ANNOTATION))
        if deadline is not None:
            covered = (
                listing is not None
                and listing.complete
                and listing.installation_id is not None
                and listing.installation_id == spec.get("installationId")
            )
            if covered and deadline - datetime.timedelta(seconds=grace) < now:
                plan.unmark.append(obj)
            elif deadline <= now:
                plan.teardown.append(obj)
            continue  # marked: its fate is the mark's, not the listing's
        if listing is not None and listing.complete and int(spec["pullRequest"]) not in listing.open:
            check = Check(
                meta["name"], spec["repository"], current, int(spec["pullRequest"]), spec.get("installationId")
            )
            plan.check.append(check)
    for listing in listings:
        for number, pr in sorted(listing.open.items()):
            if (listing.repository.lower(), number) not in have:
                plan.create.append((listing, pr))
    return plan


def _pages(client: Github, url: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every item of a GitHub list, page after page along the Link header's `next`, through PyGithub's
    requester: its list objects fetch each item again when its raw data is read (one request per PR)."""
    next_url: str | None = url
    parameters: dict[str, Any] | None = {**params, "per_page": PAGE_SIZE}
    while next_url is not None:
        headers, data = client.requester.requestJsonAndCheck("GET", next_url, parameters=parameters)
        if not isinstance(data, list):
            raise GithubException(502, data, headers)
        yield from data
        next_url = _next_link(headers)
        parameters = None  # the next page's URL carries them


def _next_link(headers: dict[str, Any]) -> str | None:
    link = next((value for key, value in headers.items() if key.lower() == "link"), None)
    for part in str(link or "").split(","):
        url, _, rel = part.partition(";")
        if 'rel="next"' in rel:
            return url.strip().strip("<>")
    return None


def _event(action: str, repository: str, pr: dict[str, Any], installation_id: int | None) -> PullRequestEvent | None:
    """The pull_request event the webhook would have had: a REST PR has the webhook payload's shape."""
    data: dict[str, Any] = {
        "action": action,
        "number": pr.get("number"),
        "pull_request": pr,
        "repository": {"full_name": repository},
    }
    if installation_id is not None:
        data["installation"] = {"id": installation_id}
    try:
        return PullRequestEvent.model_validate(data)
    except ValidationError as err:
        log.warning("backstop: GitHub's PR %s#%s cannot be used: %s", repository, pr.get("number"), err)
        return None


class Backstop:
    """One pass at a time (`run`); the operator's active replica runs it every EPHEMERA_PR_RESYNC_INTERVAL."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        auth: GitHubAuth | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.auth = auth or GitHubAuth(settings)
        self.clock = clock
        namespace = settings.webhook_namespace or default_namespace()
        tombstones = Tombstones(kube, namespace=namespace, retention=settings.webhook_tombstone_retention)
        # The webhook's intake, so the webhook's policy: an open PR it refuses gets nothing here either.
        self.intake = Intake.from_settings(settings, kube, tombstones, self.auth)
        self.redeliverer = (
            Redeliverer(settings, kube, self.auth, namespace=settings.backstop_namespace or namespace, clock=clock)
            if self.auth.app_mode
            else None
        )

    def run(self) -> Report:
        """One pass: list, compare, repair, redeliver. Blocking (PyGithub and the Kubernetes client)."""
        report = Report()
        if not self.auth.configured:
            report.incomplete("no GitHub App and no token configured: nothing to compare with")
            return report
        started = self.clock()
        sharded = self.settings.shards > 1
        environments = list(self.kube.list_environments(selector(self.settings.shard) if sharded else None))
        listings = list(self._listings(report))
        start = datetime.datetime.fromtimestamp(started, datetime.UTC)
        plan = compare(listings, environments, start, self.settings.backstop_teardown_grace)
        for listing, pr in plan.create:
            self._create(listing, pr, report)
        for check in plan.check:
            self._check(check, report)
        for obj in plan.teardown:
            self._teardown(obj, report)
        for obj in plan.unmark:
            self._unmark(obj, report)
        # Failed deliveries are the App's, not a repository's: shard 0 alone asks for them again.
        if self.redeliverer is not None and self.settings.shard == 0:
            try:
                report.redelivered = self.redeliverer.run()
                REPAIRS.labels("redelivered").inc(report.redelivered)
            except (GithubException, KubeError, requests.RequestException) as err:
                report.incomplete(f"redelivery: {err}")
        if report.complete:
            LAST_SUCCESS.set(self.clock())
        log.info("backstop pass: %s", report.as_dict())
        return report

    # Listing --------------------------------------------------------------------------------------

    def _repositories(self, report: Report) -> Iterator[tuple[str, int | None, Github]]:
        """(repository, installation id, client) for every repository to list."""
        if not self.auth.app_mode:
            client = self.auth.client_for(None)
            for repository in self.settings.backstop_repositories:
                yield repository, None, client
            return
        try:
            app = self.auth.app_client()
            pages = PaginatedList(Installation, app.requester, "/app/installations", {"per_page": PAGE_SIZE})
            installations = [installation.raw_data for installation in pages]
        except (GithubException, requests.RequestException) as err:
            report.incomplete(f"listing the App's installations: {err}")
            return
        for installation in installations:
            installation_id = int(installation["id"])
            if installation.get("suspended_at"):
                continue  # no token for a suspended installation; its environments carry a mark
            try:
                client = self.auth.client_for(installation_id)
                url, params = "/installation/repositories", {"per_page": PAGE_SIZE}
                repositories = PaginatedList(Repository, client.requester, url, params, list_item="repositories")
                names = [repository.full_name for repository in repositories]
            except (GithubException, NoCredentials, requests.RequestException) as err:
                report.incomplete(f"listing installation {installation_id}'s repositories: {err}")
                continue
            for name in names:
                yield name, installation_id, client

    def _listings(self, report: Report) -> Iterator[Listing]:
        shards = self.settings.shards
        for repository, installation_id, client in self._repositories(report):
            if shards > 1 and shard_of(repository, shards) != self.settings.shard:
                continue  # another shard's repository: its backstop lists it (one listing per repository)
            listing = Listing(repository, installation_id)
            remaining, limit = client.requester.rate_limiting
            ratelimit.observe((remaining, limit))
            if 0 <= remaining < RATE_FLOOR:
                report.incomplete(f"{remaining} GitHub requests left: {repository} is left for the next pass")
                yield listing
                continue
            try:
                for pr in _pages(client, f"/repos/{repository}/pulls", {"state": "open", "sort": "created"}):
                    listing.open[int(pr["number"])] = pr
                listing.complete = True
            except RateLimitExceededException as err:
                report.incomplete(f"rate limited listing {repository}: {err.status}")
            except GithubException as err:
                report.incomplete(f"listing {repository}'s open PRs: {err.status}")
            except requests.RequestException as err:  # GitHub unreachable, or too slow
                report.incomplete(f"listing {repository}'s open PRs: {err}")
            yield listing

    # Repairs --------------------------------------------------------------------------------------

    def _create(self, listing: Listing, pr: dict[str, Any], report: Report) -> None:
        event = _event("opened", listing.repository, pr, listing.installation_id)
        if event is None:
            return
        try:
            outcome = self.intake.handle(event, DELIVERY, marks={ORIGIN_ANNOTATION: ORIGIN})
        except (KubeError, GitHubUnavailable) as err:
            report.incomplete(f"creating the environment of {listing.repository}#{event.pr}: {err}")
            return
        if outcome.action == "refused":
            report.refused += 1
            log.debug("backstop: %s#%d gets no environment: %s", listing.repository, event.pr, outcome.reason)
        if outcome.action == "created":
            report.created += 1
            REPAIRS.labels("created").inc()
            log.info(
                "backstop: %s#%d is open and had no environment: %s requested",
                listing.repository,
                event.pr,
                outcome.name,
                extra={"repository": listing.repository, "pr": event.pr},
            )

    def _check(self, check: Check, report: Report) -> None:
        """Fetch the PR alone; delete its environment only if GitHub says it is closed."""
        try:
            client = self.auth.client_for(check.installation_id)
            _, pr = client.requester.requestJsonAndCheck("GET", f"/repos/{check.current}/pulls/{check.pull_request}")
        except (GithubException, NoCredentials, requests.RequestException) as err:
            report.incomplete(f"fetching {check.current}#{check.pull_request}: {err}")
            return
        if pr.get("state") != "closed":
            return  # open, yet not listed: the listing raced a reopen, or was short; the next pass sees it
        event = _event("closed", check.repository, pr, check.installation_id)
        if event is None:
            return
        try:
            outcome = self.intake.handle(event, DELIVERY)
        except KubeError as err:
            report.incomplete(f"deleting {check.name}: {err}")
            return
        if outcome.action == "deleted":
            report.deleted += 1
            REPAIRS.labels("deleted").inc()
            log.info(
                "backstop: %s#%d was closed at %s: %s torn down",
                check.current,
                check.pull_request,
                pr.get("closed_at"),
                check.name,
                extra={"repository": check.repository, "pr": check.pull_request},
            )

    def _unmark(self, obj: Obj, report: Report) -> None:
        meta = obj["metadata"]
        patch = {
            "metadata": {
                "resourceVersion": meta["resourceVersion"],
                "annotations": {TEARDOWN_AFTER_ANNOTATION: None, TEARDOWN_REASON_ANNOTATION: None},
            }
        }
        try:
            self.kube.patch_environment(meta["name"], patch, missing_ok=False)
        except KubeError as err:
            if err.status in (404, 409):
                return  # gone, or changed since the listing: the next pass judges again
            report.incomplete(f"cancelling the teardown of {meta['name']}: {err}")
            return
        report.unmarked += 1
        log.info("backstop: %s is covered by its installation again: teardown cancelled", meta["name"])

    def _teardown(self, obj: Obj, report: Report) -> None:
        meta = obj["metadata"]
        reason = str((meta.get("annotations") or {}).get(TEARDOWN_REASON_ANNOTATION) or "uninstalled")
        try:
            patch = {
                "metadata": {
                    "resourceVersion": meta["resourceVersion"],
                    "annotations": {CLOSED_REASON_ANNOTATION: reason},
                }
            }
            self.kube.patch_environment(meta["name"], patch, missing_ok=False)
            self.kube.delete_environment(meta["name"], meta["uid"])
        except KubeError as err:
            if err.status in (404, 409):
                return  # gone, or changed (perhaps unmarked) since the listing: the next pass judges again
            report.incomplete(f"tearing down {meta['name']}: {err}")
            return
        report.torn_down += 1
        REPAIRS.labels("torn_down").inc()
        log.info("backstop: %s torn down (%s, grace passed)", meta["name"], reason)
