"""Turn one pull_request event into a change of its PreviewEnvironment, safely against replays.

Order and duplicates are judged against what the object already reflects: the PR's `updated_at`
and head SHA are kept in annotations on it, and every write carries the object's resourceVersion,
so that two webhook replicas racing on one PR cannot roll each other back. Closes are also kept in
the cluster (`tombstones.py`), since the object they delete can no longer judge a late event.

Which PRs get an environment is the policy's (`ephemera/policy.py`): every event that could create,
update or delete one is judged first. A refused PR gets nothing; one that has an environment and is
no longer admitted loses it, as if closed. A fork's approval is the `labeled` event of the approval
label by someone GitHub says may write (`Writer`); it is recorded on the object, so that later events
of the PR find it there.

Nothing here is shared between the threads that run `handle` but the Kubernetes client (whose
connection pool is thread-safe), the permission answers (`github.permissions`) and the templates
read for the policy (`Policies`), each behind its lock: what must be consistent lives in the API
server, and every write there carries a resourceVersion.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from github import GithubException

from ephemera.api.models import API_VERSION, KIND
from ephemera.api.naming import (
    APPROVED_BY_ANNOTATION,
    APPROVED_SHA_ANNOTATION,
    CLOSED_REASON_ANNOTATION,
    DELIVERY_ANNOTATION,
    FINALIZER,
    NAME_HASH_BITS,
    NAME_HASH_LABEL,
    PR_UPDATED_AT_ANNOTATION,
    SHARD_LABEL,
    environment_labels,
    environment_name,
    is_legacy_name,
    legacy_environment_name,
    shard_of,
)
from ephemera.config import Settings
from ephemera.github.client import GitHubAuth, NoCredentials
from ephemera.github.permissions import can_write
from ephemera.intake.events import PullRequestEvent
from ephemera.intake.mirror import UNKNOWN, Mirror
from ephemera.intake.tombstones import Tombstones, newer
from ephemera.kube import ENVIRONMENTS, Kube, KubeError, Obj
from ephemera.policy import Approval, Decision, Policy, PullRequestFacts, decide, for_repository, mirrored

UPSERT_ACTIONS = frozenset({"opened", "reopened", "ready_for_review"})
# The actions the policy judges: each may create, update or (once the PR is no longer admitted) delete.
POLICY_ACTIONS = UPSERT_ACTIONS | {"synchronize", "labeled", "unlabeled", "converted_to_draft"}
ATTEMPTS = 5
# Seconds the PreviewTemplates (their `policy` blocks) are kept between two reads: a burst of events
# reads them once, and a template's edit counts within this long.
TEMPLATES_TTL = 10.0
# Why a refusal deletes an existing environment, in the teardown comment's words (github/reports.TEARDOWN_REASONS).
TEARDOWN_REASONS = {
    "draft": "converted to draft",
    "not_opted_in": "opt-in-label-removed",
    "fork_push_unapproved": "approval-needed",
}
# (repository, labeller's login, installation id) -> whether the labeller may write; raises when
# GitHub cannot say (its errors), NoPermissionCheck when it cannot be asked at all.
Writer = Callable[[str, str, int | None], bool]


class GitHubUnavailable(Exception):
    """The labeller's permission could not be checked now; the event must be redelivered later."""


