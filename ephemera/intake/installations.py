"""The App's installation lifecycle: environments of repositories the App lost are torn down, after a grace.

- `installation` `deleted` or `suspend`: every environment of that installation is marked;
  `unsuspend` (or `created`, a reinstall) cancels the marks the installation's events made.
- `installation_repositories` `removed`: the environments of the removed repositories are marked;
  `added` cancels those marks.
- `repository` `transferred`: the environments under the old owner are marked (the repository left
  the account they were made for; its PRs' events now come under the new name, for new objects).
- `repository` `renamed`: the environments are kept. `spec.repository` names the namespace and cannot
  change, so the new name is recorded beside it (`ephemera.dev/renamed-to`), and the backstop looks
  the PR up under that name: its close still tears the environment down.

A mark is two annotations, the deadline (`ephemera.dev/teardown-after`, now plus
EPHEMERA_BACKSTOP_TEARDOWN_GRACE) and the reason; the operator's backstop deletes the environment
once the deadline has passed. A mark already there keeps its earlier deadline.
"""

from __future__ import annotations

import datetime
import random
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ephemera.api.models import REPOSITORY_PATTERN
from ephemera.api.naming import RENAMED_TO_ANNOTATION, TEARDOWN_AFTER_ANNOTATION, TEARDOWN_REASON_ANNOTATION
from ephemera.intake.events import BadRequest
from ephemera.intake.pullrequests import Outcome
from ephemera.kube import Kube, KubeError, Obj

EVENTS = frozenset({"installation", "installation_repositories", "repository"})
ACTIONS = frozenset({"created", "deleted", "suspend", "unsuspend", "added", "removed", "renamed", "transferred"})
# Reasons of the marks, and which action of which event cancels each.
INSTALLATION_REASONS = ("installation-deleted", "installation-suspended")
REMOVED_REASON = "repository-removed"
TRANSFERRED_REASON = "repository-transferred"
LOGIN_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,38})(_[A-Za-z0-9]{1,38})?$"
# Writes that conflict with the operator's own (a status, a report record) are read again and redone;
# after this many in a row the event fails (503), and GitHub's redelivery does it again: none is lost.
ATTEMPTS = 5


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Installation(_Model):
    id: int = Field(ge=1, le=2**53)


class _Repository(_Model):
    full_name: str = Field(pattern=REPOSITORY_PATTERN, max_length=140)


class _Account(_Model):
    login: str = Field(pattern=LOGIN_PATTERN)


class InstallationEvent(_Model):
    action: str = Field(min_length=1, max_length=64)
    installation: _Installation


class RepositoriesEvent(_Model):
    action: str = Field(min_length=1, max_length=64)
    installation: _Installation
    repositories_added: list[_Repository] = Field(default_factory=list, max_length=10000)
    repositories_removed: list[_Repository] = Field(default_factory=list, max_length=10000)


class _NameChange(_Model):
    # `from`, the old name: a keyword in Python.
    old: str = Field(alias="from", pattern=r"^[A-Za-z0-9._-]{1,100}$")


class _OwnerChange(_Model):
    user: _Account | None = None
    organization: _Account | None = None


class _Changes(_Model):
    repository: dict[str, _NameChange] | None = None
    owner: dict[str, _OwnerChange] | None = None


class RepositoryEvent(_Model):
    action: str = Field(min_length=1, max_length=64)
    repository: _Repository
    changes: _Changes | None = None
    installation: _Installation | None = None


