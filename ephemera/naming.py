"""Names and labels of what Ephemera creates: derived, DNS-1123 safe, stable and unique."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "ephemera"
REPOSITORY_LABEL = "ephemera.dev/repository"
PR_LABEL = "ephemera.dev/pull-request"
ENVIRONMENT_LABEL = "ephemera.dev/environment"
# Ephemera's ownership mark on a namespace: the uid of the PreviewEnvironment that created it.
OWNER_UID_ANNOTATION = "ephemera.dev/owner-uid"
REPOSITORY_ANNOTATION = "ephemera.dev/repository"
RETRY_ANNOTATION = "ephemera.dev/retry"
# The operator's finalizer: objects the webhook makes carry it from birth (one patch less for each).
FINALIZER = "ephemera.dev/finalizer"

_NOT_DNS = re.compile(r"[^a-z0-9]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9._-]+")


def _digest(repository: str, pull_request: int) -> str:
    # GitHub treats owner and repository names case-insensitively: so does the hash.
    key = f"{repository.lower()}#{pull_request}".encode()
    return hashlib.sha256(key).hexdigest()[:8]


def environment_name(repository: str, pull_request: int, prefix: str = "pr") -> str:
    """The namespace (and webhook-made object) name for one PR: `<prefix>-<pr>-<slug>-<hash>`.

    The slug makes it readable; the hash of the exact repository and PR makes it unique, since
    slugs collide (`a-b/c` and `a/b-c`) and are cut to fit 63 characters.
    """
    head = f"{prefix}-{pull_request}-"
    tail = f"-{_digest(repository, pull_request)}"
    slug = _NOT_DNS.sub("-", repository.lower()).strip("-")
    slug = slug[: max(0, MAX_NAME - len(head) - len(tail))].strip("-")
    if not slug:
        return f"{prefix}-{pull_request}{tail}"
    return f"{head}{slug}{tail}"


def label_value(text: str) -> str:
    """A label value (<= 63 of [A-Za-z0-9._-], alphanumeric at both ends) derived from `text`."""
    value = _NOT_LABEL.sub("_", text)[:MAX_NAME]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def environment_labels(name: str, repository: str, pull_request: int) -> dict[str, str]:
    return {
        MANAGED_BY_LABEL: MANAGED_BY,
        REPOSITORY_LABEL: label_value(repository.replace("/", ".")),
        PR_LABEL: str(pull_request),
        ENVIRONMENT_LABEL: label_value(name),
    }