class NoPermissionCheck(Exception):
    """No GitHub credentials reach the repository: an approval cannot be checked."""


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What the webhook did with one event: `created`, `updated`, `deleted`, `ignored` or `refused` (the
    policy admits no preview for the PR: `policy` is the refusal's code, policy.REFUSALS)."""

    action: str
    name: str | None
    reason: str
    policy: str | None = None

    def as_json(self) -> dict[str, Any]:
        answer = {"result": self.action, "name": self.name, "reason": self.reason}
        if self.policy is not None:
            answer["policy"] = self.policy
        return answer


def github_writer(auth: GitHubAuth) -> Writer:
    """A Writer that asks GitHub through the App's installation on the repository (or the plain token)."""

    def writer(repository: str, login: str, installation: int | None) -> bool:
        try:
            return can_write(lambda _: auth.client_for(installation), repository, login)
        except NoCredentials as err:
            raise NoPermissionCheck(str(err)) from err
        except (GithubException, requests.RequestException) as err:
            raise GitHubUnavailable(f"asking GitHub whether {login} may write to {repository}: {err}") from err

    return writer


class Policies:
    """Each repository's policy: the cluster's, with the `policy` block of its PreviewTemplate. The
    templates are read at most every TEMPLATES_TTL seconds (one list for a burst of events)."""

    def __init__(self, base: Policy, kube: Kube, *, ttl: float = TEMPLATES_TTL) -> None:
        self.base = base
        self.kube = kube
        self.ttl = ttl
        self._lock = threading.Lock()
        self._templates: list[Obj] = []
        self._read_at: float | None = None

    def of(self, repository: str) -> Policy:
        """Raises KubeError when the templates cannot be read (the event then fails, and is redelivered)."""
        with self._lock:
            if self._read_at is None or time.monotonic() - self._read_at > self.ttl:
                try:
                    self._templates = list(self.kube.list_templates())
                except KubeError as err:
                    if err.status != 404:
                        raise
                    self._templates = []  # no PreviewTemplate CRD: the cluster's policy everywhere
                self._read_at = time.monotonic()
            templates = self._templates
        return for_repository(self.base, templates, repository)


class Intake:
    """Apply pull_request events to PreviewEnvironments."""

    def __init__(
        self,
        kube: Kube,
        tombstones: Tombstones,
        *,
        prefix: str,
        policies: Policies,
        writer: Writer | None = None,
        reopen_wait: float = 30.0,
        shards: int = 1,
    ) -> None:
        self.kube = kube
        self.shards = shards
        self.tombstones = tombstones
        self.reopen_wait = reopen_wait
        self.prefix = prefix
        self.policies = policies
        self.writer = writer
        self.legacy: Mirror | None = None

    @classmethod
    def from_settings(cls, settings: Settings, kube: Kube, tombstones: Tombstones, auth: GitHubAuth | None) -> Intake:
        """The intake of the webhook and of the backstop: the same policy, the same permission check."""
        return cls(
            kube,
            tombstones,
            prefix=settings.namespace_prefix,
            policies=Policies(Policy.from_settings(settings), kube),
            writer=github_writer(auth) if auth is not None and auth.configured else None,
            shards=settings.shards,
        )

    def name(self, event: PullRequestEvent) -> str:
        return environment_name(event.repo, event.pr, self.prefix)

    def mirrored(self) -> Mirror:
        """A mirror of the objects under a legacy name (`start` it; `_existing_name` reads it while it
        is live). It watches only objects without NAME_HASH_LABEL, which every object this intake
        makes carries: those of earlier versions (the only ones that make legacy names) and of
        people. One that an earlier version's replica creates while this one runs (an upgrade in
        progress) reaches it as fast as the API server's watch delivers it."""
        self.legacy = Mirror(self.kube, ENVIRONMENTS, f"!{NAME_HASH_LABEL}", "legacy-named environments", _legacy)
        return self.legacy

    def _existing_name(self, event: PullRequestEvent) -> str:
        """The name of the PR's object: the legacy (8-hex) one while an object made under it exists for
        this PR, so that its pushes and close reach it; else the current one."""
        legacy = legacy_environment_name(event.repo, event.pr, self.prefix)
        obj = self.legacy.get(legacy) if self.legacy is not None else UNKNOWN
        if obj is UNKNOWN:
            obj = self.kube.get_environment(legacy)
        return legacy if obj is not None and _ours(obj, event) else self.name(event)

    def spec(self, event: PullRequestEvent) -> dict[str, Any]:
        pr = event.pull_request
        spec: dict[str, Any] = {
            "repository": event.repo,
            "pullRequest": pr.number,
            "commitSha": pr.head.sha,
            "branch": pr.head.ref,
            "author": pr.user.login,
        }
        if pr.title:
            spec["title"] = pr.title
        if event.installation is not None:
            spec["installationId"] = event.installation.id
        return spec

    def handle(self, event: PullRequestEvent, delivery: str, marks: dict[str, str] | None = None) -> Outcome:
        """Apply the event; raises KubeError when the API server cannot be reached, GitHubUnavailable
        when an approval's permission cannot be checked now. `marks` are annotations put on an object
        this creates (the backstop marks its own)."""
        action = event.action
        if action in POLICY_ACTIONS:
            return self._judged(event, delivery, marks)
        if action == "closed":
            name = self._existing_name(event)
            reason = "merged" if event.pull_request.merged else "closed"
            return self._retrying(lambda: self._delete(event, name, delivery, reason))
        return Outcome("ignored", self.name(event), f"action {action!r} needs no change")

    def judge(self, event: PullRequestEvent, name: str) -> tuple[Policy, Decision, Approval | None]:
        """The policy's decision on the PR as the event shows it (and, for a fork's PR, the approval
        recorded on its environment `name`, or the one this event makes)."""
        policy = self.policies.of(event.repo)
        approval = self._approval(event, policy, name) if event.fork and policy.forks == "approval" else None
        return policy, decide(policy, facts(event, approval)), approval

    def _judged(self, event: PullRequestEvent, delivery: str, extra: dict[str, str] | None) -> Outcome:
        action = event.action
        label = event.label.name if event.label is not None else None
        if action in ("labeled", "unlabeled"):
            policy = self.policies.of(event.repo)
            if label not in policy.relevant_labels():
                return Outcome("ignored", self.name(event), f"the label {label!r} changes nothing")
        name = self._existing_name(event)
        policy, decision, approval = self.judge(event, name)
        if not decision.admit:
            return self._retrying(lambda: self._refused(event, name, delivery, decision))
        if action == "converted_to_draft":
            return Outcome("ignored", name, "drafts get a preview too: no change")
        annotations: dict[str, str] = dict(extra or {})
        if approval is not None and approval.sha == event.pull_request.head.sha:
            annotations |= {APPROVED_SHA_ANNOTATION: approval.sha, APPROVED_BY_ANNOTATION: approval.login}
        opening = action in UPSERT_ACTIONS or (
            action == "labeled" and label in (policy.opt_in_label, policy.approval_label)
        )
        return self._retrying(lambda: self._upsert(event, name, delivery, opening=opening, marks=annotations))

    def _approval(self, event: PullRequestEvent, policy: Policy, name: str) -> Approval | None:
        """A fork's approval: the one this `labeled` event makes, else the one recorded on its
        environment (made only for a writer's approval; void once the object is being deleted)."""
        pr = event.pull_request
        if event.action == "labeled" and event.label is not None and event.label.name == policy.approval_label:
            if event.sender is None:
                return None
            login = event.sender.login
            own = login.lower() == pr.user.login.lower()  # the author's own label: no need to ask
            return Approval(login, pr.head.sha, writer=False if own else self._can_write(event, login))
        obj = self.kube.get_environment(name)
        if obj is None or not _ours(obj, event) or obj["metadata"].get("deletionTimestamp"):
            return None
        annotations = obj["metadata"].get("annotations") or {}
        sha, by = annotations.get(APPROVED_SHA_ANNOTATION), annotations.get(APPROVED_BY_ANNOTATION)
        return Approval(str(by), str(sha), writer=True) if sha and by else None

    def _can_write(self, event: PullRequestEvent, login: str) -> bool | None:
        """Whether the labeller may write to the repository; None if no credentials can ask."""
        if self.writer is None:
            return None
        installation = event.installation.id if event.installation is not None else None
        try:
            return self.writer(event.repo, login, installation)
        except NoPermissionCheck as err:
            log.warning("the approval of %s#%d cannot be checked: %s", event.repo, event.pr, err)
            return None

    def _refused(self, event: PullRequestEvent, name: str, delivery: str, decision: Decision) -> Outcome:
        """Nothing for a PR the policy refuses; an environment it has is deleted (it was admitted before)."""
        obj = self.kube.get_environment(name)
        if obj is None or not _ours(obj, event) or obj["metadata"].get("deletionTimestamp"):
            return Outcome("refused", name, decision.reason, decision.code)
        reason = TEARDOWN_REASONS.get(decision.code, "policy")
        outcome = self._delete(event, name, delivery, reason)
        if outcome.action != "deleted":
            return outcome
        return Outcome("deleted", name, f"{decision.reason}: environment torn down", decision.code)

    def _retrying(self, attempt: Any) -> Outcome:
        # 409: another replica wrote the object between our read and our write; 404: it went away
        # meanwhile. Either way, read again and decide anew.
        for _ in range(ATTEMPTS - 1):
            try:
                outcome: Outcome = attempt()
                return outcome
            except KubeError as err:
                if err.status not in (404, 409):
                    raise
        result: Outcome = attempt()
        return result

    def _stale(self, obj: Obj | None, event: PullRequestEvent, closed_at: str | None) -> str | None:
        """Why the event must not change `obj`, or None if it is newer than what `obj` reflects."""
        pr = event.pull_request
        if closed_at is not None and not newer(pr.updated_at, closed_at):
            return "the PR was closed after this event; a late event does not resurrect it"
        if obj is None:
            return None
        meta = obj["metadata"]
        seen = (meta.get("annotations") or {}).get(PR_UPDATED_AT_ANNOTATION)
        if meta.get("deletionTimestamp"):
            if newer(pr.updated_at, seen):
                return None  # newer than the close, so reopened: a new environment once the old one is gone
            return "the environment is being torn down (the PR was closed)"
        if newer(pr.updated_at, seen):
            return None
        same_commit = obj.get("spec", {}).get("commitSha") == pr.head.sha
        if seen == pr.updated_at and not same_commit:
            return None  # two changes in one second: take the new commit
        return "the environment already reflects this or a newer event"

    def _upsert(
        self, event: PullRequestEvent, name: str, delivery: str, *, opening: bool, marks: dict[str, str] | None = None
    ) -> Outcome:
        closed_at = self.tombstones.closed_at(event.repo, event.pr)
        if opening and (closed_at is None or newer(event.pull_request.updated_at, closed_at)):
            # The common case, a new PR: a read of the repository's closes, then a create. An
            # existing object (409) takes the careful path. A close recorded between that read and
            # the create would have to delete the object and see it gone in that instant: the
            # operator's teardown alone takes far longer.
            try:
                self.kube.create_environment(self._body(event, name, delivery, marks))
                return Outcome("created", name, f"{event.action}: environment requested")
            except KubeError as err:
                if err.status != 409:
                    raise
        obj = self.kube.get_environment(name)
        if obj is not None and not _ours(obj, event):
            return Outcome("ignored", name, "an object of that name belongs to another PR")
        stale = self._stale(obj, event, closed_at)
        if stale:
            return Outcome("ignored", name, stale)
        labels, keep = mirrored(event.labels)
        annotations = {
            **keep,
            **{k: v for k, v in (marks or {}).items() if k in (APPROVED_SHA_ANNOTATION, APPROVED_BY_ANNOTATION)},
            PR_UPDATED_AT_ANNOTATION: event.pull_request.updated_at,
            DELIVERY_ANNOTATION: delivery,
        }
        if obj is not None and obj["metadata"].get("deletionTimestamp"):
            obj = self._wait_gone(name)  # newer than the close: the PR was reopened
        if obj is None:
            # A push for a PR with no environment (its `opened` was lost or is still on its way) creates
            # one; a push older than a known close was refused above. New objects get the current name.
            name = self.name(event)
            self.kube.create_environment(self._body(event, name, delivery, marks))
            return Outcome("created", name, f"{event.action}: environment requested")
        spec = self.spec(event) if opening else {"commitSha": event.pull_request.head.sha}
        if not is_legacy_name(name):
            # An object made before the label existed gets it on its next event, and so leaves the
            # legacy names' mirror (which watches the objects without it).
            labels = {**labels, NAME_HASH_LABEL: NAME_HASH_BITS}
        patch = {
            "metadata": {
                "resourceVersion": obj["metadata"]["resourceVersion"],
                "labels": labels,
                "annotations": annotations,
            },
            "spec": spec,
        }
        self.kube.patch_environment(name, patch, missing_ok=False)
        return Outcome("updated", name, f"{event.action}: commit {event.pull_request.head.sha[:7]}")

    def _body(self, event: PullRequestEvent, name: str, delivery: str, marks: dict[str, str] | None = None) -> Obj:
        labels, keep = mirrored(event.labels)
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                # Only a new object gets its shard here: moving an existing one is the operator's
                # handover (it waits until nothing is in flight), never a side effect of an event.
                "labels": {
                    **environment_labels(name, event.repo, event.pr),
                    **_present(labels),
                    NAME_HASH_LABEL: NAME_HASH_BITS,
                    SHARD_LABEL: str(shard_of(event.repo, self.shards)),
                },
                "annotations": {
                    **(marks or {}),
                    **_present(keep),
                    PR_UPDATED_AT_ANNOTATION: event.pull_request.updated_at,
                    DELIVERY_ANNOTATION: delivery,
                },
                # Born protected: the operator need not add it (one request less for each new PR), and
                # an object deleted before the operator saw it still passes through its teardown.
                "finalizers": [FINALIZER],
            },
            "spec": self.spec(event),
        }

    def _wait_gone(self, name: str) -> Obj | None:
        """Wait (bounded) for a torn-down environment to be gone, so that a reopen can start anew."""
        deadline = time.monotonic() + self.reopen_wait
        while time.monotonic() < deadline:
            obj = self.kube.get_environment(name)
            if obj is None or not obj["metadata"].get("deletionTimestamp"):
                return obj
            time.sleep(0.2)
        raise KubeError(
            f"the previous environment {name} is still being torn down; redeliver the event in a minute",
            status=503,
        )

    def _delete(self, event: PullRequestEvent, name: str, delivery: str, reason: str) -> Outcome:
        # Recorded before the delete, so that no replica can recreate what is being deleted; if this
        # fails, the event fails (503) and GitHub's redelivery tries both again.
        self.tombstones.add(event.repo, event.pr, event.pull_request.updated_at)
        obj = self.kube.get_environment(name)
        if obj is None:
            return Outcome("ignored", name, "no environment for this PR")
        if not _ours(obj, event):
            return Outcome("ignored", name, "an object of that name belongs to another PR")
        if obj["metadata"].get("deletionTimestamp"):
            return Outcome("ignored", name, "the environment is already being torn down")
        seen = (obj["metadata"].get("annotations") or {}).get(PR_UPDATED_AT_ANNOTATION)
        if seen and newer(seen, event.pull_request.updated_at):
            return Outcome("ignored", name, "the environment reflects a later event (the PR was reopened)")
        # Say why before deleting, so the final report can tell merged from closed.
        patch = {
            "metadata": {
                "resourceVersion": obj["metadata"]["resourceVersion"],
                "annotations": {
                    CLOSED_REASON_ANNOTATION: reason,
                    PR_UPDATED_AT_ANNOTATION: event.pull_request.updated_at,
                    DELIVERY_ANNOTATION: delivery,
                },
            }
        }
        self.kube.patch_environment(name, patch, missing_ok=False)
        self.kube.delete_environment(name, obj["metadata"]["uid"])
        return Outcome("deleted", name, f"PR {reason}: environment torn down")


def _present(values: dict[str, str | None]) -> dict[str, str]:
    return {key: value for key, value in values.items() if value is not None}


def facts(event: PullRequestEvent, approval: Approval | None) -> PullRequestFacts:
    """What the policy judges of the PR, as the event shows it."""
    pr = event.pull_request
    return PullRequestFacts(
        repository=event.repo,
        number=pr.number,
        draft=pr.draft,
        author=pr.user.login,
        author_is_bot=pr.user.type == "Bot",
        fork=event.fork,
        labels=event.labels,
        head_sha=pr.head.sha,
        approval=approval,
    )


def _legacy(obj: Obj) -> Obj | None:
    """What the legacy names' mirror keeps of an object: its name and PR, if its name is a legacy one."""
    name = obj["metadata"]["name"]
    if not is_legacy_name(name):
        return None
    spec = obj.get("spec") or {}
    return {"metadata": {"name": name}, "spec": {k: spec.get(k) for k in ("repository", "pullRequest")}}


def _ours(obj: Obj, event: PullRequestEvent) -> bool:
    """The object was made for this PR: same repository (case-insensitively) and number."""
    spec = obj.get("spec") or {}
    return str(spec.get("repository", "")).lower() == event.repo.lower() and spec.get("pullRequest") == event.pr
