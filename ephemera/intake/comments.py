"""`issue_comment` deliveries: the `/preview wake` command on a PR.

Only a signed delivery gets here (the signature is checked before anything is parsed), and only a
comment from someone with write access to the repository (asked of GitHub, cached briefly) is acted
on: the PR's PreviewEnvironment gets the annotation `ephemera.dev/wake` set to the comment's
`created_at`, and the operator revives it if it is Expired (or starts its TTL again). Every other
comment is answered 202 with the reason it changed nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ephemera.api.models import REPOSITORY_PATTERN
from ephemera.api.naming import WAKE_ANNOTATION, environment_name, legacy_environment_name
from ephemera.intake.events import BadRequest
from ephemera.intake.pullrequests import ATTEMPTS, Outcome
from ephemera.kube import Kube, KubeError, Obj

WAKE_COMMAND = "/preview wake"
TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"

log = logging.getLogger(__name__)

# (repository, login, installation id) -> whether the login may write to the repository; raises when
# GitHub cannot tell (the delivery then fails, and is redelivered).
CanWrite = Callable[[str, str, int | None], bool]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _User(_Model):
    login: str = Field(min_length=1, max_length=39, pattern=r"^[A-Za-z0-9\[\]_.-]+$")


class _Comment(_Model):
    body: str = Field("", max_length=65536)
    created_at: str = Field(pattern=TIME_PATTERN)
    user: _User


class _Issue(_Model):
    number: int = Field(ge=1, le=2**53)
    # Present (an object of links) only when the issue is a pull request.
    pull_request: dict[str, Any] | None = None


class _Repository(_Model):
    full_name: str = Field(pattern=REPOSITORY_PATTERN, max_length=140)


class _Installation(_Model):
    id: int = Field(ge=1, le=2**53)


class IssueCommentEvent(_Model):
    action: str = Field(min_length=1, max_length=64)
    issue: _Issue
    comment: _Comment
    repository: _Repository
    installation: _Installation | None = None


def parse_issue_comment(data: Any) -> IssueCommentEvent:
    if not isinstance(data, dict):
        raise BadRequest(422, "invalid event", f"expected a JSON object, got {type(data).__name__}")
    try:
        return IssueCommentEvent.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(422, "invalid issue_comment event", f"{where}: {first['msg']}") from err


def is_wake(body: str) -> bool:
    """Whether the comment is the command: its first non-empty line is `/preview wake`."""
    for line in body.splitlines():
        if line.strip():
            return " ".join(line.split()).lower() == WAKE_COMMAND
    return False


class Wakes:
    """Apply `/preview wake` comments to PreviewEnvironments."""

    def __init__(self, kube: Kube, can_write: CanWrite, *, prefix: str) -> None:
        self.kube = kube
        self.can_write = can_write
        self.prefix = prefix

    def _find(self, repository: str, number: int) -> Obj | None:
        """The PR's object, under its current name or the legacy one."""
        names = (
            environment_name(repository, number, self.prefix),
            legacy_environment_name(repository, number, self.prefix),
        )
        for name in names:
            obj = self.kube.get_environment(name)
            spec = (obj or {}).get("spec") or {}
            ours = str(spec.get("repository", "")).lower() == repository.lower() and spec.get("pullRequest") == number
            if obj is not None and ours:
                return obj
        return None

    def handle(self, event: IssueCommentEvent) -> Outcome:
        """Raises KubeError when the API server cannot be reached, and whatever `can_write` raises
        when GitHub cannot say who may write."""
        repository, number = event.repository.full_name, event.issue.number
        login = event.comment.user.login
        if event.action != "created":
            return Outcome("ignored", None, f"comment {event.action}: only new comments are commands")
        if event.issue.pull_request is None:
            return Outcome("ignored", None, "a comment on an issue, not on a pull request")
        if not is_wake(event.comment.body):
            return Outcome("ignored", None, f"not a command (only {WAKE_COMMAND!r} is)")
        for _ in range(ATTEMPTS - 1):
            try:
                return self._wake(event, repository, number, login)
            except KubeError as err:
                if err.status not in (404, 409):  # changed or gone meanwhile: read again, decide anew
                    raise
        return self._wake(event, repository, number, login)

    def _wake(self, event: IssueCommentEvent, repository: str, number: int, login: str) -> Outcome:
        obj = self._find(repository, number)
        if obj is None:
            return Outcome("ignored", None, f"no preview environment for {repository}#{number}")
        name = obj["metadata"]["name"]
        if obj["metadata"].get("deletionTimestamp"):
            return Outcome("ignored", name, "the environment is being torn down")
        installation = event.installation.id if event.installation is not None else None
        if not self.can_write(repository, login, installation):
            return Outcome("ignored", name, f"{login} has no write access to {repository}; {WAKE_COMMAND} needs it")
        if (obj["metadata"].get("annotations") or {}).get(WAKE_ANNOTATION) == event.comment.created_at:
            return Outcome("ignored", name, "this wake was requested already")
        patch = {
            "metadata": {
                "resourceVersion": obj["metadata"]["resourceVersion"],
                "annotations": {WAKE_ANNOTATION: event.comment.created_at},
            }
        }
        self.kube.patch_environment(name, patch, missing_ok=False)
        return Outcome("updated", name, f"wake requested by {login}")