def _parse(model: type[_Model], data: Any, event: str) -> Any:
    if not isinstance(data, dict):
        raise BadRequest(422, f"invalid {event} event", f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(422, f"invalid {event} event", f"{where}: {first['msg']}") from err


def parse(event: str, data: Any) -> InstallationEvent | RepositoriesEvent | RepositoryEvent:
    """The event, validated; BadRequest (422) if it is not what GitHub sends."""
    if event == "installation":
        parsed: InstallationEvent = _parse(InstallationEvent, data, event)
        return parsed
    if event == "installation_repositories":
        repositories: RepositoriesEvent = _parse(RepositoriesEvent, data, event)
        return repositories
    repository: RepositoryEvent = _parse(RepositoryEvent, data, event)
    if repository.action == "renamed" and not (
        repository.changes and (repository.changes.repository or {}).get("name")
    ):
        raise BadRequest(422, "invalid repository event", "changes.repository.name.from is required for renamed")
    if repository.action == "transferred" and not (repository.changes and (repository.changes.owner or {}).get("from")):
        raise BadRequest(422, "invalid repository event", "changes.owner.from is required for transferred")
    return repository


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


class Lifecycle:
    """Marks and unmarks environments for the installation and repository events."""

    def __init__(self, kube: Kube, *, grace: float, clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.grace = grace
        self.clock = clock

    def handle(self, event: InstallationEvent | RepositoriesEvent | RepositoryEvent) -> Outcome:
        """Apply the event; raises KubeError when the API server cannot be reached."""
        if isinstance(event, InstallationEvent):
            installation = event.installation.id

            def of_installation(obj: Obj) -> bool:
                return (obj.get("spec") or {}).get("installationId") == installation

            if event.action in ("deleted", "suspend"):
                reason = "installation-deleted" if event.action == "deleted" else "installation-suspended"
                return self._mark(of_installation, reason, f"installation {installation} {event.action}")
            if event.action in ("unsuspend", "created"):
                return self._unmark(of_installation, INSTALLATION_REASONS, f"installation {installation} back")
            return Outcome("ignored", None, f"installation action {event.action!r} needs no change")
        if isinstance(event, RepositoriesEvent):
            installation = event.installation.id
            if event.action == "removed":
                removed = {r.full_name.lower() for r in event.repositories_removed}
                return self._mark(self._in(removed, installation), REMOVED_REASON, f"{len(removed)} removed")
            if event.action == "added":
                added = {r.full_name.lower() for r in event.repositories_added}
                return self._unmark(self._in(added, installation), (REMOVED_REASON,), f"{len(added)} added")
            return Outcome("ignored", None, f"installation_repositories action {event.action!r} needs no change")
        changes = event.changes or _Changes()
        if event.action == "renamed":
            owner = event.repository.full_name.split("/")[0]
            old = f"{owner}/{(changes.repository or {})['name'].old}".lower()
            return self._renamed(old, event.repository.full_name)
        if event.action == "transferred":
            before = (changes.owner or {})["from"]
            account = before.organization or before.user
            if account is None:
                raise BadRequest(422, "invalid repository event", "changes.owner.from names no user or organization")
            old = f"{account.login}/{event.repository.full_name.split('/')[1]}".lower()
            return self._mark(self._in({old}, None), TRANSFERRED_REASON, f"{old} transferred")
        return Outcome("ignored", None, f"repository action {event.action!r} needs no change")

    @staticmethod
    def _in(repositories: set[str], installation: int | None) -> Callable[[Obj], bool]:
        def matches(obj: Obj) -> bool:
            spec = obj.get("spec") or {}
            annotations = obj["metadata"].get("annotations") or {}
            names = {str(spec.get("repository", "")).lower(), str(annotations.get(RENAMED_TO_ANNOTATION, "")).lower()}
            same_installation = installation is None or spec.get("installationId") in (None, installation)
            return bool(names & repositories) and same_installation

        return matches

    def _each(self, matches: Callable[[Obj], bool], change: Callable[[Obj], Obj | None]) -> int:
        """Patch every live environment that `matches` with what `change` returns (None: leave it);
        each write carries the resourceVersion it read, and is redone on a conflict. Raises the
        conflict after ATTEMPTS in a row (a change is idempotent: a redelivery redoes only what is left)."""
        count = 0
        for obj in list(self.kube.list_environments()):
            if obj["metadata"].get("deletionTimestamp") or not matches(obj):
                continue
            name = obj["metadata"]["name"]
            current: Obj | None = obj
            for attempt in range(1, ATTEMPTS + 1):
                if current is None:
                    break
                patch = change(current)
                if patch is None:
                    break
                patch["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                try:
                    self.kube.patch_environment(name, patch, missing_ok=True)
                    count += 1
                    break
                except KubeError as err:
                    if err.status != 409 or attempt == ATTEMPTS:
                        raise
                    time.sleep(random.uniform(0, 0.01 * attempt))  # let the other writer's burst pass
                    current = self.kube.get_environment(name)
        return count

    def _mark(self, matches: Callable[[Obj], bool], reason: str, what: str) -> Outcome:
        deadline = _iso(self.clock() + self.grace)

        def change(obj: Obj) -> Obj | None:
            annotations = obj["metadata"].get("annotations") or {}
            if annotations.get(TEARDOWN_AFTER_ANNOTATION):
                return None  # marked already: the earlier deadline stands
            return {
                "metadata": {"annotations": {TEARDOWN_AFTER_ANNOTATION: deadline, TEARDOWN_REASON_ANNOTATION: reason}}
            }

        count = self._each(matches, change)
        return Outcome(
            "marked" if count else "ignored", None, f"{what}: {count} environment(s) to tear down after {deadline}"
        )

    def _unmark(self, matches: Callable[[Obj], bool], reasons: tuple[str, ...], what: str) -> Outcome:
        def change(obj: Obj) -> Obj | None:
            annotations = obj["metadata"].get("annotations") or {}
            if annotations.get(TEARDOWN_REASON_ANNOTATION) not in reasons:
                return None
            return {"metadata": {"annotations": {TEARDOWN_AFTER_ANNOTATION: None, TEARDOWN_REASON_ANNOTATION: None}}}

        count = self._each(matches, change)
        return Outcome("unmarked" if count else "ignored", None, f"{what}: {count} teardown(s) cancelled")

    def _renamed(self, old: str, new: str) -> Outcome:
        def change(obj: Obj) -> Obj | None:
            return {"metadata": {"annotations": {RENAMED_TO_ANNOTATION: new}}}

        count = self._each(self._in({old}, None), change)
        return Outcome("renamed" if count else "ignored", None, f"{old} is now {new}: {count} environment(s) kept")
