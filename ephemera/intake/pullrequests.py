"""Turn one pull_request event into a change of its PreviewEnvironment, safely against replays.

Order and duplicates are judged against what the object already reflects: the PR's `updated_at`
and head SHA are kept in annotations on it, and every write carries the object's resourceVersion,
so that two webhook replicas racing on one PR cannot roll each other back. Closes are also kept in
the cluster (`tombstones.py`), since the object they delete can no longer judge a late event.

Nothing here is shared between the threads that run `handle` but the Kubernetes client (whose
connection pool is thread-safe): what must be consistent lives in the API server, and every write
there carries a resourceVersion.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ephemera.api.models import API_VERSION, KIND
from ephemera.api.naming import (
    CLOSED_REASON_ANNOTATION,
    DELIVERY_ANNOTATION,
    FINALIZER,
    PR_UPDATED_AT_ANNOTATION,
    SHARD_LABEL,
    environment_labels,
    environment_name,
    legacy_environment_name,
    shard_of,
)
from ephemera.intake.events import PullRequestEvent
from ephemera.intake.tombstones import Tombstones, newer
from ephemera.kube import Kube, KubeError, Obj

UPSERT_ACTIONS = frozenset({"opened", "reopened", "ready_for_review"})
ATTEMPTS = 5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What the webhook did with one event: `created`, `updated`, `deleted` or `ignored`."""

    action: str
    name: str | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"result": self.action, "name": self.name, "reason": self.reason}


class Intake:
    """Apply pull_request events to PreviewEnvironments."""

    def __init__(
        self,
        kube: Kube,
        tombstones: Tombstones,
        *,
        prefix: str,
        draft_prs: bool,
        reopen_wait: float = 30.0,
        shards: int = 1,
    ) -> None:
        self.kube = kube
        self.shards = shards
        self.tombstones = tombstones
        self.reopen_wait = reopen_wait
        self.prefix = prefix
        self.draft_prs = draft_prs

    def name(self, event: PullRequestEvent) -> str:
        return environment_name(event.repo, event.pr, self.prefix)

    def _existing_name(self, event: PullRequestEvent) -> str:
        """The name of the PR's object: the legacy (8-hex) one while an object made under it exists for
        this PR, so that its pushes and close reach it; else the current one."""
        legacy = legacy_environment_name(event.repo, event.pr, self.prefix)
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
        """Apply the event; raises KubeError when the API server cannot be reached. `marks` are
        annotations put on an object this creates (the backstop marks its own)."""
        action = event.action
        name = self.name(event)
        pr = event.pull_request
        if action in UPSERT_ACTIONS and pr.draft and not self.draft_prs:
            return Outcome("ignored", name, "draft PRs get no environment (EPHEMERA_WEBHOOK_DRAFT_PRS=false)")
        if action in UPSERT_ACTIONS or action in ("synchronize", "closed", "converted_to_draft"):
            name = self._existing_name(event)
        if action in UPSERT_ACTIONS:
            return self._retrying(lambda: self._upsert(event, name, delivery, opening=True, marks=marks))
        if action == "synchronize":
            return self._retrying(lambda: self._upsert(event, name, delivery, opening=False, marks=marks))
        if action == "closed" or (action == "converted_to_draft" and not self.draft_prs):
            reason = "merged" if pr.merged else ("closed" if action == "closed" else "converted to draft")
            return self._retrying(lambda: self._delete(event, name, delivery, reason))
        return Outcome("ignored", name, f"action {action!r} needs no change")

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
        annotations = {PR_UPDATED_AT_ANNOTATION: event.pull_request.updated_at, DELIVERY_ANNOTATION: delivery}
        if obj is not None and obj["metadata"].get("deletionTimestamp"):
            obj = self._wait_gone(name)  # newer than the close: the PR was reopened
        if obj is None:
            # A push for a PR with no environment (its `opened` was lost or is still on its way) creates
            # one; a push older than a known close was refused above. New objects get the current name.
            name = self.name(event)
            self.kube.create_environment(self._body(event, name, delivery, marks))
            return Outcome("created", name, f"{event.action}: environment requested")
        spec = self.spec(event) if opening else {"commitSha": event.pull_request.head.sha}
        patch = {
            "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"], "annotations": annotations},
            "spec": spec,
        }
        self.kube.patch_environment(name, patch, missing_ok=False)
        return Outcome("updated", name, f"{event.action}: commit {event.pull_request.head.sha[:7]}")

    def _body(self, event: PullRequestEvent, name: str, delivery: str, marks: dict[str, str] | None = None) -> Obj:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                # Only a new object gets its shard here: moving an existing one is the operator's
                # handover (it waits until nothing is in flight), never a side effect of an event.
                "labels": {
                    **environment_labels(name, event.repo, event.pr),
                    SHARD_LABEL: str(shard_of(event.repo, self.shards)),
                },
                "annotations": {
                    **(marks or {}),
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


def _ours(obj: Obj, event: PullRequestEvent) -> bool:
    """The object was made for this PR: same repository (case-insensitively) and number."""
    spec = obj.get("spec") or {}
    return str(spec.get("repository", "")).lower() == event.repo.lower() and spec.get("pullRequest") == event.pr
