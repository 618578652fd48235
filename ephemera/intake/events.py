"""GitHub webhook deliveries: signature, body decoding, and the pull_request event model."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import urllib.parse
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ephemera.api.models import REPOSITORY_PATTERN, SHA_PATTERN, TITLE_MAX


class BadRequest(Exception):
    """Input that cannot be accepted; becomes a 4xx JSON answer."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


class Signature:
    """`X-Hub-Signature-256` (sha256=<hex HMAC of the raw body>), computed as the body arrives.

    Each chunk goes into the HMAC when it is received, so the check costs no second pass over a
    body that is held in memory meanwhile.
    """

    def __init__(self, secret: bytes) -> None:
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def update(self, chunk: bytes) -> None:
        self._mac.update(chunk)

    def matches(self, header: str | None) -> bool:
        """Whether `header` is the signature of everything received, compared in constant time."""
        if not header or not header.startswith("sha256="):
            return False
        expected = "sha256=" + self._mac.hexdigest()
        return hmac.compare_digest(expected.encode(), header.strip().encode("utf-8", "replace"))


def decode_body(body: bytes, content_type: str) -> Any:
    """The event's JSON, from either content type GitHub sends."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=16)
        except (UnicodeDecodeError, ValueError) as err:
            raise BadRequest(400, "malformed form body", str(err)) from err
        values = form.get("payload")
        if not values or len(values) != 1:
            raise BadRequest(400, "malformed form body", "expected exactly one 'payload' field")
        text = values[0]
    elif media in ("application/json", ""):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRequest(400, "malformed JSON", f"body is not UTF-8: {err}") from err
    else:
        raise BadRequest(415, "unsupported content type", f"{media!r}; use application/json")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise BadRequest(400, "malformed JSON", str(err)[:200]) from err


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _RepositoryRef(_Model):
    full_name: str = Field(pattern=REPOSITORY_PATTERN, max_length=140)


class _Ref(_Model):
    sha: str = Field(pattern=SHA_PATTERN)
    ref: str = Field(min_length=1, max_length=255)
    # The head's repository: another one for a fork's PR, null when the fork was deleted.
    repo: _RepositoryRef | None = None

    _ref = field_validator("ref")(_printable)


class _Base(_Model):
    repo: _RepositoryRef | None = None


class _User(_Model):
    login: str = Field(min_length=1, max_length=39, pattern=r"^[A-Za-z0-9\[\]_.-]+$")
    type: str = Field("User", max_length=32)


class _Sender(_Model):
    # Who acted: a person, or an App's bot user (`<slug>[bot]`), whose login may pass a person's 39.
    login: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9\[\]_.-]+$")


class _Label(_Model):
    # GitHub's labels are at most 50 characters; names are compared, never shown as Markdown.
    name: str = Field(min_length=1, max_length=100)

    _name = field_validator("name")(_printable)


class _PullRequest(_Model):
    number: int = Field(ge=1, le=2**53)
    head: _Ref
    base: _Base | None = None
    user: _User
    labels: list[_Label] = Field(default_factory=list, max_length=100)
    title: str = ""
    updated_at: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
    draft: bool = False
    merged: bool | None = None
    state: str | None = None

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        """The author's words, for templates only: one line, of a length the CRD takes (never refused)."""
        return _CONTROL.sub(" ", value)[:TITLE_MAX]


class _Repository(_Model):
    full_name: str = Field(pattern=REPOSITORY_PATTERN, max_length=140)


class _Installation(_Model):
    id: int = Field(ge=1, le=2**53)


class PullRequestEvent(_Model):
    """The fields of a `pull_request` delivery that Ephemera uses."""

    action: str = Field(min_length=1, max_length=64)
    number: int = Field(ge=1, le=2**53)
    pull_request: _PullRequest
    repository: _Repository
    installation: _Installation | None = None
    label: _Label | None = None  # the label a `labeled` or `unlabeled` event is about
    sender: _Sender | None = None  # who did it (for `labeled`: who applied the label)

    @property
    def repo(self) -> str:
        return self.repository.full_name

    @property
    def fork(self) -> bool:
        """Whether the PR's head is in another repository than its base: a fork's PR (a head whose
        repository is unknown, as when the fork was deleted, counts as one)."""
        head = self.pull_request.head.repo
        base = self.pull_request.base.repo if self.pull_request.base is not None else None
        return head is None or head.full_name.lower() != (base or self.repository).full_name.lower()

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(label.name for label in self.pull_request.labels)

    @property
    def pr(self) -> int:
        return self.pull_request.number


def parse_pull_request(data: Any) -> PullRequestEvent:
    if not isinstance(data, dict):
        raise BadRequest(422, "invalid event", f"expected a JSON object, got {type(data).__name__}")
    try:
        event = PullRequestEvent.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(422, "invalid pull_request event", f"{where}: {first['msg']}") from err
    if event.number != event.pull_request.number:
        raise BadRequest(422, "invalid pull_request event", "number differs from pull_request.number")
    return event
